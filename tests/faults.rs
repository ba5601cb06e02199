//! The fault suite: providers that go down for a minute, hang, or answer
//! nothing but 429s, in the middle of a batch. Every ticket still ends; a
//! ticket that gave up says why and where; once the providers are back,
//! redrive sends each parked ticket back in where it stopped, and says so in
//! its audit trail.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const TICKETS: usize = 1000;

#[test]
fn a_provider_down_for_a_minute_parks_tickets_that_redrive_then_pays() {
    let data = tempfile::tempdir().unwrap();
    let (_sim, providers) = simulator("realistic");
    // Give up after about 7 s of retries, so the minute-long outage parks tickets.
    let env = [("TICKETPAY_MAX_ATTEMPTS", "4"), ("TICKETPAY_RETRY_BASE_MS", "500"), ("TICKETPAY_RETRY_CAP_MS", "4000")];
    let stack = Stack::start(StackOptions { scenario: "realistic", providers_url: Some(&providers), data: data.path(), env: &env, extra_args: &[] });

    outage(&providers, json!({"provider": "gateway", "kind": "down", "seconds": 60}));
    outage(&providers, json!({"provider": "authority", "kind": "hang", "seconds": 3}));
    outage(&providers, json!({"provider": "sanctions", "kind": "throttle", "seconds": 15}));
    let batch = stack.submit(TICKETS, "1000000.00");
    let status = stack.wait_complete(&batch, Duration::from_secs(300));
    let during = stats(&providers);
    assert!(during["gateway"]["errors"].as_u64().unwrap() > 0, "the gateway was down: {during}");
    assert!(during["authority"]["timeouts"].as_u64().unwrap() > 0, "the authority hung: {during}");
    assert!(during["sanctions"]["throttled"].as_u64().unwrap() > 0, "sanctions shed load: {during}");

    // Every ticket ended, most parked at the payment the gateway could not take.
    let parked_at_pay = parked(&stack, &batch).iter().filter(|t| t["parked_stage"] == "pay").count();
    assert!(parked_at_pay > TICKETS / 2, "{parked_at_pay} parked at pay: {status}");
    assert_eq!(status["counts"]["paid"].as_u64().unwrap_or(0), 0, "nothing paid while the gateway was down: {status}");
    for t in parked(&stack, &batch) {
        let (stage, reason) = (t["parked_stage"].as_str().unwrap(), t["reason"].as_str().unwrap_or(""));
        assert!(reason.contains(stage) && reason.contains("after 4 attempts"), "a parked ticket says where and why: {t}");
    }

    // A dry run lists what would re-enter, and where; it changes nothing.
    let before = parked(&stack, &batch);
    let dry = stack.post(&format!("/api/batches/{batch}/redrive"), &json!({"dry_run": true}));
    assert_eq!(dry["count"].as_u64().unwrap() as usize, before.len());
    let stopped_at: std::collections::HashMap<&str, &Value> =
        before.iter().map(|t| (t["ticket_id"].as_str().unwrap(), &t["parked_stage"])).collect();
    for listed in dry["tickets"].as_array().unwrap() {
        let id = listed["ticket_id"].as_str().unwrap();
        assert_eq!(&listed["stage"], stopped_at[id], "{id} re-enters where it stopped");
    }
    assert_eq!(parked(&stack, &batch).len(), before.len(), "a dry run changes nothing");

    // The gateway is back; the parked tickets go back in and are paid.
    outage(&providers, json!({"provider": "gateway", "kind": "down", "seconds": 0}));
    let redriven = stack.post(&format!("/api/batches/{batch}/redrive"), &json!({}));
    assert_eq!(redriven["count"].as_u64().unwrap() as usize, before.len());
    let status = stack.wait_complete(&batch, Duration::from_secs(300));
    assert_batch_invariants(&status, &stats(&providers), TICKETS as u64);
    assert_eq!(status["counts"]["parked"].as_u64().unwrap_or(0), 0, "{status}");
    assert!(status["counts"]["paid"].as_u64().unwrap() > (TICKETS as u64) * 9 / 10, "{status}");
    let after = stats(&providers);
    for s in after.as_object().unwrap().values() {
        assert_eq!(s.get("duplicates").and_then(Value::as_u64).unwrap_or(0), 0, "nothing applied twice: {s}");
    }
    let told = after["notifier"]["applied"].as_u64().unwrap() as usize;
    assert_eq!(told, TICKETS + before.len(), "each client told once per end, parked and then paid: {after}");

    // The audit trail tells each story: the outage, the parking, the redrive,
    // then the payment (or the gateway's decline, which releases the budget).
    let mut paid_after_redrive = 0;
    for parked in before.iter().filter(|t| t["parked_stage"] == "pay").take(50) {
        let t = stack.get(&format!("/api/batches/{batch}/tickets/{}", parked["ticket_id"].as_str().unwrap()));
        assert_eq!(t["redrives"], 1, "{t}");
        let timeline = t["timeline"].as_array().unwrap();
        let kinds: Vec<&str> = timeline.iter().map(|e| e["type"].as_str().unwrap()).collect();
        let at = kinds.iter().position(|k| *k == "redriven").expect("the redrive is in the audit trail");
        assert_eq!(timeline[at]["to_stage"], "pay", "{}", timeline[at]);
        assert!(kinds[..at].contains(&"retry_scheduled"), "the retries before parking: {kinds:?}");
        assert!(!kinds[..at].contains(&"paid"), "nothing paid before the redrive: {kinds:?}");
        match t["status"].as_str().unwrap() {
            "paid" => {
                assert!(kinds[at..].contains(&"paid"), "paid after the redrive: {kinds:?}");
                paid_after_redrive += 1;
            }
            "failed" => assert!(kinds[at..].contains(&"budget_released"), "a decline after the redrive releases its budget: {kinds:?}"),
            other => panic!("a redriven ticket ended {other}: {kinds:?}"),
        }
    }
    assert!(paid_after_redrive > 40, "{paid_after_redrive} of the first 50 parked at pay were paid after the redrive");
}

/// A call the handler stopped waiting for is still in flight at the provider
/// until the provider answers it; sending another in its place would go past
/// the provider's concurrency limit.
#[test]
fn calls_that_hang_past_the_client_timeout_keep_their_place_in_flight() {
    let data = tempfile::tempdir().unwrap();
    let (_sim, providers) = simulator("realistic");
    let stack = Stack::start(StackOptions { scenario: "realistic", providers_url: Some(&providers), data: data.path(), env: &[], extra_args: &[] });

    // Each hung lookup is held 10 s, past the 3 s client timeout.
    outage(&providers, json!({"provider": "authority", "kind": "hang", "seconds": 8}));
    let batch = stack.submit(400, "1000000.00");
    let status = stack.wait_complete(&batch, Duration::from_secs(240));
    let after = stats(&providers);
    assert!(after["authority"]["timeouts"].as_u64().unwrap() > 0, "the authority hung: {after}");
    assert_limits_held(&after);
    assert_batch_invariants(&status, &after, 400);
}

fn parked(stack: &Stack, batch: &str) -> Vec<Value> {
    stack.all_tickets(batch).into_iter().filter(|t| t["status"] == "parked").collect()
}
