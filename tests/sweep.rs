//! No ticket waits silently: messages dead-lettered or lost while a provider
//! was failing are sent again by the timer-triggered sweep, the batch says
//! `stalled` meanwhile, and every ticket ends with no operator action.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const TICKETS: usize = 40;

#[test]
fn tickets_whose_messages_were_dead_lettered_or_lost_move_again_by_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let (_sim, providers) = simulator("zero-latency");
    let env = [
        ("TICKETPAY_SWEEP_OVERDUE_SECS", "2"),
        ("TICKETPAY_MAX_ATTEMPTS", "100"),
        ("TICKETPAY_RETRY_BASE_MS", "500"),
        ("TICKETPAY_RETRY_CAP_MS", "1000"),
    ];
    let data = dir.path().join("data");
    let stack = Stack::start(StackOptions { scenario: "zero-latency", providers_url: Some(&providers), data: &data, env: &env, extra_args: &[] });

    // The registry fails every check: the tickets wait at validate, each with a retry queued.
    outage(&providers, json!({"provider": "registry", "kind": "down", "seconds": 600}));
    let batch = stack.submit(TICKETS, "100000.00");
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.status(&batch)["counts"]["validate"].as_u64().unwrap_or(0) < (TICKETS as u64) * 9 / 10 {
        assert!(Instant::now() < deadline, "tickets reach validate: {}", stack.status(&batch));
        std::thread::sleep(Duration::from_millis(100));
    }

    // Half their queued messages are dead-lettered, the other half lost; then the registry is back.
    let queues = rusqlite::Connection::open(data.join("queues.db")).unwrap();
    queues.busy_timeout(Duration::from_secs(10)).unwrap();
    let idle = "queue = 'ticket-validate' AND lock_token IS NULL AND dead_letter = 0";
    // Between attempts: most retries are queued, not being delivered.
    let count = |q: &rusqlite::Connection| -> usize { q.query_row(&format!("SELECT COUNT(*) FROM messages WHERE {idle}"), [], |r| r.get::<_, i64>(0)).unwrap() as usize };
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&queues) < TICKETS * 3 / 4 {
        assert!(Instant::now() < deadline, "retries queued: {}", count(&queues));
        std::thread::sleep(Duration::from_millis(20));
    }
    let dead = queues
        .execute(&format!("UPDATE messages SET dead_letter = 1, dl_reason = 'MaxDeliveryCountExceeded' WHERE {idle} AND seq % 2 = 0"), [])
        .unwrap();
    let lost = queues.execute(&format!("DELETE FROM messages WHERE {idle}"), []).unwrap();
    drop(queues);
    assert!(dead + lost > TICKETS / 2, "{dead} dead-lettered, {lost} lost");
    outage(&providers, json!({"provider": "registry", "kind": "down", "seconds": 0}));
    let back = Instant::now();

    // Meanwhile the batch says it is stalled; within two minutes every ticket has moved on and ended.
    let mut seen_stalled = false;
    let status = loop {
        let status = stack.status(&batch);
        seen_stalled |= status["status"] == "stalled" && status["stalled"].as_u64().unwrap_or(0) > 0;
        if status["status"] == "completed" {
            break status;
        }
        assert!(back.elapsed() < Duration::from_secs(120), "every ticket moves again within two minutes: {status}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(seen_stalled, "the batch showed its stalled tickets before the sweep moved them");
    assert_batch_invariants(&status, &stats(&providers), TICKETS as u64);
    assert_eq!(status["counts"]["parked"].as_u64().unwrap_or(0), 0, "no ticket needed an operator: {status}");
    assert!(status["completed_at"].is_string(), "{status}");
    let listed = stack.get("/api/batches");
    let item = listed["batches"].as_array().unwrap().iter().find(|b| b["batch_id"] == batch.as_str()).unwrap().clone();
    assert_eq!((item["status"].clone(), item["completed_at"].clone()), (status["status"].clone(), status["completed_at"].clone()), "the list agrees");
}

/// An upload stored while Service Bus was unreachable says so in every view,
/// and is queued by the sweep once the bus is back, without the client.
#[test]
fn an_upload_stored_while_the_bus_was_down_is_queued_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let (_sim, providers) = simulator("zero-latency");
    let env = [("TICKETPAY_SWEEP_OVERDUE_SECS", "2")];
    let stack = Stack::start(StackOptions { scenario: "zero-latency", providers_url: Some(&providers), data: dir.path(), env: &env, extra_args: &[] });

    let r = stack.http.post(format!("{}/admin/faults", stack.url)).json(&json!({"bus_unreachable_seconds": 5})).send().unwrap();
    assert!(r.status().is_success(), "{:?}", r.text());
    let p = problem(stack.upload_json(&batch_json("ops", TICKETS, "100000.00"), None), 503);
    assert!(p["type"].as_str().unwrap().ends_with("/not-queued"), "{p}");
    let back = Instant::now() + Duration::from_secs(5);

    // Stored, and visibly not queued: in the list and in the batch's own view.
    let listed = stack.get("/api/batches");
    let item = listed["batches"].as_array().unwrap().iter().find(|b| b["queued"] == false).expect("the stored upload is listed").clone();
    let batch = item["batch_id"].as_str().unwrap().to_owned();
    assert!(p["detail"].as_str().unwrap().contains(&batch), "the problem names the stored batch: {p}");
    assert_eq!(p["batch_id"], batch.as_str(), "and gives its id to follow: {p}");
    let status = stack.status(&batch);
    assert_eq!((status["queued"].clone(), status["tickets"].clone()), (json!(false), json!(TICKETS)), "{status}");

    // Once the bus is back the sweep queues it; every ticket ends, nothing sent twice.
    let status = loop {
        let status = stack.status(&batch);
        if status["status"] == "completed" {
            break status;
        }
        assert!(Instant::now() < back + Duration::from_secs(120), "the upload moves within two minutes of the bus coming back: {status}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status["queued"], true, "{status}");
    assert_batch_invariants(&status, &stats(&providers), TICKETS as u64);
    assert_eq!(stats(&providers)["authority"]["requests"].as_u64().unwrap(), TICKETS as u64, "each ticket looked up once");
}
