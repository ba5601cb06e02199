//! Who sees what: the real stack with API keys configured. A client key sees
//! only its own client's batches (another's answer as if they did not exist),
//! uploads only for itself and may not redrive; an operator key sees all; a
//! missing or wrong key gets 401.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::common::*;
use crate::{SCENARIO, get, keyed_stack};

/// A host in a process of its own, for what it reads from its environment and
/// writes to its stderr (into `log`) at startup.
fn logged_stack(data: &Path, env: &[(&str, &str)], log: &Path) -> Stack {
    let options = StackOptions { scenario: SCENARIO, providers_url: None, data, env, extra_args: &[] };
    Stack::start_with_stderr(options, Stdio::from(fs::File::create(log).unwrap()))
}

fn upload(s: &Endpoints, key: &str, body: &Value) -> String {
    let r = send(s, "POST", "/api/batches", Some(key), Some(body));
    assert_eq!(r.status().as_u16(), 202);
    r.json::<Value>().unwrap()["batch_id"].as_str().unwrap().to_owned()
}

fn clients_listed(listing: &Value) -> Vec<String> {
    let mut clients: Vec<String> =
        listing["batches"].as_array().unwrap().iter().map(|b| b["client_id"].as_str().unwrap().to_owned()).collect();
    clients.sort();
    clients
}

#[test]
fn each_key_sees_and_does_only_what_its_role_allows() {
    let data = tempfile::tempdir().unwrap();
    let s = keyed_stack(data.path());

    // Acme and Globex each give one ticket the same reference.
    let mut acme_upload = batch_json("acme", 3, "100.00");
    acme_upload["tickets"][0]["reference"] = json!("FINE-SHARED-1");
    let mut globex_upload = batch_json("globex", 2, "100.00");
    globex_upload["tickets"][0]["reference"] = json!("FINE-SHARED-1");
    let acme = upload(&s, ACME_API_KEY, &acme_upload);
    let globex = upload(&s, GLOBEX_API_KEY, &globex_upload);
    let initech = upload(&s, OPS_KEY, &batch_json("initech", 1, "100.00"));

    // No key, or a wrong one: 401, whatever the path.
    for path in ["/api/batches", &format!("/api/batches/{acme}"), "/api/authorities", "/api/nowhere"] {
        let p = problem(get(&s, path, None), 401);
        assert!(p["detail"].as_str().unwrap().contains("x-functions-key"), "{path}: {p}");
        problem(get(&s, path, Some("not-a-key")), 401);
        problem(get(&s, &format!("{path}?code=not-a-key"), None), 401);
    }
    problem(send(&s, "POST", "/api/batches", None, Some(&batch_json("acme", 1, "1.00"))), 401);
    // Routes holding no data are open: the console's page, script and style, the API's description.
    for (path, content_type) in [
        ("/api/console", "text/html"),
        ("/api/console/batches/b-1/tickets/T1", "text/html"),
        ("/api/console/console.js", "javascript"),
        ("/api/console/console.css", "text/css"),
        ("/api/openapi.json", "application/json"),
    ] {
        let r = get(&s, path, None);
        assert_eq!(r.status().as_u16(), 200, "{path}");
        let served = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(served.contains(content_type), "{path}: {served}");
        assert!(!r.text().unwrap().is_empty(), "{path}");
    }
    // A console address that is not one is still behind the key.
    problem(get(&s, "/api/consoles", None), 401);

    // The key in the `code` query parameter works like the header.
    let by_code = ok_json(get(&s, &format!("/api/batches?code={ACME_API_KEY}"), None));
    assert_eq!(clients_listed(&by_code), ["acme"]);
    ok_json(get(&s, "/api/authorities", Some(GLOBEX_API_KEY)));

    // A client lists its own batches only, and may not ask for another's.
    assert_eq!(clients_listed(&ok_json(get(&s, "/api/batches", Some(ACME_API_KEY)))), ["acme"]);
    assert_eq!(clients_listed(&ok_json(get(&s, "/api/batches?client_id=acme", Some(ACME_API_KEY)))), ["acme"]);
    let p = problem(get(&s, "/api/batches?client_id=globex", Some(ACME_API_KEY)), 403);
    assert_eq!(p["field"], "client_id");

    // An operator sees every client, or the one asked for.
    assert_eq!(clients_listed(&ok_json(get(&s, "/api/batches", Some(OPS_KEY)))), ["acme", "globex", "initech"]);
    assert_eq!(clients_listed(&ok_json(get(&s, "/api/batches?client_id=globex", Some(OPS_KEY)))), ["globex"]);

    // Another client's batch answers exactly as a batch that does not exist.
    let unknown = "b-0000000000000000000000000000000a";
    for (path, method) in [
        ("", "GET"),
        ("/tickets", "GET"),
        ("/tickets/T000001", "GET"),
        ("/redrive", "POST"),
    ] {
        let theirs = problem(send(&s, method, &format!("/api/batches/{globex}{path}"), Some(ACME_API_KEY), None), 404);
        let nobodys = problem(send(&s, method, &format!("/api/batches/{unknown}{path}"), Some(ACME_API_KEY), None), 404);
        assert_eq!(theirs["type"], nobodys["type"], "{method} {path}");
        assert_eq!(theirs["detail"].as_str().unwrap().replace(&globex, unknown), nobodys["detail"], "{method} {path}");
    }
    // Its own batch, tickets and ticket it sees.
    assert_eq!(ok_json(get(&s, &format!("/api/batches/{acme}"), Some(ACME_API_KEY)))["client_id"], "acme");
    assert_eq!(ok_json(get(&s, &format!("/api/batches/{acme}/tickets"), Some(ACME_API_KEY)))["tickets"].as_array().unwrap().len(), 3);
    assert_eq!(ok_json(get(&s, &format!("/api/batches/{acme}/tickets/T000001"), Some(ACME_API_KEY)))["client_id"], "acme");
    // An operator sees Globex's too.
    assert_eq!(ok_json(get(&s, &format!("/api/batches/{globex}/tickets/T000001"), Some(OPS_KEY)))["client_id"], "globex");

    // Tickets by reference: a client finds its own, an operator every client's.
    let found = |key| ok_json(get(&s, "/api/tickets?reference=FINE-SHARED-1", Some(key)))["tickets"].as_array().unwrap().clone();
    let acme_found = found(ACME_API_KEY);
    assert_eq!(acme_found.len(), 1);
    assert_eq!(acme_found[0]["batch_id"], acme.as_str());
    assert_eq!(found(OPS_KEY).len(), 2);

    // A client uploads for itself only, in JSON or CSV.
    let p = problem(send(&s, "POST", "/api/batches", Some(ACME_API_KEY), Some(&batch_json("globex", 1, "5.00"))), 403);
    assert_eq!(p["field"], "client_id");
    let csv = s
        .http
        .post(format!("{}/api/batches?client_id=globex&currency=EUR&budget=5.00", s.url))
        .header("x-functions-key", ACME_API_KEY)
        .header("Content-Type", "text/csv")
        .body("ticket_id,authority\nT1,CITY-PARKING\n")
        .send()
        .unwrap();
    problem(csv, 403);
    assert_eq!(clients_listed(&ok_json(get(&s, "/api/batches?client_id=globex", Some(OPS_KEY)))), ["globex"], "nothing was stored");

    // Redrive is an operator's decision, even of a client's own batch.
    let dry_run = json!({ "dry_run": true });
    problem(send(&s, "POST", &format!("/api/batches/{acme}/redrive"), Some(ACME_API_KEY), Some(&dry_run)), 403);
    let redrive = ok_json(send(&s, "POST", &format!("/api/batches/{acme}/redrive"), Some(OPS_KEY), Some(&dry_run)));
    assert_eq!(redrive["batch_id"], acme.as_str());
    ok_json(get(&s, &format!("/api/batches/{initech}"), Some(OPS_KEY)));
}

#[test]
fn keys_can_come_from_the_environment() {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("host.log");
    let keys = three_keys();
    let s = logged_stack(data.path(), &[("TICKETPAY_API_KEYS", keys.as_str())], &log);
    problem(get(&s, "/api/batches", None), 401);
    assert_eq!(clients_listed(&ok_json(get(&s, "/api/batches", Some(OPS_KEY)))), Vec::<String>::new());
    assert!(!fs::read_to_string(&log).unwrap().contains("is OPEN"), "no warning when keys are set");
}

#[test]
fn without_keys_the_api_is_open_and_the_local_host_says_so_at_startup() {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("host.log");
    let s = logged_stack(data.path(), &[], &log);
    let batch = s.submit(1, "10.00");
    assert_eq!(ok_json(get(&s, &format!("/api/batches/{batch}"), None))["client_id"], "ops");
    let stderr = fs::read_to_string(&log).unwrap();
    assert!(stderr.contains("WARNING: TICKETPAY_API_KEYS is not set, so the API at"), "{stderr}");
    assert!(stderr.contains("is OPEN"), "{stderr}");
}

/// Starts `ticketpay handler` with these settings and returns how it ended and its stderr.
fn handler_with(settings: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("handler")
        .env_remove("TICKETPAY_API_KEYS")
        .env_remove("WEBSITE_INSTANCE_ID")
        .env_remove("WEBSITE_SITE_NAME")
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", "0")
        .env("TICKETPAY_BUS_URL", "http://127.0.0.1:9")
        .env("TICKETPAY_PROVIDERS_URL", "http://127.0.0.1:9")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in settings {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_handler_refuses_to_start_in_azure_without_keys_or_with_malformed_ones() {
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[("WEBSITE_INSTANCE_ID", "0f1e2d3c")], "is required in Azure (WEBSITE_INSTANCE_ID is set)"),
        (&[("TICKETPAY_API_KEYS", "[{\"name\": \"ops\"")], "not a JSON array of keys"),
        (&[("TICKETPAY_API_KEYS", "@Microsoft.KeyVault(VaultName=kv;SecretName=api-keys)")], "Key Vault reference"),
    ];
    for (settings, expected) in cases {
        let (started, stderr) = handler_with(settings);
        assert!(!started, "{settings:?}");
        let line = stderr.trim();
        assert!(line.starts_with("ticketpay: setting TICKETPAY_API_KEYS: "), "{settings:?}: {stderr}");
        assert!(line.contains(expected), "{settings:?}: {stderr}");
        assert_eq!(line.lines().count(), 1, "one line: {stderr}");
    }
}
