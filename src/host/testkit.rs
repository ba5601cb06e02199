//! Helpers for the host's tests: a throw-away app root, a recording fake
//! handler (a real HTTP server), and a running host core.

use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::Core;
use super::config::HostConfig;
use super::guard::{BusToken, Guard};
use crate::keys::Access;
use super::worker::WorkerState;

/// The token senders present to a core started by [`core`].
pub const BUS_TOKEN: &str = "test-bus-token";

/// One queue function: (function name, queue, sessions, maxDeliveryCount).
pub type Fn_ = (&'static str, &'static str, bool, u32);

pub fn app(functions: &[Fn_]) -> tempfile::TempDir {
    app_with(functions, None)
}

/// Like [`app`], with every queue function on `"cardinality": "many"` and
/// `batches` (e.g. `{"maxMessageBatchSize": 3}`) added to `extensions.serviceBus`.
pub fn batch_app(functions: &[Fn_], batches: Value) -> tempfile::TempDir {
    app_with(functions, Some(batches))
}

fn app_with(functions: &[Fn_], batches: Option<Value>) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let mut service_bus = json!({"maxConcurrentCalls": 8, "maxConcurrentSessions": 3, "maxAutoLockRenewalDuration": "00:00:05"});
    if let Some(Value::Object(extra)) = &batches {
        service_bus.as_object_mut().unwrap().extend(extra.clone());
    }
    let cardinality = if batches.is_some() { "many" } else { "one" };
    let host = json!({
        "version": "2.0",
        "functionTimeout": "00:00:05",
        "customHandler": {"description": {"defaultExecutablePath": "ticketpay", "arguments": ["handler"]}, "enableProxyingHttpRequest": true},
        "extensions": {"serviceBus": service_bus}
    });
    std::fs::write(d.path().join("host.json"), host.to_string()).unwrap();
    let write = |name: &str, f: Value| {
        let dir = d.path().join("functions").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("function.json"), f.to_string()).unwrap();
    };
    write("api", json!({"bindings": [
        {"type": "httpTrigger", "direction": "in", "name": "req", "route": "{*route}"},
        {"type": "http", "direction": "out", "name": "res"}]}));
    for (name, queue, sessions, max) in functions {
        write(name, json!({"bindings": [{
            "type": "serviceBusTrigger", "direction": "in", "name": "message", "queueName": queue,
            "dataType": "binary", "cardinality": cardinality, "isSessionsEnabled": sessions,
            "queueSettings": {"lockDuration": "PT30S", "maxDeliveryCount": max, "duplicateDetectionHistoryTimeWindow": "PT10M"}}]}));
    }
    d
}

/// What the fake handler received.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Call {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

pub type Calls = Arc<Mutex<Vec<Call>>>;

/// A handler on a real port answering with `respond(call number, call)`.
pub async fn fake_handler<F>(respond: F) -> (String, Calls)
where
    F: Fn(usize, &Call) -> Response + Send + Sync + 'static,
{
    let calls: Calls = Arc::default();
    let respond = Arc::new(respond);
    let c = calls.clone();
    let app = Router::new().fallback(move |req: Request| {
        let calls = c.clone();
        let respond = respond.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap().to_vec();
            let call = Call {
                method: parts.method.to_string(),
                path_and_query: parts.uri.path_and_query().unwrap().to_string(),
                headers: parts.headers,
                body,
            };
            let n = {
                let mut v = calls.lock().unwrap();
                v.push(call.clone());
                v.len()
            };
            respond(n, &call)
        }
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, calls)
}

pub fn ok_json() -> Response {
    ([("content-type", "application/json")], r#"{"Outputs":{},"Logs":["done"]}"#).into_response()
}

pub fn fail() -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()
}

/// A host core over `app_root` delivering to `handler_url`, handler state as given.
pub async fn core(app_root: &Path, data: &Path, handler_url: &str, state: WorkerState) -> (Core, watch::Sender<WorkerState>) {
    let config = HostConfig::load(app_root).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (tx, rx) = watch::channel(state);
    let guard = Guard { access: Access::Open, bus_token: BusToken::given(BUS_TOKEN) };
    let instance = super::Instance::new("instance-0".into(), handler_url.to_string(), rx);
    let core = Core::start(config, data, l, vec![instance], guard).await.unwrap();
    (core, tx)
}

/// Polls `f` until it holds (5 s limit).
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

pub async fn admin(url: &str) -> Value {
    reqwest::get(format!("{url}/admin/queues")).await.unwrap().json().await.unwrap()
}
