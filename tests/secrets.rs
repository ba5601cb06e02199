//! Secrets stay out of everything ticketpay keeps. The real stack runs with a
//! provider credential, and the simulated gateway names the card it charges
//! (number and token) in its answers and refusals. The store's files, the
//! host's and handler's logs and the exported spans are then searched byte by
//! byte: none holds a secret, and each holds the redacted form of one. What
//! only looks like a card number (a ticket id, the card network's reference)
//! is an identifier, and is kept intact.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;
use ticketpay::providers::simulator::{CARD_ON_FILE, CARD_TOKEN, NETWORK_REFERENCE};

const PROVIDER_KEY: &str = "sk_live_PLANTED_7d1e4b90c2f5";

/// A ticket id whose digits pass the Luhn check, as a notice number's may.
const LUHN_TICKET: &str = "1234567812345670";

/// No latency; the gateway declines about a third of the tickets, naming the card in its refusal.
const SCENARIO: &str = r#"
description = "Zero latency; the gateway declines a third of the tickets"
seed = 11

[outcomes]
nothing_due = 0.0
unknown_ticket = 0.0
amount_minor = [500, 20000]
rejected = { registry = 0.0, fraud = 0.0, sanctions = 0.0 }
payment_failure = { gateway = 0.35, settlement = 0.0, ledger = 0.0, receipt = 0.0 }

[defaults]
latency_ms = [0, 0]
hang_ms = 0
"#;

/// Every form of the secrets that could leak; a card number by its first twelve digits in any grouping.
fn secrets() -> Vec<String> {
    let card_digits = CARD_ON_FILE.replace(' ', "");
    vec![
        PROVIDER_KEY.to_owned(),
        CARD_TOKEN.to_owned(),
        card_digits[..12].to_owned(),
        CARD_ON_FILE[..14].to_owned(),
        CARD_ON_FILE.replace(' ', "-")[..14].to_owned(),
    ]
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Asserts that `what` holds no secret and does hold each of `markers`.
fn assert_clean(what: &str, bytes: &[u8], markers: &[&str]) {
    for secret in secrets() {
        assert!(!contains(bytes, &secret), "{what} holds the secret `{secret}`");
    }
    for marker in markers {
        assert!(contains(bytes, marker), "{what} holds no `{marker}`: the test would prove nothing");
    }
}

#[test]
fn secrets_in_provider_traffic_reach_no_store_log_or_trace() {
    let (collector, spans) = recorder();
    let work = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let scenario = work.path().join("leaky-gateway.toml");
    fs::write(&scenario, SCENARIO).unwrap();
    let log = work.path().join("stderr.log");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.as_str()),
        ("TICKETPAY_PROVIDER_KEY_GATEWAY", PROVIDER_KEY),
        ("TICKETPAY_PROVIDER_KEY_AUTHORITY", PROVIDER_KEY),
        ("RUST_LOG", "warn,ticketpay=info"),
    ];
    let options = StackOptions { scenario: scenario.to_str().unwrap(), providers_url: None, data: data.path(), env: &env, extra_args: &[] };
    let mut stack = Stack::start_with_stderr(options, Stdio::from(fs::File::create(&log).unwrap()));
    let mut upload = batch_json("ops", 20, "100000.00");
    upload["tickets"][0]["ticket_id"] = LUHN_TICKET.into();
    let r = stack.upload_json(&upload, None);
    assert_eq!(r.status().as_u16(), 202, "upload accepted");
    let batch = r.json::<Value>().unwrap()["batch_id"].as_str().unwrap().to_owned();
    stack.wait_complete(&batch, Duration::from_secs(120));

    // The traffic did carry the secrets: the gateway names the card, and the credential was sent.
    let tickets = stack.all_tickets(&batch);
    let mut seen = Vec::new();
    for t in &tickets {
        let full = stack.get(&format!("/api/batches/{batch}/tickets/{}", t["ticket_id"].as_str().unwrap()));
        for e in full["timeline"].as_array().unwrap().iter().filter(|e| e["type"] == "exchange" && e["provider"] == "gateway") {
            assert_eq!(e["request"]["headers"]["authorization"], "[REDACTED]", "{e}");
            if e["operation"] == "capture" && e["outcome"] == "ok" {
                let key = e["idempotency_key"].as_str().unwrap();
                let raw = reqwest::blocking::get(format!("{}/gateway/operations/{key}", stack.providers_url)).unwrap().text().unwrap();
                assert!(raw.contains(CARD_TOKEN) && raw.contains(&CARD_ON_FILE.replace(' ', "-")), "the gateway said: {raw}");
                // Masked where card data is, intact where an identifier is.
                let said: Value = serde_json::from_str(&raw).unwrap();
                let body = &e["response"]["body"];
                assert_eq!(body["payment_method"]["card_number"], "[REDACTED]", "{e}");
                assert_eq!(body["statement"].as_str().unwrap(), said["statement"].as_str().unwrap().replace("4111-1111-1111-", "****-****-****-"));
                for field in ["id", "idempotency_key", "network_reference"] {
                    assert_eq!(body[field], said[field], "the gateway's `{field}` is kept as it said it: {e}");
                }
                assert_eq!(body["network_reference"], NETWORK_REFERENCE);
            }
        }
        if t["ticket_id"] == LUHN_TICKET {
            let exchanges: Vec<&Value> = full["timeline"].as_array().unwrap().iter().filter(|e| e["type"] == "exchange").collect();
            let lookup = exchanges.iter().find(|e| e["operation"] == "lookup").expect("the ticket was looked up");
            assert!(lookup["request"]["url"].as_str().unwrap().contains(&format!("/tickets/{LUHN_TICKET}?")), "{lookup}");
            for e in exchanges.iter().filter(|e| e["request"]["body"].is_object()) {
                assert_eq!(e["request"]["body"]["ticket_id"], LUHN_TICKET, "{e}");
            }
            for e in exchanges.iter().filter(|e| e["idempotency_key"].is_string()) {
                let key = e["idempotency_key"].as_str().unwrap();
                assert!(key.contains(LUHN_TICKET), "{e}");
                assert_eq!(e["request"]["headers"]["idempotency-key"], key, "{e}");
            }
        }
        seen.push(full.to_string());
    }
    assert!(tickets.iter().any(|t| t["ticket_id"] == LUHN_TICKET), "the ticket with a Luhn-valid id is in the batch");
    let declined = tickets.iter().filter(|t| t["reason"].as_str().is_some_and(|r| r.contains("card **** **** **** 1111 declined"))).count();
    assert!(declined > 0, "some capture was declined naming the card: {tickets:?}");
    assert!(tickets.iter().any(|t| t["status"] == "paid"), "some ticket was paid");
    assert_clean("what the API shows", seen.join("\n").as_bytes(), &["[REDACTED]", "****-****-****-1111"]);

    // Stop cleanly: every log line written and every span exported.
    assert!(stack.host.terminate().success());

    let logs = fs::read(&log).unwrap();
    assert_clean("the host's and handler's logs", &logs, &["provider exchange", "[REDACTED]", "****-****-****-1111"]);

    let exported = spans.lock().unwrap().join("\n");
    assert_clean("the exported spans", exported.as_bytes(), &["provider exchange", "[REDACTED]", "****-****-****-1111"]);

    let files = files_under(data.path());
    assert!(files.iter().any(|f| f.file_name().unwrap() == "store.db"), "the store is under the data folder: {files:?}");
    let mut store = Vec::new();
    for file in &files {
        let bytes = fs::read(file).unwrap();
        assert_clean(&file.display().to_string(), &bytes, &[]);
        store.extend(bytes);
    }
    assert_clean("the store", &store, &["[REDACTED]", "****-****-****-1111", "**** **** **** 1111"]);
}
