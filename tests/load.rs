//! The load suite: ten clients upload a 5,000-ticket batch each, all at once,
//! against providers with real limits. Every batch completes, no provider is
//! pushed past its limits, and each batch keeps to its own budget.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const BATCHES: usize = 10;
const TICKETS: usize = 5000;

/// Fast providers with limits the ten batches together must respect.
const SCENARIO: &str = r#"
description = "Fast providers with limits, for load"
seed = 7
[client]
timeout_ms = 3000
rate_headroom = 0.9
[outcomes]
nothing_due = 0.02
unknown_ticket = 0.01
amount_minor = [500, 20000]
rejected = { registry = 0.01, fraud = 0.01, sanctions = 0.005 }
payment_failure = { gateway = 0.01, settlement = 0.005, ledger = 0.002, receipt = 0.002 }
[defaults]
latency_ms = [1, 10]
rate_limit = 400
concurrency_limit = 48
"#;

#[test]
fn ten_clients_at_once_each_within_its_own_budget_and_the_providers_limits() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("load.toml");
    std::fs::write(&scenario, SCENARIO).unwrap();
    let scenario = scenario.to_str().unwrap();
    let data = dir.path().join("data");
    let (_sim, providers) = simulator(scenario);
    let stack = Stack::start(StackOptions { scenario, providers_url: Some(&providers), data: &data, env: &[], extra_args: &[] });

    // Half the clients can pay for everything; the others run out part way, each at a different point.
    let budgets: Vec<String> = (0..BATCHES).map(|i| if i % 2 == 0 { "1000000.00".into() } else { format!("{}.00", 100_000 + i * 20_000) }).collect();
    let batches: Vec<(String, String)> = std::thread::scope(|s| {
        let uploads: Vec<_> = budgets
            .iter()
            .enumerate()
            .map(|(i, budget)| {
                let url = format!("{}/api/batches", stack.url);
                s.spawn(move || {
                    let client = format!("client-{i:02}");
                    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
                    // Each client's own tickets: a ticket in two batches is paid once, the other copy ends duplicate.
                    let mut body = batch_json(&client, TICKETS, budget);
                    for t in body["tickets"].as_array_mut().unwrap() {
                        t["ticket_id"] = format!("{client}-{}", t["ticket_id"].as_str().unwrap()).into();
                    }
                    let r = http.post(url).json(&body).send().unwrap();
                    assert_eq!(r.status().as_u16(), 202, "{client}'s upload accepted");
                    (client, r.json::<Value>().unwrap()["batch_id"].as_str().unwrap().to_owned())
                })
            })
            .collect();
        uploads.into_iter().map(|u| u.join().unwrap()).collect()
    });

    let stats_end = {
        for (_, batch) in &batches {
            stack.wait_complete(batch, Duration::from_secs(1500));
        }
        stats(&providers)
    };
    assert_limits_held(&stats_end);
    let authority = stats_end["authority"]["requests"].as_u64().unwrap();
    assert!(authority >= (BATCHES * TICKETS) as u64, "every ticket was looked up: {stats_end}");

    for ((client, batch), budget) in batches.iter().zip(&budgets) {
        let status = stack.status(batch);
        assert_eq!(status["client_id"], client.as_str());
        assert_batch_invariants(&status, &stats_end, TICKETS as u64);
        assert_eq!(status["budget"], budget.as_str());
        let over = status["counts"]["over_budget"].as_u64().unwrap_or(0);
        if cents(&status["budget"]) >= 100_000_000 {
            assert_eq!(over, 0, "{client} could pay for everything: {status}");
        } else {
            assert!(over > 0, "{client}'s budget ran out: {status}");
        }
        let listed = stack.get(&format!("/api/batches?client_id={client}"));
        let ids: Vec<&str> = listed["batches"].as_array().unwrap().iter().map(|b| b["batch_id"].as_str().unwrap()).collect();
        assert_eq!(ids, [batch.as_str()], "each client sees its own batch");
    }
}
