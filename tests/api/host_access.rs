//! What the local host lets through besides the API: no path that a resolver
//! would rewrite (so no way around the API's keys to the handler's queue
//! functions), `/admin` for operator keys only, and the Service Bus REST
//! endpoints for the holder of the host's token only.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use crate::common::*;
use crate::{get, keyed_stack, stack};

/// An answer as it came off the wire.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn problem(&self) -> Value {
        assert_eq!(self.header("content-type"), Some("application/problem+json"), "{} {}", self.status, self.body);
        serde_json::from_str(&self.body).unwrap()
    }
}

/// One HTTP/1.1 request written byte for byte, so nothing on our side touches the path.
fn raw(base: &str, method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Raw {
    let addr = base.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut request = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned())).collect();
    Raw { status, headers, body: body.to_owned() }
}

fn upload(s: &Endpoints, tickets: usize) -> String {
    let r = send(s, "POST", "/api/batches", Some(OPS_KEY), Some(&batch_json("ops", tickets, "100000.00")));
    assert_eq!(r.status().as_u16(), 202);
    r.json::<Value>().unwrap()["batch_id"].as_str().unwrap().to_owned()
}

fn wait_complete(s: &Endpoints, batch: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = ok_json(get(s, &format!("/api/batches/{batch}"), Some(OPS_KEY)));
        if status["status"] == "completed" {
            return status;
        }
        assert!(Instant::now() < deadline, "batch not complete: {status}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the Functions host would send the handler to run `ticket` through a stage.
fn invocation(batch: &str, ticket: &str, attempt: u32) -> String {
    let message = json!({ "batch_id": batch, "ticket_id": ticket, "attempt": attempt }).to_string();
    let body = base64::engine::general_purpose::STANDARD.encode(message);
    json!({ "Data": { "message": body }, "Metadata": { "DeliveryCount": "1" } }).to_string()
}

#[test]
fn a_path_with_dot_segments_is_refused_before_it_reaches_anything() {
    let data = tempfile::tempdir().unwrap();
    let s = keyed_stack(data.path());
    let batch = upload(&s, 3);
    wait_complete(&s, &batch);
    let ticket_path = format!("/api/batches/{batch}/tickets/T000001");
    let before = ok_json(get(&s, &ticket_path, Some(OPS_KEY)));

    let forged = invocation(&batch, "T000001", 99);
    let json = [("Content-Type", "application/json")];
    for target in [
        "/api/../validate",
        "/api/../pay",
        "/api/%2e%2e/pay",
        "/api/%2E%2E/lookup",
        "/api/.%2e/notify",
        "/api/%2e./reserve",
        "/api/./batches",
        "/api/%2e/batches",
        "/api/..%2fpay",
        "/api/%2e%2e%5Cpay",
        "/api/batches/../../validate",
        "/./ticket-lookup/messages",
        "/admin/queues/..",
    ] {
        let r = raw(&s.url, "POST", target, &json, &forged);
        assert_eq!(r.status, 400, "{target}: {}", r.body);
        let p = r.problem();
        let detail = p["detail"].as_str().unwrap();
        assert!(detail.contains("dot segment") || detail.contains("backslash"), "{target}: {p}");
    }
    // The same with the key: a key does not make such a path acceptable.
    let r = raw(&s.url, "POST", "/api/../pay", &[("x-functions-key", OPS_KEY)], &forged);
    assert_eq!(r.status, 400, "{}", r.body);
    // A backslash, and the absolute form of the request target, are refused too.
    let r = raw(&s.url, "POST", "/api\\..\\validate", &json, &forged);
    assert_eq!(r.status, 400, "{}", r.body);
    let absolute = format!("{}/api/../validate", s.url);
    let r = raw(&s.url, "POST", &absolute, &json, &forged);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.problem()["detail"].as_str().unwrap().contains("`..`"));

    let after = ok_json(get(&s, &ticket_path, Some(OPS_KEY)));
    assert_eq!(before, after, "the forged invocations did nothing to the ticket");

    // Ordinary paths still work, and the API still wants its key.
    let r = raw(&s.url, "GET", &format!("/api/batches/{batch}"), &[("x-functions-key", OPS_KEY)], "");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = raw(&s.url, "POST", "/api/validate", &json, &forged);
    assert_eq!(r.status, 401, "{}", r.body);
}

#[test]
fn admin_needs_an_operator_key_when_keys_are_configured() {
    let data = tempfile::tempdir().unwrap();
    let s = keyed_stack(data.path());
    for path in ["/admin/queues", "/admin/queues/ticket-lookup/deadletters"] {
        let p = problem(get(&s, path, None), 401);
        assert!(p["detail"].as_str().unwrap().contains("x-functions-key"), "{path}: {p}");
        problem(get(&s, path, Some("not-a-key")), 401);
        problem(get(&s, &format!("{path}?code=not-a-key"), None), 401);
        let p = problem(get(&s, path, Some(ACME_API_KEY)), 403);
        assert!(p["detail"].as_str().unwrap().contains("operator"), "{path}: {p}");
        ok_json(get(&s, path, Some(OPS_KEY)));
        ok_json(get(&s, &format!("{path}?code={OPS_KEY}"), None));
    }
    assert!(ok_json(get(&s, "/admin/queues", Some(OPS_KEY)))["ticket-lookup"].is_object());
}

#[test]
fn without_keys_admin_is_open_as_the_api_is() {
    let data = tempfile::tempdir().unwrap();
    let s = stack(data.path());
    assert!(ok_json(get(&s, "/admin/queues", None))["ticket-lookup"].is_object());
    ok_json(get(&s, "/admin/queues/ticket-lookup/deadletters", None));
}

#[test]
fn only_the_holder_of_the_hosts_token_may_send_to_its_queues() {
    let data = tempfile::tempdir().unwrap();
    let s = keyed_stack(data.path());
    let forged = json!({ "batch_id": "b-0000000000000000000000000000000a", "ticket_id": "T000001", "attempt": 1 }).to_string();
    let json = ("Content-Type", "application/json");
    let batch = ("Content-Type", "application/vnd.microsoft.servicebus.json");
    let batch_body = json!([{ "Body": forged, "BrokerProperties": { "MessageId": "m-forged-batch" } }]).to_string();
    for (auth, content_type, body) in [
        (None, json, forged.as_str()),
        (Some("Bearer not-the-token"), json, forged.as_str()),
        (Some("Bearer "), json, forged.as_str()),
        (Some("SharedAccessSignature sr=x&sig=y&se=1&skn=RootManageSharedAccessKey"), json, forged.as_str()),
        (None, batch, batch_body.as_str()),
        (Some("Bearer not-the-token"), batch, batch_body.as_str()),
    ] {
        let mut headers = vec![content_type, ("BrokerProperties", r#"{"MessageId":"m-forged"}"#)];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        // An operator's API key is not a Service Bus token.
        headers.push(("x-functions-key", OPS_KEY));
        let r = raw(&s.url, "POST", "/ticket-lookup/messages", &headers, body);
        assert_eq!(r.status, 401, "{auth:?}: {}", r.body);
        assert!(r.problem()["detail"].as_str().unwrap().contains("token"), "{}", r.body);
    }
    let queues = ok_json(get(&s, "/admin/queues", Some(OPS_KEY)));
    for (name, q) in queues.as_object().unwrap() {
        for key in ["active", "scheduled", "locked", "dead_lettered"] {
            assert_eq!(q[key].as_u64().unwrap_or(0), 0, "nothing was queued: {name}: {q}");
        }
    }

    // The handler holds the token: the pipeline still runs end to end.
    let batch = upload(&s, 20);
    let status = wait_complete(&s, &batch);
    assert_batch_invariants(&status, &stats(&s.providers_url), 20);
}
