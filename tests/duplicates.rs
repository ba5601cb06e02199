//! A ticket (its authority and ticket id) is paid once, whichever batches it
//! comes in: a copy in another batch ends `duplicate`, naming the batch that
//! pays it to whoever may see that batch, and reaches no payment provider.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use ticketpay::providers::simulator::{Scenario, outcome_for};

const TICKETS: usize = 50;
const OPERATOR_KEY: &str = "duplicates-operator-key";
const ACME_KEY: &str = "duplicates-acme-key";
const GLOBEX_KEY: &str = "duplicates-globex-key";

/// Every ticket payable and every payment accepted: where a ticket ends depends
/// only on the other batches it is in.
const SCENARIO: &str = r#"
description = "Every ticket payable, no faults"
seed = 11
[outcomes]
nothing_due = 0.0
unknown_ticket = 0.0
amount_minor = [500, 20000]
rejected = {}
payment_failure = {}
[defaults]
latency_ms = [0, 2]
"#;

struct Run {
    stack: Stack,
    scenario: Scenario,
    _dir: tempfile::TempDir,
}

fn start(env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all-payable.toml");
    std::fs::write(&path, SCENARIO).unwrap();
    let scenario = path.to_str().unwrap().to_owned();
    let data = dir.path().join("data");
    let stack = Stack::start(StackOptions { scenario: &scenario, providers_url: None, data: &data, env, extra_args: &[] });
    Run { stack, scenario: Scenario::load(Some(&scenario)).unwrap(), _dir: dir }
}

fn keys() -> String {
    let digest = ticketpay::api::access::key_digest;
    json!([
        { "name": "operations", "role": "operator", "sha256": digest(OPERATOR_KEY) },
        { "name": "acme-erp", "role": "client", "client_id": "acme", "sha256": digest(ACME_KEY) },
        { "name": "globex-erp", "role": "client", "client_id": "globex", "sha256": digest(GLOBEX_KEY) },
    ])
    .to_string()
}

fn get(s: &Stack, path: &str, key: &str) -> Value {
    let r = s.http.get(format!("{}{path}", s.url)).header("x-functions-key", key).send().unwrap();
    assert!(r.status().is_success(), "GET {path}: {}", r.status());
    r.json().unwrap()
}

/// Takes the stack's client and address only, so uploads can run on threads of their own.
fn upload((http, url): (&reqwest::blocking::Client, &str), body: &Value, key: &str, idempotency_key: Option<&str>) -> String {
    let mut req = http.post(format!("{url}/api/batches")).header("x-functions-key", key).json(body);
    if let Some(k) = idempotency_key {
        req = req.header("Idempotency-Key", k);
    }
    let r = req.send().unwrap();
    assert_eq!(r.status().as_u16(), 202, "upload accepted");
    r.json::<Value>().unwrap()["batch_id"].as_str().unwrap().to_owned()
}

fn wait_complete(s: &Stack, batch: &str, key: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = get(s, &format!("/api/batches/{batch}"), key);
        if status["status"] == "completed" {
            return status;
        }
        assert!(Instant::now() < deadline, "batch not complete in time: {status}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tickets(s: &Stack, batch: &str, key: &str) -> Vec<Value> {
    let page = get(s, &format!("/api/batches/{batch}/tickets?limit=1000"), key);
    assert!(page["next_cursor"].is_null());
    page["tickets"].as_array().unwrap().clone()
}

/// Whether the gateway applied the capture of `ticket` in `batch`, asked by its idempotency key.
fn captured(s: &Stack, batch: &str, ticket: &str) -> bool {
    let r = reqwest::blocking::get(format!("{}/gateway/operations/{batch}:{ticket}:capture", s.providers_url)).unwrap();
    match r.status().as_u16() {
        200 => true,
        404 => false,
        other => panic!("the gateway answered {other} for {batch}:{ticket}"),
    }
}

#[test]
fn tickets_uploaded_twice_at_once_are_paid_once_and_the_copies_end_duplicate() {
    let keys = keys();
    let run = start(&[("TICKETPAY_API_KEYS", keys.as_str())]);
    let s = &run.stack;
    let body = batch_json("acme", TICKETS, "10000.00");
    let api = (&s.http, s.url.as_str());
    let (first, second) = std::thread::scope(|scope| {
        let a = scope.spawn(|| upload(api, &body, ACME_KEY, Some("acme-upload-1")));
        let b = scope.spawn(|| upload(api, &body, ACME_KEY, None));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(first, second, "two batches");
    let batches = [first.as_str(), second.as_str()];
    let status: Vec<Value> = batches.iter().map(|b| wait_complete(s, b, ACME_KEY)).collect();
    let listed: Vec<Vec<Value>> = batches.iter().map(|b| tickets(s, b, ACME_KEY)).collect();

    let mut paid_in = [0i64; 2];
    let mut paid_count = [0u64; 2];
    assert!(listed.iter().all(|l| l.len() == TICKETS), "each batch lists all {TICKETS} tickets");
    for (a, b) in listed[0].iter().zip(&listed[1]) {
        let id = a["ticket_id"].as_str().unwrap();
        assert_eq!(b["ticket_id"], id);
        let (paid, copy, payer, other) = match (a["status"].as_str().unwrap(), b["status"].as_str().unwrap()) {
            ("paid", "duplicate") => (a, b, 0, 1),
            ("duplicate", "paid") => (b, a, 1, 0),
            ends => panic!("ticket {id} ended {ends:?}: paid in exactly one batch, duplicate in the other"),
        };
        let amount = outcome_for(&run.scenario, id).amount_minor;
        assert_eq!(cents(&paid["paid"]), amount, "{paid}");
        paid_in[payer] += amount;
        paid_count[payer] += 1;
        assert_eq!(copy["duplicate_of"], batches[payer], "the same client is told which batch pays it: {copy}");
        assert!(copy["reason"].as_str().unwrap().contains(batches[payer]), "{copy}");
        assert_eq!((cents(&copy["paid"]), cents(&copy["reserved"])), (0, 0), "{copy}");
        assert_eq!(copy["payment"]["steps_done"], 0, "{copy}");
        assert!(captured(s, batches[payer], id) && !captured(s, batches[other], id), "one capture for {id}");
    }
    for (i, st) in status.iter().enumerate() {
        assert_eq!(st["counts"]["paid"].as_u64().unwrap_or(0), paid_count[i], "{st}");
        assert_eq!(st["counts"]["duplicate"].as_u64().unwrap_or(0), TICKETS as u64 - paid_count[i], "{st}");
        assert_eq!(cents(&st["paid"]), paid_in[i], "{st}");
        assert_eq!(cents(&st["reserved"]), 0, "duplicates hold nothing: {st}");
        assert_eq!(cents(&st["remaining"]), 1_000_000 - paid_in[i], "the budget lost only what was paid: {st}");
    }
    let counters = stats(&s.providers_url);
    assert_batch_invariants(&status[0], &counters, TICKETS as u64);
    assert_batch_invariants(&status[1], &counters, TICKETS as u64);
    for provider in ["gateway", "settlement", "ledger", "receipt"] {
        assert_eq!(counters[provider]["applied"], TICKETS, "{provider} applied one operation per ticket: {counters}");
    }
    assert_eq!(counters["gateway"]["charges"], TICKETS, "{counters}");

    // Another client uploads the same tickets: paid elsewhere, and it is not told where.
    let globex = upload(api, &batch_json("globex", TICKETS, "10000.00"), GLOBEX_KEY, None);
    let done = wait_complete(s, &globex, GLOBEX_KEY);
    assert_eq!(done["counts"]["duplicate"], TICKETS, "{done}");
    assert_eq!(cents(&done["remaining"]), 1_000_000, "{done}");
    let as_operator = tickets(s, &globex, OPERATOR_KEY);
    for (t, seen_by_operator) in tickets(s, &globex, GLOBEX_KEY).iter().zip(&as_operator) {
        assert!(t["duplicate_of"].is_null(), "another client's batch id stays hidden: {t}");
        let reason = t["reason"].as_str().unwrap();
        assert!(reason.contains("another batch") && !batches.iter().any(|b| reason.contains(b)), "{reason}");
        let id = t["ticket_id"].as_str().unwrap();
        let payer = if listed[0].iter().any(|x| x["ticket_id"] == id && x["status"] == "paid") { batches[0] } else { batches[1] };
        assert_eq!(seen_by_operator["duplicate_of"], payer, "an operator sees which batch pays it: {seen_by_operator}");
        let one = get(s, &format!("/api/batches/{globex}/tickets/{id}"), GLOBEX_KEY);
        assert!(one["duplicate_of"].is_null(), "{one}");
        assert!(!one.to_string().contains(payer), "nothing in the ticket's view names the other client's batch: {one}");
    }
    assert_eq!(stats(&s.providers_url)["gateway"]["charges"], TICKETS, "nothing more was charged");
}

#[test]
fn a_ticket_that_ended_over_budget_is_paid_in_the_next_batch() {
    let run = start(&[]);
    let s = &run.stack;
    let first = s.submit(10, "1.00");
    let status = s.wait_complete(&first, Duration::from_secs(120));
    assert_eq!(status["counts"]["over_budget"], 10, "every ticket costs more than 1.00: {status}");

    let second = s.submit(10, "10000.00");
    let status = s.wait_complete(&second, Duration::from_secs(120));
    assert_eq!(status["counts"]["paid"], 10, "{status}");
    let due: i64 = (1..=10).map(|i| outcome_for(&run.scenario, &format!("T{i:06}")).amount_minor).sum();
    assert_eq!(cents(&status["paid"]), due, "{status}");
    assert_batch_invariants(&status, &stats(&s.providers_url), 10);
}
