//! The HTTP API as a client sees it: uploads accepted once, bad uploads refused
//! with a problem that names the row and field, and nothing left behind.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;
use crate::stack;

fn problem(r: reqwest::blocking::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(content_type, "application/problem+json", "status {status}");
    (status, r.json().unwrap())
}

#[test]
fn bad_uploads_are_refused_and_leave_nothing_behind() {
    let data = tempfile::tempdir().unwrap();
    let s = stack(data.path());
    let good = batch_json("acme", 3, "100.00");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        v
    };
    let cases: Vec<(&str, Value, Option<usize>, &str)> = vec![
        ("duplicate ticket id", with(&|v| v["tickets"][2]["ticket_id"] = "T000001".into()), Some(3), "ticket_id"),
        ("unknown authority", with(&|v| v["tickets"][1]["authority"] = "NOWHERE".into()), Some(2), "authority"),
        ("bad currency", with(&|v| v["currency"] = "EURO".into()), None, "currency"),
        ("negative budget", with(&|v| v["budget"] = "-5.00".into()), None, "budget"),
        ("over-precise budget", with(&|v| v["budget"] = "10.001".into()), None, "budget"),
        ("budget as a float", with(&|v| v["budget"] = json!(10.5)), None, "budget"),
        ("missing client", with(&|v| { v.as_object_mut().unwrap().remove("client_id"); }), None, "client_id"),
        ("no tickets", with(&|v| v["tickets"] = json!([])), None, "tickets"),
        ("too many tickets", batch_json("acme", 5001, "100.00"), None, "tickets"),
    ];
    for (what, body, row, field) in cases {
        let (status, p) = problem(s.upload_json(&body, None));
        assert!((400..500).contains(&status), "{what}: {status} {p}");
        assert_eq!(p["field"], field, "{what}: {p}");
        assert_eq!(p["row"].as_u64().map(|r| r as usize), row, "{what}: {p}");
        assert!(p["detail"].as_str().unwrap().contains(field), "{what}: {p}");
    }

    let post = |content_type: &str, query: &str, body: Vec<u8>| {
        s.http.post(format!("{}/api/batches{query}", s.url)).header("Content-Type", content_type).body(body).send().unwrap()
    };
    let (status, p) = problem(post("application/json", "", b"{\"client_id\": ".to_vec()));
    assert_eq!(status, 422);
    assert!(p["detail"].as_str().unwrap().contains("malformed JSON"), "{p}");
    let (status, _) = problem(post("text/plain", "", b"hello".to_vec()));
    assert_eq!(status, 415);
    let (status, _) = problem(post("application/json", "", vec![b' '; 5 * 1024 * 1024]));
    assert_eq!(status, 413);
    let csv_query = "?client_id=acme&currency=EUR&budget=10.00";
    let (status, p) = problem(post("text/csv", csv_query, b"ticket_id,authority\nA1,CITY-PARKING\nA2,NOPE\n".to_vec()));
    assert_eq!((status, p["row"].as_u64(), p["field"].as_str()), (422, Some(3), Some("authority")), "{p}");
    let (_, p) = problem(post("text/csv", csv_query, b"ticket_id,authority\nA1,CITY-PARKING,extra\n".to_vec()));
    assert!(p["detail"].as_str().unwrap().contains("malformed CSV"), "{p}");
    let (_, p) = problem(post("text/csv", "?client_id=acme&currency=EUR", b"ticket_id,authority\nA1,CITY-PARKING\n".to_vec()));
    assert_eq!(p["field"], "budget");
    let (status, p) = problem(post("text/csv", csv_query, b"ticket_id,authority\nA1,at most 5000\n".to_vec()));
    assert_eq!((status, p["field"].as_str()), (422, Some("authority")), "only too many tickets is too large: {p}");
    let (status, _) = problem(s.upload_json(&batch_json("acme", 5001, "100.00"), None));
    assert_eq!(status, 413);

    // Nothing stored, nothing queued.
    assert_eq!(s.get("/api/batches")["batches"], json!([]));
    let queues = s.queues();
    for (name, q) in queues.as_object().unwrap() {
        for key in ["active", "scheduled", "locked", "dead_lettered"] {
            assert_eq!(q[key].as_u64().unwrap_or(0), 0, "{name}: {q}");
        }
    }
}

#[test]
fn an_idempotency_key_is_refused_with_the_characters_it_may_hold() {
    let data = tempfile::tempdir().unwrap();
    let s = stack(data.path());
    let body = batch_json("acme", 2, "100.00");
    let send = |key: reqwest::header::HeaderValue| {
        s.http.post(format!("{}/api/batches", s.url)).header("Idempotency-Key", key).json(&body).send().unwrap()
    };
    let refused: Vec<(&str, reqwest::header::HeaderValue)> = vec![
        ("a slash", "acme/2026-12-01".parse().unwrap()),
        ("a backslash", "acme\\batch".parse().unwrap()),
        ("a question mark", "why?".parse().unwrap()),
        ("a hash", "batch#7".parse().unwrap()),
        ("a tab", "tab\tinside".parse().unwrap()),
        ("201 characters", "k".repeat(201).parse().unwrap()),
        ("a non-ASCII byte", reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap()),
    ];
    for (what, key) in refused {
        let (status, p) = problem(send(key));
        assert_eq!(status, 400, "{what}: {p}");
        assert_eq!(p["field"], "Idempotency-Key", "{what}: {p}");
        let detail = p["detail"].as_str().unwrap();
        assert!(detail.contains("1 to 200") && detail.contains("/ \\ ? #"), "{what}: the allowed characters are named: {detail}");
    }
    assert_eq!(s.get("/api/batches")["batches"], json!([]), "nothing stored");

    let odd_but_fine = "acme:upload 2026-12-01_#1".replace('#', "no.");
    let first = s.upload_json(&body, Some(&odd_but_fine));
    assert_eq!(first.status().as_u16(), 202);
    let first: Value = first.json().unwrap();
    let again: Value = s.upload_json(&body, Some(&odd_but_fine)).json().unwrap();
    assert_eq!(first["batch_id"], again["batch_id"]);
    let punctuation = "!\"$%&'()*+,-.:;<=>@[]^_`{|}~";
    assert_eq!(s.upload_json(&body, Some(punctuation)).status().as_u16(), 202, "every other printable character is allowed");
}

#[test]
fn an_upload_is_accepted_once_per_idempotency_key_and_can_be_followed() {
    let data = tempfile::tempdir().unwrap();
    let s = stack(data.path());
    assert!(s.get("/api/authorities")["authorities"].as_array().unwrap().iter().any(|a| a == "CITY-PARKING"));

    let body = batch_json("acme", 25, "500.00");
    let first = s.upload_json(&body, Some("upload-1"));
    assert_eq!(first.status().as_u16(), 202);
    let first: Value = first.json().unwrap();
    let again: Value = s.upload_json(&body, Some("upload-1")).json().unwrap();
    assert_eq!(first["batch_id"], again["batch_id"], "the same key and body give the same batch");
    let (status, p) = problem(s.upload_json(&batch_json("acme", 26, "500.00"), Some("upload-1")));
    assert_eq!(status, 422, "{p}");

    let csv = "ticket_id,authority,reference\nC1,STATE-TOLLS,R-1\nC2,CITY-PARKING,\n";
    let r = s
        .http
        .post(format!("{}/api/batches?client_id=other&currency=EUR&budget=50", s.url))
        .header("Content-Type", "text/csv")
        .body(csv)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);

    let batch = first["batch_id"].as_str().unwrap();
    let status = s.wait_complete(batch, Duration::from_secs(120));
    assert_eq!(status["tickets"], 25);
    assert_eq!(status["currency"], "EUR");
    assert_eq!(status["budget"], "500.00");

    let listed = s.get("/api/batches?client_id=acme")["batches"].clone();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(s.get("/api/batches")["batches"].as_array().unwrap().len(), 2);
    assert_eq!(status["done"], 25);
    assert!(status["stages"].as_array().unwrap().iter().all(|s| s["past"] == 25 && s["waiting"] == 0), "{status}");
    let summarised = s.get("/api/batches?client_id=acme&summary=true")["batches"][0].clone();
    for key in ["status", "counts", "paid", "remaining", "done"] {
        assert_eq!(summarised[key], status[key], "{key}: {summarised}");
    }
    let (code, p) = problem(s.get_raw("/api/batches?summary=yes"));
    assert_eq!((code, p["field"].as_str()), (400, Some("summary")), "{p}");

    // Pages cover every ticket once, and the status filter filters.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = s.get(&format!("/api/batches/{batch}/tickets?limit=7&cursor={cursor}"));
        seen.extend(page["tickets"].as_array().unwrap().iter().map(|t| t["ticket_id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen.len(), 25);
    seen.dedup();
    assert_eq!(seen.len(), 25);
    let paid = s.get(&format!("/api/batches/{batch}/tickets?status=paid"));
    assert!(paid["tickets"].as_array().unwrap().iter().all(|t| t["status"] == "paid"));
    let (status, p) = problem(s.get_raw(&format!("/api/batches/{batch}/tickets?status=lost")));
    assert_eq!((status, p["field"].as_str()), (400, Some("status")));

    // One ticket: its state, amounts and every provider exchange.
    let one = paid["tickets"][0]["ticket_id"].as_str().unwrap();
    let t = s.get(&format!("/api/batches/{batch}/tickets/{one}"));
    let exchanges: Vec<&Value> = t["timeline"].as_array().unwrap().iter().filter(|e| e["type"] == "exchange").collect();
    let providers: Vec<&str> = exchanges.iter().map(|e| e["provider"].as_str().unwrap()).collect();
    for p in ["authority", "registry", "fraud", "sanctions", "gateway", "settlement", "ledger", "receipt", "notifier"] {
        assert!(providers.contains(&p), "{p} missing from {providers:?}");
    }
    let capture = exchanges.iter().find(|e| e["operation"] == "capture").unwrap();
    assert_eq!(capture["idempotency_key"], format!("{batch}:{one}:capture"));
    assert_eq!(capture["request"]["method"], "POST");
    assert_eq!(capture["response"]["status"], 200);
    assert!(capture["request"]["body"]["amount"]["minor"].as_i64().unwrap() > 0);

    let by_ref = s.get("/api/tickets?reference=REF-acme-1");
    assert_eq!(by_ref["tickets"][0]["ticket_id"], "T000001");

    let (status, _) = problem(s.get_raw("/api/batches/b-nope"));
    assert_eq!(status, 404);
    let (status, _) = problem(s.get_raw(&format!("/api/batches/{batch}/tickets/nope")));
    assert_eq!(status, 404);
}

#[test]
fn an_upload_stored_while_service_bus_is_down_is_refused_then_finished_by_redrive() {
    let data = tempfile::tempdir().unwrap();
    let s = stack(data.path());
    // A second handler on the same store, whose Service Bus is unreachable.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead_bus = format!("http://127.0.0.1:{dead}");
    let env = [
        ("FUNCTIONS_CUSTOMHANDLER_PORT", port.as_str()),
        ("TICKETPAY_BUS_URL", dead_bus.as_str()),
        ("TICKETPAY_DATA_DIR", data.path().to_str().unwrap()),
        ("TICKETPAY_PROVIDERS_URL", s.providers_url.as_str()),
    ];
    let (_handler, _) = Process::start(&["handler"], &env, &[]);
    let url = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while s.http.get(format!("{url}/")).send().is_err() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }

    let (status, p) = problem(s.http.post(format!("{url}/api/batches")).json(&batch_json("acme", 10, "5000.00")).send().unwrap());
    assert_eq!(status, 503, "{p}");
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("stored but not every ticket was queued"), "{detail}");
    let batch = s.get("/api/batches")["batches"][0]["batch_id"].as_str().unwrap().to_owned();
    assert!(detail.contains(&batch));
    assert_eq!(s.status(&batch)["counts"]["lookup"], 10, "stored");
    let queued: u64 = s.queues().as_object().unwrap().values().map(|q| q["active"].as_u64().unwrap_or(0) + q["scheduled"].as_u64().unwrap_or(0)).sum();
    assert_eq!(queued, 0, "and going nowhere: no message was queued");

    let dry = s.post(&format!("/api/batches/{batch}/redrive"), &json!({"dry_run": true}));
    assert_eq!(dry["requeued_upload"], true);
    assert_eq!(s.status(&batch)["counts"]["lookup"], 10, "a dry run sends nothing");
    s.post(&format!("/api/batches/{batch}/redrive"), &json!({}));
    let done = s.wait_complete(&batch, Duration::from_secs(60));
    assert_eq!(done["tickets"], 10);
    let again = s.post(&format!("/api/batches/{batch}/redrive"), &json!({}));
    assert_eq!(again["requeued_upload"], false);
}

#[test]
fn malformed_paths_and_oversized_requests_are_refused_as_problems() {
    let data = tempfile::tempdir().unwrap();
    let s = stack(data.path());
    let (status, p) = problem(s.get_raw("/api/batches/%FF"));
    assert_eq!((status, p["field"].as_str()), (400, Some("batch_id")), "{p}");
    let (status, p) = problem(s.get_raw("/api/batches/b-1/tickets/%C3%28"));
    assert_eq!((status, p["field"].as_str()), (400, Some("ticket_id")), "{p}");
    let (status, _) = problem(s.get_raw("/api/nothing/here"));
    assert_eq!(status, 404);
    let (status, _) = problem(s.http.delete(format!("{}/api/batches", s.url)).send().unwrap());
    assert_eq!(status, 405);

    let batch = s.submit(1, "10.00");
    let redrive = format!("{}/api/batches/{batch}/redrive", s.url);
    let (status, p) = problem(s.http.post(&redrive).body(vec![b' '; 3 * 1024 * 1024]).send().unwrap());
    assert_eq!(status, 413, "{p}");
    let (status, p) = problem(s.http.post(&redrive).body("{\"dry_run\": 1}").send().unwrap());
    assert_eq!(status, 400, "{p}");
}
