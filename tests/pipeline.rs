//! The whole journey on one machine: the real local host, handler and provider
//! simulator, driven over HTTP as operations would.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::Value;
use ticketpay::providers::simulator::{Scenario, outcome_for};

/// What the simulator's scenario decides for each ticket, counted.
fn predicted(scenario: &str, tickets: usize) -> HashMap<&'static str, u64> {
    let scenario = Scenario::load(Some(scenario)).unwrap();
    let mut counts = HashMap::new();
    for i in 1..=tickets {
        let o = outcome_for(&scenario, &format!("T{i:06}"));
        let key = if o.unknown || o.nothing_due {
            "not_payable"
        } else if o.rejected_by.is_some() {
            "rejected"
        } else {
            "payable"
        };
        *counts.entry(key).or_default() += 1;
    }
    counts
}

#[test]
fn a_5000_ticket_batch_is_paid_within_budget_and_provider_limits() {
    let data = tempfile::tempdir().unwrap();
    let stack = Stack::start(StackOptions { scenario: "realistic", providers_url: None, data: data.path(), env: &[], extra_args: &[] });
    // About 90% of what the payable tickets owe, so some tickets must end over budget.
    let batch = stack.submit(5000, "460000.00");
    let status = stack.wait_complete(&batch, Duration::from_secs(600));
    let stats = stats(&stack.providers_url);
    assert_batch_invariants(&status, &stats, 5000);

    let expected = predicted("realistic", 5000);
    assert_eq!(status["counts"]["not_payable"], expected["not_payable"], "{status}");
    assert_eq!(status["counts"]["rejected"], expected["rejected"], "{status}");
    assert!(status["counts"]["over_budget"].as_u64().unwrap() > 0, "the budget ran out: {status}");
    assert!(status["counts"]["failed"].as_u64().unwrap() > 0, "some payments were declined and undone: {status}");
    assert_eq!(status["counts"]["parked"].as_u64().unwrap_or(0), 0, "no transient faults in this scenario: {status}");

    // Each paid ticket paid exactly what its authority said was due; the batch total is their sum.
    let scenario = Scenario::load(Some("realistic")).unwrap();
    let tickets = stack.all_tickets(&batch);
    assert_eq!(tickets.len(), 5000);
    let mut paid_total = 0;
    for t in &tickets {
        let outcome = outcome_for(&scenario, t["ticket_id"].as_str().unwrap());
        match t["status"].as_str().unwrap() {
            "paid" => {
                assert_eq!(cents(&t["paid"]), outcome.amount_minor, "{t}");
                paid_total += cents(&t["paid"]);
            }
            _ => assert_eq!(cents(&t["paid"]), 0, "{t}"),
        }
        assert_eq!(t["notified"], true, "{t}");
    }
    assert_eq!(paid_total, cents(&status["paid"]));
    // What the gateway captured and kept of each ticket (captures less refunds,
    // as the simulator applied them) is what the ticket says it paid: a
    // declined payment was refunded, and nothing was charged beside a ticket.
    let applied: Value = reqwest::blocking::get(format!("{}/operations", stack.providers_url)).unwrap().json().unwrap();
    let mut kept: HashMap<&str, i64> = HashMap::new();
    for op in applied["operations"].as_array().unwrap().iter().filter(|op| op["batch_id"] == batch.as_str()) {
        let amount = op["amount"]["minor"].as_i64().unwrap_or(0);
        let ticket = kept.entry(op["ticket_id"].as_str().unwrap()).or_default();
        match op["operation"].as_str().unwrap() {
            "capture" => *ticket += amount,
            "refund" => *ticket -= amount,
            _ => {}
        }
    }
    for t in &tickets {
        assert_eq!(kept.get(t["ticket_id"].as_str().unwrap()).copied().unwrap_or(0), cents(&t["paid"]), "{t}");
    }
    assert_eq!(kept.values().sum::<i64>(), paid_total);
}

#[test]
fn a_faulty_scenario_still_ends_every_ticket_without_double_charges() {
    let data = tempfile::tempdir().unwrap();
    let env = [("TICKETPAY_RETRY_BASE_MS", "200"), ("TICKETPAY_RETRY_CAP_MS", "3000"), ("TICKETPAY_MAX_ATTEMPTS", "6")];
    let stack = Stack::start(StackOptions { scenario: "faulty", providers_url: None, data: data.path(), env: &env, extra_args: &[] });
    let batch = stack.submit(400, "1000000.00");
    let status = stack.wait_complete(&batch, Duration::from_secs(600));
    let stats = stats(&stack.providers_url);
    assert_batch_invariants(&status, &stats, 400);
    let faults: u64 = stats.as_object().unwrap().values().map(|s| s["errors"].as_u64().unwrap() + s["timeouts"].as_u64().unwrap()).sum();
    let throttled: u64 = stats.as_object().unwrap().values().map(|s| s["throttled"].as_u64().unwrap()).sum();
    assert!(faults > 0, "the scenario injected faults: {stats}");
    assert!(throttled > 0, "the providers answered 429s: {stats}");
    for s in stats.as_object().unwrap().values() {
        if let Some(d) = s.get("duplicates") {
            assert_eq!(d, 0, "no operation was applied twice: {s}");
        }
    }
    let mut retried = 0;
    for t in stack.all_tickets(&batch) {
        // Support can read every ticket's audit trail, retries and all.
        let full = stack.get(&format!("/api/batches/{batch}/tickets/{}", t["ticket_id"].as_str().unwrap()));
        let timeline = full["timeline"].as_array().unwrap();
        retried += usize::from(timeline.iter().any(|e| e["type"] == "retry_scheduled"));
        if t["status"] == "parked" {
            assert!(t["reason"].as_str().is_some_and(|r| !r.is_empty()), "a parked ticket says why: {t}");
        }
        if t["status"] == "paid" {
            assert!(cents(&t["paid"]) > 0);
        }
    }
    assert!(retried > 0, "some tickets were retried");
}

#[test]
fn every_message_delivered_twice_changes_nothing() {
    let data = tempfile::tempdir().unwrap();
    let stack = Stack::start(StackOptions {
        scenario: "zero-latency",
        providers_url: None,
        data: data.path(),
        env: &[],
        extra_args: &["--duplicate-deliveries"],
    });
    let batch = stack.submit(300, "15000.00");
    let status = stack.wait_complete(&batch, Duration::from_secs(300));
    let stats = stats(&stack.providers_url);
    assert_batch_invariants(&status, &stats, 300);
    let expected = predicted("zero-latency", 300);
    assert_eq!(status["counts"]["not_payable"], expected["not_payable"]);
    assert_eq!(status["counts"]["rejected"], expected["rejected"]);
    for (name, s) in stats.as_object().unwrap() {
        if let Some(d) = s.get("duplicates") {
            assert_eq!(d, 0, "{name} saw an operation twice: {s}");
        }
    }
    // Each ticket's audit trail shows each payment step applied once.
    for t in stack.all_tickets(&batch).iter().filter(|t| t["status"] == "paid").take(20) {
        let full = stack.get(&format!("/api/batches/{batch}/tickets/{}", t["ticket_id"].as_str().unwrap()));
        let applied: Vec<&str> = full["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "exchange" && e["outcome"] == "ok" && e["idempotency_key"].is_string() && e["operation"] != "status")
            .map(|e| e["operation"].as_str().unwrap())
            .collect();
        assert_eq!(applied, ["capture", "settle", "post", "issue", "notify"], "{full}");
    }
    // Every delivery, first and second, was settled: nothing left over, nothing dead-lettered.
    poll("every queue settled", Duration::from_secs(30), || {
        let queues = stack.queues();
        let settled = queues.as_object().unwrap().values().all(|q| q["active"] == 0 && q["locked"] == 0);
        settled.then_some(())
    });
    for (name, q) in stack.queues().as_object().unwrap() {
        assert_eq!(q["dead_lettered"], 0, "{name}: {q}");
    }
}

#[test]
fn parked_tickets_are_redriven_once_the_provider_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let down = dir.path().join("authority-down.toml");
    std::fs::write(&down, "description = \"the authority is down\"\n[providers.authority]\nerror_rate = 1.0\n").unwrap();
    let data = dir.path().join("data");
    let env = [("TICKETPAY_MAX_ATTEMPTS", "3"), ("TICKETPAY_RETRY_BASE_MS", "50"), ("TICKETPAY_RETRY_CAP_MS", "200")];
    let (mut sim, url) = simulator(down.to_str().unwrap());
    let opts = |url| StackOptions { scenario: "zero-latency", providers_url: Some(url), data: &data, env: &env, extra_args: &[] };
    let stack = Stack::start(opts(&url));
    let batch = stack.submit(30, "100000.00");
    let status = stack.wait_complete(&batch, Duration::from_secs(120));
    assert_eq!(status["counts"]["parked"], 30, "{status}");
    for t in stack.all_tickets(&batch) {
        assert_eq!(t["parked_stage"], "lookup", "{t}");
        let reason = t["reason"].as_str().unwrap();
        assert!(reason.contains("lookup") && reason.contains("after 3 attempts"), "{reason}");
    }
    let dry = stack.post(&format!("/api/batches/{batch}/redrive"), &serde_json::json!({"dry_run": true}));
    assert_eq!(dry["count"], 30);
    assert_eq!(stack.status(&batch)["counts"]["parked"], 30, "a dry run changes nothing");

    // The authority is back; the host restarts pointed at it, on the same data.
    drop(stack);
    sim.kill();
    let (_sim, url) = simulator("zero-latency");
    let stack = Stack::start(opts(&url));
    let redriven = stack.post(&format!("/api/batches/{batch}/redrive"), &serde_json::json!({}));
    assert_eq!(redriven["count"], 30);
    assert!(redriven["tickets"].as_array().unwrap().iter().all(|t| t["stage"] == "lookup"));
    let status = stack.wait_complete(&batch, Duration::from_secs(120));
    assert_batch_invariants(&status, &stats(&url), 30);
    assert_eq!(status["counts"]["parked"].as_u64().unwrap_or(0), 0, "{status}");
    let expected = predicted("zero-latency", 30);
    assert_eq!(status["counts"]["not_payable"].as_u64().unwrap_or(0), expected.get("not_payable").copied().unwrap_or(0));
    let again = stack.post(&format!("/api/batches/{batch}/redrive"), &serde_json::json!({}));
    assert_eq!(again["count"], 0, "nothing left to redrive");

    let t = stack.get(&format!("/api/batches/{batch}/tickets/T000001"));
    assert_eq!(t["redrives"], 1);
    let kinds: Vec<&str> = t["timeline"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    let redriven_at = kinds.iter().position(|k| *k == "redriven").expect("the redrive is in the audit trail");
    assert!(kinds[..redriven_at].contains(&"notified") && kinds[redriven_at..].contains(&"notified"), "told when parked, and again at the end: {kinds:?}");
}
