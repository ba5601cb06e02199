//! One distributed trace per ticket: the real stack exports its spans over
//! OTLP/JSON to a recorder on loopback, and the recorder's data is checked.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use serde_json::Value;

const SECRET: &str = "sk_live_TOPSECRET_4242";

#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    kind: u64,
    attributes: HashMap<String, String>,
    links: Vec<(String, String)>,
}

fn spans(bodies: &[String]) -> Vec<Span> {
    let mut out = Vec::new();
    for body in bodies {
        let v: Value = serde_json::from_str(body).expect("OTLP JSON");
        for rs in v["resourceSpans"].as_array().into_iter().flatten() {
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    let attributes = s["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            let value = &a["value"];
                            let text = value["stringValue"].as_str().map(str::to_owned).unwrap_or_else(|| {
                                value.as_object().and_then(|o| o.values().next()).map(|v| v.to_string().trim_matches('"').to_owned()).unwrap_or_default()
                            });
                            (a["key"].as_str().unwrap().to_owned(), text)
                        })
                        .collect();
                    let links = s["links"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|l| (l["traceId"].as_str().unwrap_or("").to_owned(), l["spanId"].as_str().unwrap_or("").to_owned()))
                        .collect();
                    out.push(Span {
                        trace_id: s["traceId"].as_str().unwrap().to_owned(),
                        span_id: s["spanId"].as_str().unwrap().to_owned(),
                        parent: s["parentSpanId"].as_str().unwrap_or("").to_owned(),
                        name: s["name"].as_str().unwrap().to_owned(),
                        kind: s["kind"].as_u64().unwrap_or(0),
                        attributes,
                        links,
                    });
                }
            }
        }
    }
    out
}

const SERVER: u64 = 2;
const CLIENT: u64 = 3;
const PRODUCER: u64 = 4;
const CONSUMER: u64 = 5;

#[test]
fn each_ticket_is_one_trace_from_upload_to_notify_with_no_secret_exported() {
    let (collector, bodies) = recorder();
    let data = tempfile::tempdir().unwrap();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.as_str()),
        ("TICKETPAY_PROVIDER_KEY_GATEWAY", SECRET),
        ("TICKETPAY_PROVIDER_KEY_AUTHORITY", SECRET),
    ];
    let stack = Stack::start(StackOptions { scenario: "zero-latency", providers_url: None, data: data.path(), env: &env, extra_args: &[] });
    let batch = stack.submit(12, "100000.00");
    stack.wait_complete(&batch, Duration::from_secs(120));
    let tickets = stack.all_tickets(&batch);
    // Each invocation exports its spans as it answers: the last ones follow the completion.
    let raw = poll("every ticket's notify span exported", Duration::from_secs(10), || {
        let raw = bodies.lock().unwrap().clone();
        let notified: HashSet<String> =
            spans(&raw).into_iter().filter(|s| s.kind == CONSUMER && s.name == "notify").filter_map(|s| s.attributes.get("ticket_id").cloned()).collect();
        (notified.len() == tickets.len()).then_some(raw)
    });
    assert!(!raw.is_empty(), "spans were exported");
    for body in &raw {
        assert!(!body.contains(SECRET), "a provider credential was exported");
    }
    let all = spans(&raw);
    // A batch invocation's span is its own trace, linked to the message spans it handled.
    let (invocations, all): (Vec<Span>, Vec<Span>) = all.into_iter().partition(|s| s.kind == CONSUMER && s.name.ends_with(" batch"));
    let upload = all.iter().find(|s| s.kind == SERVER && s.name == "POST /api/batches").expect("the upload span");
    assert_eq!(upload.attributes["batch_id"], batch);

    assert!(!invocations.is_empty(), "the queue functions take batches");
    let consumers: HashMap<(String, String), &Span> =
        all.iter().filter(|s| s.kind == CONSUMER).map(|s| ((s.trace_id.clone(), s.span_id.clone()), s)).collect();
    for inv in &invocations {
        assert!(!inv.links.is_empty(), "{} links the messages it handled", inv.name);
        for link in &inv.links {
            let handled = consumers.get(link).unwrap_or_else(|| panic!("{} links a message span: {link:?}", inv.name));
            assert_eq!(format!("{} batch", handled.name), inv.name);
            assert_ne!(handled.trace_id, inv.trace_id, "each message keeps its ticket's trace");
        }
    }
    for s in all.iter().filter(|s| s.span_id != upload.span_id) {
        assert_eq!(s.attributes.get("batch_id"), Some(&batch), "batch_id on {s:?}");
        assert!(s.attributes.get("ticket_id").is_some_and(|t| !t.is_empty()), "ticket_id on {s:?}");
        for key in ["client_id", "stage", "attempt", "outcome"] {
            assert!(s.attributes.contains_key(key), "{key} on {s:?}");
        }
    }

    let mut by_ticket: HashMap<&str, Vec<&Span>> = HashMap::new();
    for s in all.iter().filter(|s| s.span_id != upload.span_id) {
        by_ticket.entry(s.attributes["ticket_id"].as_str()).or_default().push(s);
    }
    assert_eq!(by_ticket.len(), 12, "every ticket has spans");
    let mut trace_ids = HashSet::new();
    for t in &tickets {
        let id = t["ticket_id"].as_str().unwrap();
        let spans = &by_ticket[id];
        let traces: HashSet<&str> = spans.iter().map(|s| s.trace_id.as_str()).collect();
        assert_eq!(traces.len(), 1, "ticket {id} is one trace: {traces:?}");
        let trace = *traces.iter().next().unwrap();
        assert!(trace_ids.insert(trace.to_owned()), "each ticket has a trace of its own");
        assert_ne!(trace, upload.trace_id, "the ticket's trace is not the upload's");

        let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        let roots: Vec<&&Span> = spans.iter().filter(|s| s.parent.is_empty()).collect();
        assert_eq!(roots.len(), 1, "one root for {id}");
        assert_eq!(roots[0].name, "ticket accepted");
        assert_eq!(roots[0].links, vec![(upload.trace_id.clone(), upload.span_id.clone())], "the ticket's trace links to the upload");
        assert!(upload.links.contains(&(roots[0].trace_id.clone(), roots[0].span_id.clone())), "the upload links to the ticket's trace");
        for s in spans.iter().filter(|s| !s.parent.is_empty()) {
            assert!(ids.contains(s.parent.as_str()), "{} of {id} has its parent in the same trace", s.name);
        }
        let by_id: HashMap<&str, &&Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
        let stages: Vec<&str> = spans.iter().filter(|s| s.kind == CONSUMER).map(|s| s.name.as_str()).collect();
        for stage in ["lookup", "notify"] {
            assert!(stages.contains(&stage), "{id} went through {stage}: {stages:?}");
        }
        for consumer in spans.iter().filter(|s| s.kind == CONSUMER) {
            assert_eq!(by_id[consumer.parent.as_str()].kind, PRODUCER, "{} follows the message that triggered it", consumer.name);
        }
        for call in spans.iter().filter(|s| s.kind == CLIENT) {
            assert_eq!(by_id[call.parent.as_str()].kind, CONSUMER, "a provider call happens inside a stage");
            assert_eq!(call.attributes["peer.service"], call.name.split(' ').next().unwrap());
        }
        if t["status"] == "paid" {
            let calls: HashSet<&str> = spans.iter().filter(|s| s.kind == CLIENT).map(|s| s.name.as_str()).collect();
            for c in ["authority lookup", "fraud check", "gateway capture", "settlement settle", "ledger post", "receipt issue", "notifier notify"] {
                assert!(calls.contains(c), "{c} in the trace of {id}");
            }
        }
        // Support jumps from the ticket's audit trail to its trace.
        let full = stack.get(&format!("/api/batches/{batch}/tickets/{id}"));
        assert_eq!(full["trace_id"], trace, "the ticket view names its trace");
        for e in full["timeline"].as_array().unwrap().iter().filter(|e| e["type"] == "exchange") {
            assert_eq!(e["trace_id"], trace, "{e}");
            assert!(!e.to_string().contains(SECRET));
            if e["provider"] == "gateway" || e["provider"] == "authority" {
                assert_eq!(e["request"]["headers"]["authorization"], "[REDACTED]", "the credential was sent, and hidden: {e}");
            }
        }
    }
}
