//! The whole pipeline on the Cosmos store code: `ticketpay bench --store
//! cosmos-emulator` pays a batch through every stage with the SDK's in-memory
//! emulator as the store, and reports what each stage's requests cost, in the
//! emulator's own request units. A build with `--features cosmos-emulator`
//! (as `scripts/test` builds).
#![cfg(feature = "cosmos-emulator")]

mod common;

use std::time::Duration;

use chrono::Utc;
use common::{END_STATES, Stack, StackOptions, assert_batch_invariants, audit_gaps, stats};
use serde_json::Value;
use ticketpay::config::{CHARGES_FILE, Emulation};
use ticketpay::domain::{AuthorityCode, BatchId, TicketId};
use ticketpay::providers::simulator::{Scenario, outcome_for};
use ticketpay::store::cosmos::CosmosStore;
use ticketpay::store::{PaymentClaim, Store};

/// `ticketpay bench --store cosmos-emulator ARGS`: its JSON line, once the table said what the store cost.
fn bench(args: &[&str]) -> Value {
    let args: Vec<&str> = ["--store", "cosmos-emulator"].into_iter().chain(args.iter().copied()).collect();
    let (table, report) = common::bench(&args);
    assert!(table.contains("store cosmos-emulator:"), "the table says what the store cost: {table}");
    report
}

fn assert_every_ticket_ended_once(report: &Value, tickets: u64) {
    assert_eq!(report["store"], "cosmos-emulator");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicate_charges"], 0, "{report}");
    assert_eq!(report["budget_held"], true, "{report}");
    let ended: u64 = END_STATES.iter().map(|s| report["end_states"][s].as_u64().unwrap()).sum();
    assert_eq!(ended, tickets, "every ticket at an end state: {report}");
    assert!(report["end_states"]["paid"].as_u64().unwrap() > tickets / 2, "most are paid: {report}");
}

#[test]
fn a_batch_runs_through_every_stage_on_the_cosmos_store_and_the_bench_says_what_each_stage_cost() {
    let report = bench(&["--tickets", "120", "--scenario", "zero-latency", "--baseline-tickets", "5"]);
    assert_every_ticket_ended_once(&report, 120);
    let by_stage = report["ru_per_ticket_by_stage"].as_object().expect("RU by stage");
    for stage in ["api", "lookup", "validate", "reserve", "pay", "notify"] {
        assert!(by_stage.get(stage).and_then(Value::as_f64).is_some_and(|ru| ru > 0.0), "{stage} was charged: {report}");
    }
    let total = report["ru_per_ticket"].as_f64().unwrap();
    let summed: f64 = by_stage.values().filter_map(Value::as_f64).sum();
    assert!((total - summed).abs() <= 0.1 * by_stage.len() as f64, "the stages add up to the total: {report}");
    assert!(report["hottest_partition_peak_ru_per_s"].as_f64().is_some_and(|p| p > 0.0), "{report}");
    assert_eq!(report["store_throttled"], 0, "nothing capped, nothing throttled: {report}");
    assert_eq!(report["store_unanswered"], 0, "no answer lost: {report}");
}

/// Two hundred payment claims at once against a container provisioned at 400
/// RU/s are answered 429, waited out, and every one of them lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_past_a_containers_throughput_are_refused_429_waited_out_and_all_land() {
    let store = CosmosStore::emulated(Emulation { ru_per_second: Some(400), ..Emulation::default() }).await.unwrap();
    let batch = BatchId::generate();
    let claims: Vec<PaymentClaim> = (0..200)
        .map(|i| PaymentClaim {
            authority: AuthorityCode::parse("CITY-PARKING").unwrap(),
            ticket_id: TicketId::parse(&format!("T{i:04}")).unwrap(),
            batch_id: batch.clone(),
            claimed_at: Utc::now(),
        })
        .collect();
    let taken = futures::future::join_all(claims.iter().map(|c| store.take_payment_claim(c, None))).await;
    assert!(taken.iter().all(Result::is_ok), "{:?}", taken.iter().find(|t| t.is_err()));
    for c in &claims {
        let held = store.payment_claim(&c.authority, &c.ticket_id).await.unwrap();
        assert_eq!(held.map(|h| h.value.batch_id), Some(batch.clone()), "{}", c.ticket_id);
    }
    let charges = store.charges().unwrap();
    assert!(charges.throttled > 0, "the cap was reached: {charges:?}");
    assert!(charges.by_operation["records create"] >= 200.0 * 5.8, "every create charged: {charges:?}");
}

/// The end state each ticket of `batch` must reach: what the scenario's providers decide for it.
fn assert_each_ticket_ends_as_its_providers_decide(stack: &Stack, batch: &str) {
    let scenario = Scenario::load(Some("zero-latency")).unwrap();
    for t in stack.all_tickets(batch) {
        let fate = outcome_for(&scenario, t["ticket_id"].as_str().unwrap());
        let expected = match fate {
            _ if fate.unknown || fate.nothing_due => "not_payable",
            _ if fate.rejected_by.is_some() => "rejected",
            _ if fate.fails_at.is_some() => "failed",
            _ => "paid",
        };
        assert_eq!(t["status"], expected, "each ticket ends as its providers decide, not as the store's faults do: {t}");
    }
}

/// A batch paid on the emulated store, and what the store counted.
struct Run {
    /// The stack's data folder, kept while it runs.
    _data: tempfile::TempDir,
    stack: Stack,
    batch: String,
    /// The batch's status once complete.
    status: Value,
    charges: Value,
}

/// 150 tickets through the stack on the emulated store with `faults`: every
/// promise of a completed batch holds, each ticket ends as its providers
/// decide, and every request a provider received is in its trail, once.
fn a_batch_ends_as_its_providers_decide_despite(faults: &[&str]) -> Run {
    let data = tempfile::tempdir().unwrap();
    let args: Vec<&str> = ["--store", "cosmos-emulator"].into_iter().chain(faults.iter().copied()).collect();
    let stack = Stack::start(StackOptions { scenario: "zero-latency", providers_url: None, data: data.path(), env: &[], extra_args: &args });
    let batch = stack.submit_retrying(150, "1000000.00");
    let status = stack.wait_complete(&batch, Duration::from_secs(300));
    assert_batch_invariants(&status, &stats(&stack.providers_url), 150);
    assert_each_ticket_ends_as_its_providers_decide(&stack, &batch);
    audit_gaps(&stack, std::slice::from_ref(&batch), &stack.providers_url).unwrap();
    let charges = serde_json::from_slice(&std::fs::read(data.path().join(CHARGES_FILE)).unwrap()).unwrap();
    Run { _data: data, stack, batch, status, charges }
}

/// The service answers a transactional batch past its partition's throughput
/// with 429 and applies none of it; the emulator never does, so here the SDK's
/// fault injection answers half of them so. Most writes of a ticket are
/// transactional batches (its changes with their audit entries, the budget's
/// movements, the upload): every ticket is still paid once, none is parked for
/// it, the budget adds up, and every request a provider received is in its
/// ticket's audit trail.
#[test]
fn transactional_batches_answered_429_are_waited_out_and_every_promise_holds() {
    let Run { charges, .. } = a_batch_ends_as_its_providers_decide_despite(&["--cosmos-throttled-batches", "50"]);
    assert!(charges["throttled"].as_u64().is_some_and(|n| n > 100), "about half the batches were answered 429: {charges}");
}

/// A network can lose the answer to a write the service applied. With one in
/// twenty answers to the records container's writes lost (the SDK's fault
/// injection reports a response timeout after the emulator applied the write):
/// each ticket ends as its providers decide, nothing is charged twice, every
/// request a provider received is in its ticket's audit trail, once, and no
/// provider was asked what an earlier try did: no lost answer left a ticket
/// claimed by a run that thought its claim had failed.
#[test]
fn writes_whose_answers_are_lost_change_no_outcome_and_record_each_exchange_once() {
    let Run { stack, batch, charges, .. } = a_batch_ends_as_its_providers_decide_despite(&["--cosmos-lost-answers", "5"]);
    assert!(charges["unanswered"].as_u64().is_some_and(|n| n > 10), "writes whose answers were lost were found landed: {charges}");
    for t in stack.all_tickets(&batch) {
        let full = stack.get(&format!("/api/batches/{batch}/tickets/{}", t["ticket_id"].as_str().unwrap()));
        let asked = full["timeline"].as_array().unwrap().iter().find(|e| e["type"] == "exchange" && e["operation"] == "status");
        assert!(asked.is_none(), "a provider was asked what an earlier try did: {asked:?}");
    }
}

/// A container provisioned at 1,000 RU/s is charged for every request, as in
/// Azure: transactional batches, reads and queries as well as single writes.
/// Past its rate they are answered 429 and waited out. Every promise holds, and
/// the batch took as long as its request units at that rate need: the cap held.
#[test]
fn a_batch_on_a_capped_container_keeps_every_promise_and_takes_the_time_the_cap_allows() {
    const CAP: u32 = 1000;
    let Run { status, charges, .. } = a_batch_ends_as_its_providers_decide_despite(&["--cosmos-ru-per-s", &CAP.to_string()]);
    assert!(charges["throttled"].as_u64().is_some_and(|n| n > 0), "the cap was reached: {charges}");
    let records: f64 = charges["by_operation"].as_object().unwrap().iter().filter(|(k, _)| k.starts_with("records ")).filter_map(|(_, ru)| ru.as_f64()).sum();
    let time = |field: &str| chrono::DateTime::parse_from_rfc3339(status[field].as_str().unwrap()).unwrap();
    let took = (time("completed_at") - time("created_at")).as_seconds_f64();
    // The container may take one second's worth at once, then its rate; the
    // status polls around the batch are counted too.
    let least = 0.9 * records / f64::from(CAP) - 1.0;
    assert!(took >= least, "{records:.0} RU at {CAP} RU/s take at least {least:.1} s; the batch took {took:.1} s");
}
