//! The money promises on the paths an unlucky day walks: an operation whose
//! answer was lost is never sent again without asking, a refusal that is not
//! the provider's decline never ends a payment, and nothing is charged twice
//! across parking, notifying and redriving.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const TICKETS: usize = 30;

/// A scenario with no latency, no declines and quick 504s, with `gateway` keys added.
fn scenario(dir: &std::path::Path, gateway: &str) -> String {
    let text = format!(
        r#"description = "safety"
seed = 11
[client]
timeout_ms = 2000
rate_headroom = 0.9
[outcomes]
nothing_due = 0.0
unknown_ticket = 0.0
amount_minor = [500, 20000]
[defaults]
latency_ms = [0, 0]
hang_ms = 50
[providers.gateway]
{gateway}
"#
    );
    let path = dir.join("safety.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Retries that give up within a second or two.
const QUICK_RETRIES: [(&str, &str); 3] =
    [("TICKETPAY_MAX_ATTEMPTS", "3"), ("TICKETPAY_RETRY_BASE_MS", "20"), ("TICKETPAY_RETRY_CAP_MS", "100")];

fn gateway_charges(providers: &str) -> (u64, u64) {
    let s = stats(providers);
    (s["gateway"]["charges"].as_u64().unwrap(), s["gateway"]["duplicate_charges"].as_u64().unwrap())
}

#[test]
fn a_capture_whose_answer_was_lost_is_asked_for_after_park_notify_and_redrive() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = scenario(dir.path(), "");
    let (_sim, providers) = simulator(&scenario);
    let stack = Stack::start(StackOptions {
        scenario: &scenario,
        providers_url: Some(&providers),
        data: &dir.path().join("data"),
        env: &QUICK_RETRIES,
        extra_args: &[],
    });
    // Every capture is applied, and its answer never arrives.
    outage(&providers, json!({"provider": "gateway", "kind": "hang_after_apply", "seconds": 600}));
    let batch = stack.submit(TICKETS, "100000.00");
    let status = stack.wait_complete(&batch, Duration::from_secs(120));
    assert_eq!(status["counts"]["parked"], TICKETS, "every ticket parked at the capture: {status}");
    let (charged, _) = gateway_charges(&providers);
    assert_eq!(charged as usize, TICKETS, "each capture was applied once");
    let parked = stack.all_tickets(&batch);

    // The gateway answers again; the operator redrives. Each capture is asked about, not sent again.
    outage(&providers, json!({"provider": "gateway", "kind": "hang_after_apply", "seconds": 0}));
    stack.post(&format!("/api/batches/{batch}/redrive"), &json!({}));
    let status = stack.wait_complete(&batch, Duration::from_secs(120));
    assert_eq!(status["counts"]["paid"], TICKETS, "{status}");
    assert_eq!(gateway_charges(&providers), (TICKETS as u64, 0), "no capture applied twice");
    assert_eq!(cents(&status["paid"]), cents(&status["budget"]) - cents(&status["remaining"]), "{status}");
    for t in parked {
        let reason = t["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("outcome unknown at gateway"), "a parked ticket said its capture's outcome was unknown: {t}");
    }
}

#[test]
fn a_refusal_that_is_not_a_decline_leaves_the_outcome_unknown() {
    let dir = tempfile::tempdir().unwrap();
    // Half the captures are applied and answered 500; half the status queries are refused 400/401/403/409.
    let scenario = scenario(dir.path(), "error_after_apply_rate = 0.5\nstatus_error_rate = 0.5");
    let (_sim, providers) = simulator(&scenario);
    let env = [("TICKETPAY_MAX_ATTEMPTS", "12"), ("TICKETPAY_RETRY_BASE_MS", "50"), ("TICKETPAY_RETRY_CAP_MS", "400")];
    let stack = Stack::start(StackOptions {
        scenario: &scenario,
        providers_url: Some(&providers),
        data: &dir.path().join("data"),
        env: &env,
        extra_args: &[],
    });
    // And for a while the gateway refuses every request with 409 (in progress) or 403 (our credentials).
    outage(&providers, json!({"provider": "gateway", "kind": "refuse", "status": 409, "seconds": 1}));
    let batch = stack.submit(TICKETS, "100000.00");
    let status = stack.wait_complete(&batch, Duration::from_secs(120));
    outage(&providers, json!({"provider": "gateway", "kind": "refuse", "status": 403, "seconds": 0}));
    let tickets = stack.all_tickets(&batch);
    for t in &tickets {
        assert_ne!(t["status"], "failed", "nothing declined this payment: {t}");
        if t["status"] == "parked" {
            assert!(t["reason"].as_str().unwrap().contains("outcome unknown at gateway"), "{t}");
            assert!(cents(&t["reserved"]) > 0, "an unknown outcome keeps its reservation: {t}");
        }
    }
    let paid = status["counts"]["paid"].as_u64().unwrap_or(0);
    let (charged, twice) = gateway_charges(&providers);
    assert_eq!(twice, 0, "no capture applied twice");
    let parked = status["counts"]["parked"].as_u64().unwrap_or(0);
    assert!(charged >= paid && charged <= paid + parked, "captures {charged}: {paid} paid, {parked} unknown: {status}");
    assert!(cents(&status["paid"]) + cents(&status["reserved"]) <= cents(&status["budget"]), "{status}");
}

#[test]
fn ticket_ids_that_are_no_path_segment_are_refused_naming_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let stack = Stack::start(StackOptions { scenario: "zero-latency", providers_url: None, data: dir.path(), env: &[], extra_args: &[] });
    for bad in [".", "..", "a/b", "a\\b", "a?b", "a#b", "a\u{7}b"] {
        let mut body = batch_json("ops", 3, "100.00");
        body["tickets"][1]["ticket_id"] = json!(bad);
        let r = stack.upload_json(&body, None);
        assert_eq!(r.status().as_u16(), 422, "{bad:?} refused");
        let problem: Value = r.json().unwrap();
        assert_eq!(problem["row"], 2, "{bad:?}: the row is named: {problem}");
        assert_eq!(problem["field"], "ticket_id", "{bad:?}: {problem}");
    }
    assert_eq!(stack.get("/api/batches")["batches"].as_array().unwrap().len(), 0, "nothing stored");
}

/// Every `x-request-id` recorded anywhere in these tickets' audit trails.
fn recorded_request_ids(stack: &Stack, batch: &str) -> std::collections::HashSet<String> {
    fn walk(v: &Value, out: &mut std::collections::HashSet<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("x-request-id", Value::String(id)) => {
                            out.insert(id.clone());
                        }
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = std::collections::HashSet::new();
    for t in stack.all_tickets(batch) {
        let id = t["ticket_id"].as_str().unwrap();
        walk(&stack.get(&format!("/api/batches/{batch}/tickets/{id}"))["timeline"], &mut out);
    }
    out
}

#[test]
fn what_a_provider_received_is_in_the_audit_trail_though_the_store_was_locked() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = scenario(dir.path(), "");
    let (_sim, providers) = simulator(&scenario);
    let data = dir.path().join("data");
    let stack = Stack::start(StackOptions { scenario: &scenario, providers_url: Some(&providers), data: &data, env: &[], extra_args: &[] });
    let batch = stack.submit(TICKETS, "100000.00");

    // Another process takes the store's write lock for longer than the handler waits for it.
    let lock = rusqlite::Connection::open(data.join("store.db")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let held = std::time::Instant::now();
    while stats(&providers)["authority"]["requests"].as_u64().unwrap() < TICKETS as u64 && held.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(12).saturating_sub(held.elapsed()));
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);

    stack.wait_complete(&batch, Duration::from_secs(180));
    let received: Value = reqwest::blocking::get(format!("{providers}/requests")).unwrap().json().unwrap();
    let received = received["requests"].as_array().unwrap();
    assert!(received.len() >= TICKETS, "{} requests", received.len());
    let ids: Vec<&str> =
        received.iter().map(|r| r["request_id"].as_str().unwrap_or_else(|| panic!("every request carries an id: {r}"))).collect();
    // Exchanges the store could not take wait in the spool, and are stored soon after it answers again.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let recorded = recorded_request_ids(&stack, &batch);
        let missing: Vec<_> = received.iter().zip(&ids).filter(|(_, id)| !recorded.contains(**id)).map(|(r, _)| r).collect();
        if missing.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{} requests are not in the audit trail, e.g. {}", missing.len(), missing[0]);
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_payment_cut_off_between_its_steps_sends_no_step_twice_and_keeps_every_answer() {
    let dir = tempfile::tempdir().unwrap();
    // Capture and settle answer at once; the ledger takes three seconds to post.
    let scenario = std::fs::read_to_string(scenario(dir.path(), ""))
        .unwrap()
        .replace("timeout_ms = 2000", "timeout_ms = 6000")
        .replace("hang_ms = 50\n", "hang_ms = 50\n[providers.ledger]\nlatency_ms = [3000, 3000]\n");
    let path = dir.path().join("slow-ledger.toml");
    std::fs::write(&path, scenario).unwrap();
    let scenario = path.to_str().unwrap().to_owned();
    let (_sim, providers) = simulator(&scenario);
    let stack = Stack::start(StackOptions {
        scenario: &scenario,
        providers_url: Some(&providers),
        data: &dir.path().join("data"),
        env: &[],
        extra_args: &[],
    });
    let batch = stack.submit(TICKETS, "100000.00");
    // Every payment has its capture and settle answered and its post on the way: the handler dies.
    poll("every post sent", Duration::from_secs(60), || (stats(&providers)["ledger"]["requests"].as_u64()? >= TICKETS as u64).then_some(()));
    for pid in stack.host.children() {
        // SAFETY: a handler process this test's host started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }

    let status = stack.wait_complete(&batch, Duration::from_secs(180));
    assert_eq!(status["counts"]["paid"], TICKETS, "{status}");
    for (name, s) in stats(&providers).as_object().unwrap() {
        assert_eq!(s.get("duplicates").and_then(Value::as_u64).unwrap_or(0), 0, "{name} was sent an applied operation again: {s}");
    }
    for t in stack.all_tickets(&batch) {
        let id = t["ticket_id"].as_str().unwrap();
        let view = stack.get(&format!("/api/batches/{batch}/tickets/{id}"));
        let exchanges: Vec<&Value> = view["timeline"].as_array().unwrap().iter().filter(|e| e["type"] == "exchange").collect();
        let sent = |provider: &str, operation: &str| -> Vec<&Value> {
            exchanges.iter().copied().filter(|e| e["provider"] == provider && e["operation"] == operation).collect()
        };
        for (provider, operation) in [("gateway", "capture"), ("settlement", "settle")] {
            let calls = sent(provider, operation);
            assert_eq!(calls.len(), 1, "{operation} sent once: {view}");
            assert_eq!(calls[0]["response"]["status"], 200, "its answer came before the handler died, and is kept: {view}");
        }
        let posts = sent("ledger", "post");
        assert!(posts.iter().any(|e| e["outcome"] == "interrupted"), "the post on its way when the handler died is recorded: {view}");
        assert_eq!(sent("receipt", "issue").len(), 1, "{view}");
    }
}
