//! The custom-handler contract, as the Azure Functions host speaks it: a real
//! `ticketpay handler` process invoked with the host's exact payload shapes.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use serde_json::{Value, json};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Handler {
    _process: Process,
    url: String,
    http: reqwest::blocking::Client,
}

/// The Service Bus token the local host is given, so a handler it did not start may send to it.
const BUS_TOKEN: &str = "contract-bus-token-7c1e";

/// A handler started as the host would, sending its messages to a local host's queues.
fn handler(stack: &Stack, data: &std::path::Path) -> Handler {
    let port = free_port().to_string();
    let data = data.to_str().unwrap();
    let env = [
        ("FUNCTIONS_CUSTOMHANDLER_PORT", port.as_str()),
        ("TICKETPAY_BUS_URL", stack.url.as_str()),
        ("TICKETPAY_BUS_TOKEN", BUS_TOKEN),
        ("TICKETPAY_DATA_DIR", data),
        ("TICKETPAY_PROVIDERS_URL", stack.providers_url.as_str()),
        ("TICKETPAY_PROVIDERS_CONFIG", "zero-latency"),
    ];
    let (process, _) = Process::start(&["handler"], &env, &[]);
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{url}/")).send().is_err() {
        assert!(Instant::now() < deadline, "the handler answers GET / within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    Handler { _process: process, url, http }
}

/// The body the Functions host posts for a Service Bus trigger with `dataType: binary`.
fn invocation(body: &Value, delivery_count: u32, message_id: &str) -> Value {
    json!({
        "Data": { "message": base64::engine::general_purpose::STANDARD.encode(body.to_string()) },
        "Metadata": {
            "DeliveryCount": delivery_count.to_string(),
            "LockToken": "\"2f1c8d3e-0000-4000-8000-000000000001\"",
            "MessageId": format!("\"{message_id}\""),
            "SequenceNumber": "42",
            "EnqueuedTimeUtc": "2026-11-21T04:34:42",
            "EnqueuedTime": "2026-11-21T04:34:42+00:00",
            "ExpiresAtUtc": "2026-12-05T04:34:42",
            "ContentType": "\"application/json\"",
            "ApplicationProperties": { "batch_id": "x", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" },
            "UserProperties": { "batch_id": "x", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" },
            "MessageActions": {}, "Client": {}, "ReceiveActions": {},
            "PartitionKey": "\"p\"",
            "sys": { "MethodName": "lookup", "UtcNow": "2026-11-21T04:34:42.1234567Z", "RandGuid": "0f8fad5b-d9cb-469f-a165-70867728950e" },
            "SomeFutureKey": "\"ignored\""
        }
    })
}

#[test]
fn queue_invocations_follow_the_host_contract() {
    let host_data = tempfile::tempdir().unwrap();
    let handler_data = tempfile::tempdir().unwrap();
    let env = [("TICKETPAY_BUS_TOKEN", BUS_TOKEN)];
    let stack = Stack::start(StackOptions { scenario: "zero-latency", providers_url: None, data: host_data.path(), env: &env, extra_args: &[] });
    let h = handler(&stack, handler_data.path());

    assert!(h.http.get(format!("{}/", h.url)).send().unwrap().status().is_success(), "readiness: GET /");

    let upload = h.http.post(format!("{}/api/batches", h.url)).json(&batch_json("acme", 1, "1000.00")).send().unwrap();
    assert_eq!(upload.status().as_u16(), 202);
    let batch = upload.json::<Value>().unwrap()["batch_id"].as_str().unwrap().to_owned();
    let ticket_url = format!("{}/api/batches/{batch}/tickets/T000001", h.url);
    let before: Value = h.http.get(&ticket_url).send().unwrap().json().unwrap();
    assert_eq!(before["status"], "lookup");

    let message = json!({"batch_id": batch, "ticket_id": "T000001", "attempt": 0});
    let invoke = |function: &str, payload: &Value| {
        h.http
            .post(format!("{}/{function}", h.url))
            .header("Content-Type", "application/json; charset=utf-8")
            .header("X-Azure-Functions-HostVersion", "4.1040.300.0")
            .header("X-Azure-Functions-InvocationId", "6b0b4c4e-9f4e-4c1a-9a57-0d3a2c4f5e6a")
            .header("User-Agent", "Azure-Functions-Host/4.1040.300.0")
            .json(payload)
            .send()
            .unwrap()
    };

    let r = invoke("lookup", &invocation(&message, 1, "m-1"));
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    let reply: Value = r.json().unwrap();
    assert!(reply.is_object(), "the reply is a JSON object: {reply}");
    assert!(reply["Logs"].as_array().is_some_and(|l| !l.is_empty()), "{reply}");
    let after: Value = h.http.get(&ticket_url).send().unwrap().json().unwrap();
    assert_ne!(after["status"], "lookup", "the lookup ran: {after}");

    // The same message again (a redelivery) changes nothing.
    let r = invoke("lookup", &invocation(&message, 2, "m-1"));
    assert_eq!(r.status().as_u16(), 200);
    let again: Value = h.http.get(&ticket_url).send().unwrap().json().unwrap();
    assert_eq!(again, after, "a redelivered message changes nothing");

    // Without dataType the host sends the body as a JSON string encoded once more.
    let validate = json!({"batch_id": batch, "ticket_id": "T000001", "attempt": 0});
    let mut string_payload = invocation(&validate, 1, "m-2");
    string_payload["Data"]["message"] = Value::String(Value::String(validate.to_string()).to_string());
    let r = invoke("validate", &string_payload);
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().unwrap());

    // Failures are non-2xx, so the host abandons and redelivers (and finally dead-letters).
    let r = invoke("lookup", &json!({"Data": {"message": "%%%not base64"}, "Metadata": {}}));
    assert!(r.status().is_client_error(), "{}", r.status());
    let r = invoke("lookup", &invocation(&json!({"unexpected": true}), 1, "m-3"));
    assert!(r.status().is_client_error());
    let r = invoke("no-such-function", &invocation(&message, 1, "m-4"));
    assert_eq!(r.status().as_u16(), 404);
    let body: Value = r.json().unwrap();
    assert!(body["error"].as_str().unwrap().contains("no-such-function"));
}

/// The body the Functions host posts for a Service Bus trigger with
/// `"cardinality": "many"` and `dataType: binary`: the bodies and every metadata
/// column are arrays serialised into JSON strings (`GetHttpScriptInvocationContextValue`
/// falls back to `JsonConvert.SerializeObject` for anything not an object).
fn batch_invocation(bodies: &[Value], message_ids: &[&str]) -> Value {
    let n = bodies.len();
    let encoded: Vec<String> = bodies.iter().map(|b| base64::engine::general_purpose::STANDARD.encode(b.to_string())).collect();
    let text = |v: Value| Value::String(v.to_string());
    let props = json!({ "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" });
    json!({
        "Data": { "message": text(json!(encoded)) },
        "Metadata": {
            "DeliveryCountArray": text(json!(vec![1; n])),
            "LockTokenArray": text(json!((0..n).map(|i| format!("2f1c8d3e-0000-4000-8000-{i:012}")).collect::<Vec<_>>())),
            "MessageIdArray": text(json!(message_ids)),
            "SequenceNumberArray": text(json!((0..n).map(|i| 42 + i).collect::<Vec<_>>())),
            "EnqueuedTimeUtcArray": text(json!(vec!["2026-11-21T04:34:42.123"; n])),
            "ContentTypeArray": text(json!(vec![Value::Null; n])),
            "SessionIdArray": text(json!(vec![Value::Null; n])),
            "ApplicationPropertiesArray": text(json!(vec![props.clone(); n])),
            "UserPropertiesArray": text(json!(vec![props; n])),
            "MessageActions": {}, "MessageReceiver": {}, "MessageSession": {}, "SessionActions": {}, "Client": {}, "ReceiveActions": {},
            "sys": { "MethodName": "lookup", "UtcNow": "2026-11-21T04:34:42.1234567Z", "RandGuid": "0f8fad5b-d9cb-469f-a165-70867728950e" }
        }
    })
}

#[test]
fn a_batch_invocation_settles_each_message_and_answers_for_the_batch() {
    let host_data = tempfile::tempdir().unwrap();
    let handler_data = tempfile::tempdir().unwrap();
    let env = [("TICKETPAY_BUS_TOKEN", BUS_TOKEN)];
    let stack = Stack::start(StackOptions { scenario: "zero-latency", providers_url: None, data: host_data.path(), env: &env, extra_args: &[] });
    let h = handler(&stack, handler_data.path());
    let upload = h.http.post(format!("{}/api/batches", h.url)).json(&batch_json("acme", 3, "1000.00")).send().unwrap();
    assert_eq!(upload.status().as_u16(), 202);
    let batch = upload.json::<Value>().unwrap()["batch_id"].as_str().unwrap().to_owned();
    let status = |t: &str| -> Value {
        h.http.get(format!("{}/api/batches/{batch}/tickets/{t}", h.url)).send().unwrap().json::<Value>().unwrap()["status"].clone()
    };
    let message = |t: &str| json!({"batch_id": batch, "ticket_id": t, "attempt": 0});
    let invoke = |payload: &Value| {
        h.http
            .post(format!("{}/lookup", h.url))
            .header("Content-Type", "application/json; charset=utf-8")
            .header("X-Azure-Functions-InvocationId", "6b0b4c4e-9f4e-4c1a-9a57-0d3a2c4f5e6a")
            .json(payload)
            .send()
            .unwrap()
    };

    // Three tickets, one of them twice (a duplicate delivery), and a message that is no stage message at all.
    let bodies = [message("T000001"), message("T000002"), message("T000001"), json!({"unexpected": true}), message("T000003")];
    let r = invoke(&batch_invocation(&bodies, &["m-1", "m-2", "m-1", "m-x", "m-3"]));
    assert_eq!(r.status().as_u16(), 200, "one bad message does not send its batch-mates round again");
    let reply: Value = r.json().unwrap();
    assert_eq!(reply["Logs"].as_array().map(Vec::len), Some(5), "a log line per message: {reply}");
    assert!(reply["Logs"].as_array().unwrap().iter().any(|l| l.as_str().unwrap().contains("dropped")), "{reply}");
    for t in ["T000001", "T000002", "T000003"] {
        assert_ne!(status(t), "lookup", "{t} was looked up");
    }

    // The same batch again (the host's redelivery) changes nothing.
    let before: Vec<Value> = ["T000001", "T000002", "T000003"].iter().map(|t| status(t)).collect();
    assert_eq!(invoke(&batch_invocation(&bodies, &["m-1", "m-2", "m-1", "m-x", "m-3"])).status().as_u16(), 200);
    assert_eq!(["T000001", "T000002", "T000003"].iter().map(|t| status(t)).collect::<Vec<_>>(), before);

    // A batch whose columns disagree is no batch the host sends: refused whole.
    let mut broken = batch_invocation(&bodies[..2], &["m-1", "m-2"]);
    broken["Metadata"]["MessageIdArray"] = Value::String(json!(["m-1"]).to_string());
    let r = invoke(&broken);
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().unwrap().contains("MessageIdArray"));
}

#[test]
fn a_missing_setting_stops_the_handler_with_its_name() {
    let out = Command::new(BIN)
        .arg("handler")
        .env_remove("TICKETPAY_BUS_URL")
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", free_port().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TICKETPAY_BUS_URL"), "{stderr}");

    let out = Command::new(BIN)
        .arg("handler")
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", "not-a-port")
        .env("TICKETPAY_BUS_URL", "http://127.0.0.1:1")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("FUNCTIONS_CUSTOMHANDLER_PORT"));
}
