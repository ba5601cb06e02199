//! Reconciliation on the real stack: a run through faulty providers agrees
//! with them on every operation; captures the gateway applied and never
//! answered are found (the CLI exits 1), shown as needing attention, settled
//! by an operator, and the next run agrees. Each run is recorded.

mod common;

use std::process::Output;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const QUICK_RETRIES: [(&str, &str); 3] =
    [("TICKETPAY_MAX_ATTEMPTS", "3"), ("TICKETPAY_RETRY_BASE_MS", "20"), ("TICKETPAY_RETRY_CAP_MS", "100")];

fn stack(dir: &std::path::Path, scenario: &str, env: &[(&str, &str)]) -> Stack {
    let root = dir.join("app");
    std::fs::create_dir_all(&root).unwrap();
    app_root_with(&root, json!({ "TICKETPAY_API_KEYS": three_keys() }));
    Stack::start(StackOptions { scenario, providers_url: None, data: &dir.join("data"), env, extra_args: &["--app-root", root.to_str().unwrap()] })
}

fn completed(s: &Stack, batch: &str) -> Value {
    poll("the batch to complete", Duration::from_secs(180), || {
        let status = ok_json(keyed(s, "GET", &format!("/api/batches/{batch}"), OPS_KEY, None));
        (status["status"] == "completed").then_some(status)
    })
}

fn upload(s: &Stack, client: &str, prefix: &str, n: usize) -> String {
    let tickets: Vec<Value> = (0..n).map(|i| json!({"ticket_id": format!("{prefix}{i:04}"), "authority": "STATE-TOLLS"})).collect();
    let body = json!({"client_id": client, "currency": "EUR", "budget": "100000.00", "tickets": tickets});
    ok_json(keyed(s, "POST", "/api/batches", OPS_KEY, Some(&body)))["batch_id"].as_str().unwrap().to_owned()
}

fn reconcile_cli(s: &Stack, batch: &str) -> (Output, Value) {
    let out = std::process::Command::new(BIN).args(["reconcile", batch, "--json", "--url", &s.url, "--key", OPS_KEY]).output().unwrap();
    let run = serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap_or(Value::Null);
    (out, run)
}

fn total(run: &Value, field: &str) -> u64 {
    run["providers"].as_object().unwrap().values().map(|c| c[field].as_u64().unwrap()).sum()
}

#[test]
fn a_faulty_run_agrees_with_every_provider() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "error_rate = 0.05\ntimeout_rate = 0.05\nerror_after_apply_rate = 0.03\nthrottle_rate = 0.02";
    let scenario = outcomes_scenario(dir.path(), "nothing_due = 0.05\npayment_failure = { gateway = 0.05, settlement = 0.05, ledger = 0.05 }", extra);
    let s = stack(dir.path(), &scenario, &[]);
    let batch = upload(&s, "acme", "FT", 150);
    let status = completed(&s, &batch);
    let parked = ok_json(keyed(&s, "GET", &format!("/api/batches/{batch}/tickets?status=parked"), OPS_KEY, None))["tickets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| ok_json(keyed(&s, "GET", &format!("/api/batches/{batch}/tickets/{}", t["ticket_id"].as_str().unwrap()), OPS_KEY, None)))
        .collect::<Vec<_>>();
    assert_eq!(status["counts"]["parked"].as_u64().unwrap_or(0), 0, "{status}\nparked: {parked:?}");
    let run = ok_json(keyed(&s, "GET", &format!("/api/batches/{batch}/reconciliation"), OPS_KEY, None));
    assert_eq!(run["disagreements"], json!([]), "{run}");
    assert_eq!(run["agrees"], true);
    let paid = status["counts"]["paid"].as_u64().unwrap();
    assert!(run["providers"]["receipt"]["agree"].as_u64().unwrap() >= paid, "every paid ticket's receipt was asked about: {run}");
    assert!(total(&run, "agree") >= 4 * paid);
    assert_eq!(total(&run, "agree"), run["checked"].as_u64().unwrap());
    // Only one provider, when asked; the report is recorded with who ran it.
    let gateway_only = ok_json(keyed(&s, "GET", &format!("/api/batches/{batch}/reconciliation?provider=gateway"), OPS_KEY, None));
    assert_eq!(gateway_only["providers"].as_object().unwrap().keys().collect::<Vec<_>>(), ["gateway"]);
    assert_eq!(problem(keyed(&s, "GET", &format!("/api/batches/{batch}/reconciliation?provider=fraud"), OPS_KEY, None), 400)["field"], "provider");
    let runs = ok_json(keyed(&s, "GET", &format!("/api/batches/{batch}/reconciliations"), OPS_KEY, None))["runs"].as_array().unwrap().clone();
    assert_eq!(runs.len(), 2);
    assert_eq!((runs[0]["by"].as_str(), runs[0]["provider"].as_str(), runs[1]["agrees"].as_bool()), (Some("operations"), Some("gateway"), Some(true)));
    // A client may not reconcile, even its own batch; another client's is not found.
    for path in ["reconciliation", "reconciliations"] {
        problem(keyed(&s, "GET", &format!("/api/batches/{batch}/{path}"), ACME_API_KEY, None), 403);
        problem(keyed(&s, "GET", &format!("/api/batches/{batch}/{path}"), GLOBEX_API_KEY, None), 404);
        problem(s.get_raw(&format!("/api/batches/{batch}/{path}")), 401);
    }
}

#[test]
fn captures_applied_and_never_answered_are_found_settled_and_then_agree() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = outcomes_scenario(dir.path(), "nothing_due = 0.0\nunknown_ticket = 0.0", "");
    let s = stack(dir.path(), &scenario, &QUICK_RETRIES);
    // The gateway applies every capture and never answers, not even when asked.
    outage(&s.providers_url, json!({"provider": "gateway", "kind": "hang_after_apply", "seconds": 600}));
    let batch = upload(&s, "acme", "HA", 3);
    assert_eq!(completed(&s, &batch)["counts"]["parked"], 3);
    outage(&s.providers_url, json!({"provider": "gateway", "kind": "hang_after_apply", "seconds": 0}));

    let (out, run) = reconcile_cli(&s, &batch);
    assert_eq!(out.status.code(), Some(1), "the CLI fails on a disagreement: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(run["providers"]["gateway"]["provider_only"], 3, "{run}");
    let found = run["disagreements"].as_array().unwrap().clone();
    assert_eq!(found.len(), 3);
    for d in &found {
        assert_eq!((d["operation"].as_str(), d["ours"].as_str(), d["verdict"].as_str()), (Some("capture"), Some("unknown"), Some("provider_only")));
        assert_eq!(d["theirs"]["state"], "applied");
        assert_eq!(d["theirs"]["amount_minor"], d["amount_minor"], "the amount the gateway took is the one we sent");
        assert!(d["ticket_url"].as_str().unwrap().ends_with(d["ticket_id"].as_str().unwrap()));
    }
    // The attention view says which tickets disagree and what may be done.
    let attention = ok_json(keyed(&s, "GET", &format!("/api/batches/{batch}/attention"), OPS_KEY, None));
    assert_eq!(attention["last_reconciliation"]["disagreements"], 3);
    let listed = attention["tickets"].as_array().unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0]["concerns"], json!(["unknown_outcome", "disagreeing"]));
    assert_eq!(listed[0]["disagreements"][0]["theirs"]["state"], "applied");
    // The gateway's query is in each ticket's trail, like any exchange.
    let t = ok_json(keyed(&s, "GET", listed[0]["ticket_url"].as_str().unwrap(), OPS_KEY, None));
    assert!(t["timeline"].as_array().unwrap().iter().any(|e| e["type"] == "exchange" && e["operation"] == "status" && e["response"]["status"] == 200));

    // The operator confirms each capture with the gateway's own reference and sends the ticket on.
    for d in &found {
        let path = format!("/api/batches/{batch}/tickets/{}/resolve", d["ticket_id"].as_str().unwrap());
        let reference = d["theirs"]["reference"].as_str().unwrap();
        ok_json(keyed(&s, "POST", &path, OPS_KEY, Some(&json!({"action": "confirmed_applied", "note": "reconciliation found it", "provider_reference": reference}))));
        ok_json(keyed(&s, "POST", &path, OPS_KEY, Some(&json!({"action": "redrive", "note": "settle it"}))));
    }
    let status = completed(&s, &batch);
    assert_eq!(status["counts"]["paid"], 3, "{status}");
    assert_eq!(stats(&s.providers_url)["gateway"]["duplicate_charges"], 0);
    let (out, run) = reconcile_cli(&s, &batch);
    assert!(out.status.success(), "{run}");
    assert_eq!((run["checked"].as_u64(), total(&run, "agree")), (Some(12), 12));
    let attention = ok_json(keyed(&s, "GET", &format!("/api/batches/{batch}/attention"), OPS_KEY, None));
    assert_eq!(attention["count"], 0, "{attention}");
    let runs = ok_json(keyed(&s, "GET", &format!("/api/batches/{batch}/reconciliations"), OPS_KEY, None));
    assert_eq!(runs["runs"].as_array().unwrap().len(), 2);

    // The ledger loses a posting we recorded: found, and acknowledged once settled with the ledger by hand.
    let key = format!("{batch}:HA0001:post");
    let forgot = reqwest::blocking::Client::new().post(format!("{}/admin/forget", s.providers_url)).json(&json!({"provider": "ledger", "idempotency_key": key})).send().unwrap();
    assert!(forgot.status().is_success());
    let (out, run) = reconcile_cli(&s, &batch);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!((run["providers"]["ledger"]["ours_only"].as_u64(), run["disagreements"][0]["idempotency_key"].as_str()), (Some(1), Some(key.as_str())), "{run}");
    let attention = ok_json(keyed(&s, "GET", &format!("/api/batches/{batch}/attention"), OPS_KEY, None));
    let listed = &attention["tickets"][0];
    assert_eq!((listed["ticket_id"].as_str(), listed["concerns"].clone(), listed["actions"].clone()), (Some("HA0001"), json!(["disagreeing"]), json!(["acknowledge"])));
    let path = format!("/api/batches/{batch}/tickets/HA0001/resolve");
    problem(keyed(&s, "POST", &path, OPS_KEY, Some(&json!({"action": "give_up", "note": "n"}))), 409);
    ok_json(keyed(&s, "POST", &path, OPS_KEY, Some(&json!({"action": "acknowledge", "note": "the ledger re-posted it by hand"}))));
    let attention = ok_json(keyed(&s, "GET", &format!("/api/batches/{batch}/attention"), OPS_KEY, None));
    assert_eq!(attention["count"], 0, "{attention}");
    assert_eq!(ok_json(keyed(&s, "GET", &format!("/api/batches/{batch}/tickets/HA0001"), OPS_KEY, None))["status"], "paid", "an acknowledgement changes nothing");
}
