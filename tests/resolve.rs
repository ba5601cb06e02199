//! An operator settles what the machine cannot, on the real stack: a refund
//! the gateway refused, captures whose outcome stayed unknown (applied, or
//! not), a ticket parked at lookup, a duplicate. Each action is open only
//! where the ticket's state allows it, is recorded with the key's name and the
//! note, and leaves the budget telling the truth.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use ticketpay::providers::ProviderName;
use ticketpay::providers::simulator::{Scenario, TicketOutcome, outcome_for};

const QUICK_RETRIES: [(&str, &str); 3] =
    [("TICKETPAY_MAX_ATTEMPTS", "3"), ("TICKETPAY_RETRY_BASE_MS", "20"), ("TICKETPAY_RETRY_CAP_MS", "100")];

/// `n` ticket ids starting with `prefix` whose simulated outcome is `wanted`.
fn ids(scenario: &Scenario, prefix: &str, n: usize, wanted: impl Fn(&TicketOutcome) -> bool) -> Vec<String> {
    (0..).map(|i| format!("{prefix}{i:04}")).filter(|id| wanted(&outcome_for(scenario, id))).take(n).collect()
}

fn upload(s: &Stack, client: &str, key: &str, ids: &[String]) -> String {
    let tickets: Vec<Value> = ids.iter().map(|id| json!({"ticket_id": id, "authority": "CITY-PARKING"})).collect();
    let body = json!({"client_id": client, "currency": "EUR", "budget": "10000.00", "tickets": tickets});
    ok_json(keyed(s, "POST", "/api/batches", key, Some(&body)))["batch_id"].as_str().unwrap().to_owned()
}

fn completed(s: &Stack, batch: &str) -> Value {
    poll("the batch to complete", Duration::from_secs(120), || {
        let status = ok_json(keyed(s, "GET", &format!("/api/batches/{batch}"), OPS_KEY, None));
        (status["status"] == "completed").then_some(status)
    })
}

fn resolve(s: &Stack, batch: &str, ticket: &str, key: &str, body: Value) -> reqwest::blocking::Response {
    keyed(s, "POST", &format!("/api/batches/{batch}/tickets/{ticket}/resolve"), key, Some(&body))
}

fn act(s: &Stack, batch: &str, ticket: &str, body: Value) -> Value {
    ok_json(resolve(s, batch, ticket, OPS_KEY, body))
}

fn ticket(s: &Stack, batch: &str, ticket: &str) -> Value {
    ok_json(keyed(s, "GET", &format!("/api/batches/{batch}/tickets/{ticket}"), OPS_KEY, None))
}

fn attention(s: &Stack, batch: &str) -> Vec<Value> {
    ok_json(keyed(s, "GET", &format!("/api/batches/{batch}/attention"), OPS_KEY, None))["tickets"].as_array().unwrap().clone()
}

fn resolved_events(t: &Value) -> Vec<Value> {
    t["timeline"].as_array().unwrap().iter().filter(|e| e["type"] == "resolved").cloned().collect()
}

/// The budget's promise: what is left is what was neither paid nor is still held.
fn assert_budget_adds_up(status: &Value) {
    assert_eq!(cents(&status["remaining"]), cents(&status["budget"]) - cents(&status["paid"]) - cents(&status["reserved"]), "{status}");
}

#[test]
fn each_resolve_action_settles_its_kind_of_ticket_and_only_that() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("app");
    std::fs::create_dir_all(&root).unwrap();
    app_root_with(&root, json!({ "TICKETPAY_API_KEYS": three_keys() }));
    let path = outcomes_scenario(dir.path(), "nothing_due = 0.0\nunknown_ticket = 0.0\npayment_failure = { settlement = 0.5 }", "");
    let scenario = Scenario::load(Some(&path)).unwrap();
    let s = Stack::start(StackOptions {
        scenario: &path,
        providers_url: None,
        data: &dir.path().join("data"),
        env: &QUICK_RETRIES,
        extra_args: &["--app-root", root.to_str().unwrap()],
    });
    let providers = s.providers_url.clone();
    let pays = |o: &TicketOutcome| o.pays();

    // A refund the gateway refuses for good: the declined payment cannot be undone by the machine.
    outage(&providers, json!({"provider": "gateway", "kind": "refuse_undo", "seconds": 600}));
    let refused = ids(&scenario, "RF", 2, |o| o.fails_at == Some(ProviderName::Settlement));
    let a = upload(&s, "acme", OPS_KEY, &refused);
    let status = completed(&s, &a);
    assert_eq!(status["counts"]["parked"], 2, "{status}");
    outage(&providers, json!({"provider": "gateway", "kind": "refuse_undo", "seconds": 0}));
    let listed = attention(&s, &a);
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["concerns"], json!(["refused_compensation"]));
    assert_eq!(listed[0]["actions"], json!(["undone_by_hand", "redrive"]));
    assert!(listed[0]["waiting_seconds"].as_i64().unwrap() >= 0 && listed[0]["ticket_url"].as_str().unwrap().ends_with(&refused[0]));

    // Refusals: the wrong action, a client's key, another client's key, bad input. Nothing changes.
    let p = problem(resolve(&s, &a, &refused[0], OPS_KEY, json!({"action": "give_up", "note": "stop"})), 409);
    assert!(p["detail"].as_str().unwrap().contains("open: undone_by_hand, redrive"), "{p}");
    problem(resolve(&s, &a, &refused[0], ACME_API_KEY, json!({"action": "undone_by_hand", "note": "x"})), 403);
    problem(resolve(&s, &a, &refused[0], GLOBEX_API_KEY, json!({"action": "undone_by_hand", "note": "x"})), 404);
    problem(keyed(&s, "GET", &format!("/api/batches/{a}/attention"), ACME_API_KEY, None), 403);
    problem(keyed(&s, "GET", &format!("/api/batches/{a}/attention"), GLOBEX_API_KEY, None), 404);
    assert_eq!(problem(resolve(&s, &a, &refused[0], OPS_KEY, json!({"action": "undone_by_hand"})), 400)["field"], "note");
    assert_eq!(problem(resolve(&s, &a, &refused[0], OPS_KEY, json!({"action": "undone_by_hand", "note": "  "})), 400)["field"], "note");
    assert_eq!(problem(resolve(&s, &a, &refused[0], OPS_KEY, json!({"action": "pay_twice", "note": "n"})), 400)["field"], "action");
    problem(resolve(&s, &a, "NO-SUCH", OPS_KEY, json!({"action": "redrive", "note": "n"})), 404);
    assert_eq!(ticket(&s, &a, &refused[0])["status"], "parked", "nothing half-stored");
    assert!(resolved_events(&ticket(&s, &a, &refused[0])).is_empty());

    // Undone by hand, then given up: it ends failed and its reservation goes back to the budget.
    let held = cents(&completed(&s, &a)["reserved"]);
    assert!(held > 0, "both parked tickets still hold their reservation");
    act(&s, &a, &refused[0], json!({"action": "undone_by_hand", "note": "refunded at the gateway's console", "provider_reference": "RF-MANUAL-1"}));
    let after = act(&s, &a, &refused[0], json!({"action": "give_up", "note": "the client was refunded"}));
    assert_eq!(after["status"], "failed");
    // Redriven instead: the gateway now takes the refund, and the ticket ends failed by itself.
    act(&s, &a, &refused[1], json!({"action": "redrive", "note": "the gateway undoes again"}));
    let status = completed(&s, &a);
    assert_eq!((status["counts"]["failed"].as_u64(), status["reserved"].as_str()), (Some(2), Some("0.00")), "{status}");
    assert_budget_adds_up(&status);
    let t = ticket(&s, &a, &refused[0]);
    assert_eq!(t["payment"]["steps_undone"], 1);
    let trail = resolved_events(&t);
    assert_eq!(trail.len(), 2);
    assert_eq!((trail[0]["action"].as_str(), trail[0]["by"].as_str()), (Some("undone_by_hand"), Some("operations")));
    assert_eq!(trail[0]["note"], "refunded at the gateway's console");
    assert_eq!(trail[0]["provider_reference"], "RF-MANUAL-1");
    assert!(attention(&s, &a).is_empty(), "nothing needs anyone now");

    // Captures that never answered, and were not applied: confirmed not applied, then given up or redriven.
    outage(&providers, json!({"provider": "gateway", "kind": "hang", "seconds": 600}));
    let lost = ids(&scenario, "NA", 2, pays);
    let b = upload(&s, "acme", ACME_API_KEY, &lost);
    assert_eq!(completed(&s, &b)["counts"]["parked"], 2);
    outage(&providers, json!({"provider": "gateway", "kind": "hang", "seconds": 0}));
    let listed = attention(&s, &b);
    assert_eq!(listed[0]["concerns"], json!(["unknown_outcome"]));
    assert_eq!(listed[0]["actions"], json!(["confirmed_applied", "confirmed_not_applied"]));
    let p = problem(resolve(&s, &b, &lost[0], OPS_KEY, json!({"action": "give_up", "note": "stop"})), 409);
    assert!(p["detail"].as_str().unwrap().contains("unknown_outcome"), "an unknown outcome is confirmed first: {p}");
    let p = problem(resolve(&s, &b, &lost[0], OPS_KEY, json!({"action": "confirmed_applied", "note": "n"})), 400);
    assert_eq!(p["field"], "provider_reference");
    for t in &lost {
        let after = act(&s, &b, t, json!({"action": "confirmed_not_applied", "note": "the gateway has no such capture"}));
        assert_eq!((after["status"].as_str(), after["actions"].clone()), (Some("parked"), json!(["redrive", "give_up"])));
    }
    act(&s, &b, &lost[0], json!({"action": "give_up", "note": "the client withdrew it"}));
    act(&s, &b, &lost[1], json!({"action": "redrive", "note": "send the capture now"}));
    let status = completed(&s, &b);
    assert_eq!((status["counts"]["failed"].as_u64(), status["counts"]["paid"].as_u64()), (Some(1), Some(1)), "{status}");
    assert_eq!(status["reserved"], "0.00");
    assert_budget_adds_up(&status);
    assert!(ticket(&s, &b, &lost[0])["reason"].as_str().unwrap().starts_with("given up by operations: the client withdrew it"));

    // A capture applied whose answer never came: confirmed applied with the gateway's reference, then redriven.
    outage(&providers, json!({"provider": "gateway", "kind": "hang_after_apply", "seconds": 600}));
    let applied = ids(&scenario, "AP", 1, pays);
    let c = upload(&s, "acme", OPS_KEY, &applied);
    assert_eq!(completed(&s, &c)["counts"]["parked"], 1);
    outage(&providers, json!({"provider": "gateway", "kind": "hang_after_apply", "seconds": 0}));
    let charges_before = stats(&providers)["gateway"]["charges"].as_u64().unwrap();
    let after = act(&s, &c, &applied[0], json!({"action": "confirmed_applied", "note": "seen in the gateway's report", "provider_reference": "gateway-report-77"}));
    assert_eq!(after["ticket"]["payment"]["steps_done"], 1);
    assert!(after["ticket"]["reason"].as_str().unwrap().contains("capture at gateway confirmed applied by operations (gateway-report-77)"));
    act(&s, &c, &applied[0], json!({"action": "redrive", "note": "go on with settle"}));
    let status = completed(&s, &c);
    assert_eq!(status["counts"]["paid"], 1, "{status}");
    assert_eq!(cents(&status["paid"]), outcome_for(&scenario, &applied[0]).amount_minor);
    let gateway = &stats(&providers)["gateway"];
    assert_eq!((gateway["charges"].as_u64().unwrap(), gateway["duplicate_charges"].as_u64().unwrap()), (charges_before, 0), "never captured again");

    // Parked at lookup: given up (nothing held), or redriven once the authority answers.
    outage(&providers, json!({"provider": "authority", "kind": "down", "seconds": 600}));
    let looked = ids(&scenario, "LK", 2, pays);
    let d = upload(&s, "acme", OPS_KEY, &looked);
    assert_eq!(completed(&s, &d)["counts"]["parked"], 2);
    outage(&providers, json!({"provider": "authority", "kind": "down", "seconds": 0}));
    assert_eq!(attention(&s, &d)[0]["concerns"], json!(["parked"]));
    problem(resolve(&s, &d, &looked[0], OPS_KEY, json!({"action": "confirmed_applied", "note": "n", "provider_reference": "x"})), 409);
    problem(resolve(&s, &d, &looked[0], OPS_KEY, json!({"action": "give_up", "note": "n", "provider_reference": "x"})), 400);
    let cli = std::process::Command::new(BIN)
        .args(["resolve", &d, &looked[0], "--action", "give_up", "--note", "the authority cancelled the fine", "--url", &s.url, "--key", OPS_KEY])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    assert!(String::from_utf8_lossy(&cli.stdout).contains("give_up → failed"), "{}", String::from_utf8_lossy(&cli.stdout));
    act(&s, &d, &looked[1], json!({"action": "redrive", "note": "the authority is back"}));
    let status = completed(&s, &d);
    assert_eq!((status["counts"]["failed"].as_u64(), status["counts"]["paid"].as_u64()), (Some(1), Some(1)), "{status}");
    assert_budget_adds_up(&status);

    // A duplicate of a ticket paid in batch c: acknowledged, it leaves the view, and stays a duplicate.
    let e = upload(&s, "acme", OPS_KEY, &applied);
    completed(&s, &e);
    let listed = attention(&s, &e);
    assert_eq!((listed[0]["concerns"].clone(), listed[0]["actions"].clone()), (json!(["duplicate"]), json!(["acknowledge"])));
    problem(resolve(&s, &e, &applied[0], OPS_KEY, json!({"action": "redrive", "note": "n"})), 409);
    act(&s, &e, &applied[0], json!({"action": "acknowledge", "note": "the client sent it twice"}));
    assert!(attention(&s, &e).is_empty());
    let t = ticket(&s, &e, &applied[0]);
    assert_eq!((t["status"].as_str(), t["resolution"]["action"].as_str()), (Some("duplicate"), Some("acknowledge")));
    problem(resolve(&s, &e, &applied[0], OPS_KEY, json!({"action": "acknowledge", "note": "again"})), 409);
}
