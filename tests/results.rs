//! The results a client gets: the CSV (and JSON) of a finished batch, read as a
//! client would, adds up to what the batch's status says; a client key gets
//! its own batches' results only; `ticketpay results` writes the same file.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const HEADER: [&str; 14] = [
    "kind", "ticket_id", "authority", "reference", "status", "amount_due", "paid", "currency", "reason",
    "gateway_references", "settlement_references", "ledger_references", "receipt_references", "notified",
];

fn completed(s: &Stack, batch: &str, key: &str) -> Value {
    poll("the batch to complete", Duration::from_secs(120), || {
        let status = ok_json(keyed(s, "GET", &format!("/api/batches/{batch}"), key, None));
        (status["status"] == "completed").then_some(status)
    })
}

fn csv_records(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_owned).collect();
    assert_eq!(header, HEADER);
    reader.records().map(|r| header.iter().cloned().zip(r.unwrap().iter().map(str::to_owned)).collect()).collect()
}

#[test]
fn a_clients_results_add_up_to_its_batch_and_are_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("app");
    std::fs::create_dir_all(&root).unwrap();
    app_root_with(&root, json!({ "TICKETPAY_API_KEYS": three_keys() }));
    let outcomes = "nothing_due = 0.1\nunknown_ticket = 0.05\nrejected = { registry = 0.1 }\npayment_failure = { gateway = 0.1, settlement = 0.1 }";
    let scenario = outcomes_scenario(dir.path(), outcomes, "");
    let s = Stack::start(StackOptions {
        scenario: &scenario,
        providers_url: None,
        data: &dir.path().join("data"),
        env: &[],
        extra_args: &["--app-root", root.to_str().unwrap()],
    });
    let accepted = |key, body| ok_json(keyed(&s, "POST", "/api/batches", key, Some(&body)))["batch_id"].as_str().unwrap().to_owned();
    let acme = accepted(ACME_API_KEY, batch_json("acme", 80, "2500.00"));
    let globex = accepted(GLOBEX_API_KEY, batch_json("globex", 3, "100.00"));
    let status = completed(&s, &acme, ACME_API_KEY);
    completed(&s, &globex, GLOBEX_API_KEY);

    let r = keyed(&s, "GET", &format!("/api/batches/{acme}/results.csv"), ACME_API_KEY, None);
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let text = r.text().unwrap();
    let records = csv_records(&text);
    let (rows, total) = records.split_at(records.len() - 1);
    let total = &total[0];
    assert_eq!(rows.len(), 80, "one row per ticket");
    assert!(rows.iter().all(|r| r["kind"] == "ticket" && r["currency"] == "EUR" && r["notified"] == "true"));

    // The rows count what the batch counts, and their money adds up to its money.
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for r in rows {
        *counts.entry(r["status"].clone()).or_default() += 1;
    }
    for state in END_STATES {
        assert_eq!(counts.get(state).copied().unwrap_or(0), status["counts"][state].as_u64().unwrap_or(0), "{state}: {status}");
    }
    assert!(counts.len() >= 4, "the scenario gives several end states: {counts:?}");
    let sum = |column: &str| rows.iter().filter(|r| !r[column].is_empty()).map(|r| cents(&json!(r[column]))).sum::<i64>();
    assert_eq!(sum("paid"), cents(&status["paid"]));
    assert_eq!(cents(&json!(total["paid"])), cents(&status["paid"]));
    assert_eq!(cents(&json!(total["amount_due"])), sum("amount_due"));
    assert_eq!((total["kind"].as_str(), total["ticket_id"].as_str(), total["notified"].as_str()), ("total", "80", "80"));
    let paid_count = status["counts"]["paid"].as_u64().unwrap_or(0);
    assert!(total["status"].contains(&format!("paid={paid_count}")), "{total:?}");

    // A paid ticket names each provider's reference; one declined at settlement, its capture and refund.
    for r in rows.iter().filter(|r| r["status"] == "paid") {
        assert!(r["gateway_references"].starts_with("capture:gateway-"), "{r:?}");
        for (column, op) in [("settlement_references", "settle:"), ("ledger_references", "post:"), ("receipt_references", "issue:")] {
            assert!(r[column].starts_with(op), "{column}: {r:?}");
        }
        assert!(cents(&json!(r["paid"])) > 0 && r["paid"] == r["amount_due"], "{r:?}");
    }
    let undone: Vec<_> = rows.iter().filter(|r| r["status"] == "failed" && r["reason"].starts_with("settlement declined")).collect();
    assert!(!undone.is_empty(), "some payments were declined at settlement");
    for r in undone {
        assert!(r["gateway_references"].contains("capture:") && r["gateway_references"].contains("refund:"), "{r:?}");
        assert_eq!(r["paid"], "0.00");
    }
    for r in rows.iter().filter(|r| r["status"] != "paid") {
        assert!(!r["reason"].is_empty(), "every other end says why: {r:?}");
    }

    // JSON by default, CSV when asked for it.
    let results = ok_json(keyed(&s, "GET", &format!("/api/batches/{acme}/results"), ACME_API_KEY, None));
    assert_eq!(results["tickets"].as_array().unwrap().len(), 80);
    assert_eq!(results["totals"]["paid"], status["paid"]);
    assert_eq!(results["totals"]["counts"]["paid"], status["counts"]["paid"]);
    assert_eq!(results["complete"], true);
    let asked_csv = s.http.get(format!("{}/api/batches/{acme}/results", s.url)).header("x-functions-key", ACME_API_KEY).header("Accept", "text/csv").send().unwrap();
    assert_eq!(asked_csv.text().unwrap(), text);

    // Another client's results answer as a batch that does not exist; an operator's key reads any.
    let nobody = "b-0000000000000000000000000000000a";
    for path in ["results", "results.csv"] {
        let theirs = problem(keyed(&s, "GET", &format!("/api/batches/{acme}/{path}"), GLOBEX_API_KEY, None), 404);
        let none = problem(keyed(&s, "GET", &format!("/api/batches/{nobody}/{path}"), GLOBEX_API_KEY, None), 404);
        assert_eq!(theirs["detail"].as_str().unwrap().replace(&acme, nobody), none["detail"]);
        problem(s.get_raw(&format!("/api/batches/{acme}/{path}")), 401);
        ok_json(keyed(&s, "GET", &format!("/api/batches/{globex}/results"), OPS_KEY, None));
    }

    // The command line writes the same CSV.
    let out = dir.path().join("acme.csv");
    let cli = std::process::Command::new(BIN)
        .args(["results", &acme, "--out", out.to_str().unwrap(), "--url", &s.url, "--key", ACME_API_KEY])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), text);
    let refused = std::process::Command::new(BIN).args(["results", &acme, "--url", &s.url, "--key", GLOBEX_API_KEY]).output().unwrap();
    assert!(!refused.status.success());
}
