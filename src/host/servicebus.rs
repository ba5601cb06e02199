//! The Service Bus REST send endpoints (`POST /{queue}/messages`, single and
//! batch) served on loopback for the bearer of the host's token, plus
//! `GET /admin/queues` and each queue's dead letters for operators (see
//! [`super::guard`]).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Shared, guard};
use super::queue::{NewMessage, QueueCounts, now_ms};

pub const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.servicebus.json";

pub(crate) fn routes(shared: &Arc<Shared>) -> Router<Arc<Shared>> {
    // Nested, so the operator check also covers every other path under /admin.
    let admin = Router::new()
        .route("/queues", get(admin_queues))
        .route("/queues/{queue}/deadletters", get(dead_letters))
        .route("/faults", post(inject_fault))
        .route("/instances", get(admin_instances))
        .fallback(|| async { problem(StatusCode::NOT_FOUND, "no such admin endpoint") })
        .layer(from_fn_with_state(shared.clone(), guard::require_operator));
    let send = Router::new()
        .route("/{queue}/messages", post(send))
        .route_layer(from_fn_with_state(shared.clone(), guard::require_bus_token));
    Router::new().nest("/admin", admin).merge(send)
}

/// An `application/problem+json` answer.
pub(crate) fn problem(status: StatusCode, detail: impl Into<String>) -> Response {
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    (status, [(header::CONTENT_TYPE, "application/problem+json")], body.to_string()).into_response()
}

/// `BrokerProperties` as the REST API takes them.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct BrokerProperties {
    message_id: Option<String>,
    session_id: Option<String>,
    correlation_id: Option<String>,
    #[serde(alias = "Subject")]
    label: Option<String>,
    content_type: Option<String>,
    reply_to: Option<String>,
    to: Option<String>,
    reply_to_session_id: Option<String>,
    partition_key: Option<String>,
    /// Seconds.
    time_to_live: Option<f64>,
    /// RFC 1123, e.g. `Sat, 21 Nov 2026 04:34:42 GMT`.
    scheduled_enqueue_time_utc: Option<String>,
}

impl BrokerProperties {
    fn into_message(self, body: Vec<u8>, properties: Map<String, Value>, at: &str) -> Result<NewMessage, String> {
        let time_to_live = match self.time_to_live {
            None => None,
            Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s.min(1e12))),
            Some(s) => return Err(format!("{at}.TimeToLive must be a positive number of seconds, got {s}")),
        };
        let scheduled_at = match self.scheduled_enqueue_time_utc.as_deref() {
            None | Some("") => None,
            Some(s) => Some(parse_time(s).ok_or_else(|| {
                format!("{at}.ScheduledEnqueueTimeUtc: {s:?} is not a date like \"Sat, 21 Nov 2026 04:34:42 GMT\" (RFC 1123)")
            })?),
        };
        Ok(NewMessage {
            message_id: self.message_id.filter(|s| !s.is_empty()),
            session_id: self.session_id,
            correlation_id: self.correlation_id,
            label: self.label,
            content_type: self.content_type,
            reply_to: self.reply_to,
            to: self.to,
            reply_to_session_id: self.reply_to_session_id,
            partition_key: self.partition_key,
            time_to_live,
            scheduled_at,
            properties,
            body,
        })
    }
}

fn parse_time(s: &str) -> Option<i64> {
    if let Ok(t) = httpdate::parse_http_date(s) {
        let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
        return Some(d.as_millis() as i64);
    }
    chrono::DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_millis())
}

/// Request headers that are transport, not application properties.
fn is_transport_header(name: &str) -> bool {
    matches!(
        name,
        "content-type"
            | "content-length"
            | "content-encoding"
            | "host"
            | "authorization"
            | "brokerproperties"
            | "accept"
            | "accept-encoding"
            | "accept-language"
            | "user-agent"
            | "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "expect"
            | "date"
            | "cache-control"
            | "pragma"
            | "cookie"
            | "origin"
            | "referer"
            | "proxy-authorization"
            | "proxy-connection"
    ) || name.starts_with("x-ms-")
        || name.starts_with("x-forwarded-")
}

/// A custom property header value: JSON-typed as the REST API allows
/// (`"text"` is the string text, `5` a number, `true` a boolean), anything
/// else taken verbatim as a string.
fn property_value(raw: &str) -> Value {
    match serde_json::from_str::<Value>(raw.trim()) {
        Ok(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => v,
        _ => Value::String(raw.to_string()),
    }
}

fn parse_single(headers: &HeaderMap, body: Bytes) -> Result<NewMessage, String> {
    let props: BrokerProperties = match headers.get("brokerproperties") {
        None => BrokerProperties::default(),
        Some(v) => {
            let s = v.to_str().map_err(|_| "BrokerProperties header is not valid text".to_string())?;
            if s.trim().is_empty() {
                BrokerProperties::default()
            } else {
                serde_json::from_str(s).map_err(|e| format!("BrokerProperties header is not a valid JSON object: {e}"))?
            }
        }
    };
    let mut properties = Map::new();
    for (name, value) in headers {
        let name = name.as_str();
        if is_transport_header(name) {
            continue;
        }
        let Ok(v) = value.to_str() else { continue };
        properties.insert(name.to_string(), property_value(v));
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut m = props.into_message(body.to_vec(), properties, "BrokerProperties")?;
    if m.content_type.is_none() {
        m.content_type = content_type;
    }
    Ok(m)
}

#[derive(Deserialize)]
struct BatchItem {
    #[serde(rename = "Body")]
    body: Option<Value>,
    #[serde(rename = "BrokerProperties")]
    broker_properties: Option<BrokerProperties>,
    #[serde(rename = "UserProperties")]
    user_properties: Option<Map<String, Value>>,
}

fn parse_batch(body: &[u8]) -> Result<Vec<NewMessage>, String> {
    let items: Vec<BatchItem> = serde_json::from_slice(body).map_err(|e| {
        format!("batch body must be a JSON array of {{\"Body\", \"BrokerProperties\", \"UserProperties\"}}: {e}")
    })?;
    if items.is_empty() {
        return Err("batch body is an empty array".into());
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, it)| {
            let body = match it.body {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::String(s)) => s.into_bytes(),
                Some(other) => other.to_string().into_bytes(),
            };
            it.broker_properties.unwrap_or_default().into_message(
                body,
                it.user_properties.unwrap_or_default(),
                &format!("[{i}].BrokerProperties"),
            )
        })
        .collect()
}

async fn send(State(s): State<Arc<Shared>>, Path(queue): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(left) = s.bus_down_for() {
        return problem(StatusCode::SERVICE_UNAVAILABLE, format!("Service Bus is unreachable for {}s more (injected fault)", left.as_secs()));
    }
    let Some(spec) = s.queue(&queue).cloned() else {
        return problem(StatusCode::NOT_FOUND, format!("no queue named {queue:?} (queues come from functions/*/function.json)"));
    };
    let is_batch = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with(BATCH_CONTENT_TYPE));
    let parsed = if is_batch { parse_batch(&body) } else { parse_single(&headers, body).map(|m| vec![m]) };
    let msgs = match parsed {
        Ok(m) => m,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e),
    };
    if spec.trigger.sessions && msgs.iter().any(|m| m.session_id.as_deref().is_none_or(str::is_empty)) {
        return problem(
            StatusCode::BAD_REQUEST,
            format!("queue {} requires sessions: every message needs BrokerProperties.SessionId", spec.trigger.queue),
        );
    }
    let store = s.store.clone();
    let q = spec.trigger.queue.clone();
    let window = spec.trigger.settings.duplicate_detection_window;
    match tokio::task::spawn_blocking(move || store.send(&q, window, msgs, now_ms())).await {
        Ok(Ok(_)) => {
            spec.wake();
            StatusCode::CREATED.into_response()
        }
        Ok(Err(e)) => problem(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot store the message: {e:#}")),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot store the message: {e}")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    bus_unreachable_seconds: u64,
}

/// `POST /admin/faults {"bus_unreachable_seconds": N}`: fault injection for the
/// suites; from now, for N seconds (0 ends it), every send answers 503 as an
/// unreachable namespace would make the sender fail.
async fn inject_fault(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let request: FaultRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return problem(StatusCode::BAD_REQUEST, format!("expected {{\"bus_unreachable_seconds\": N}}: {e}")),
    };
    let until = std::time::Instant::now() + Duration::from_secs(request.bus_unreachable_seconds);
    *s.bus_down_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
    axum::Json(json!({ "bus_unreachable_seconds": request.bus_unreachable_seconds })).into_response()
}

/// `{"instances": [{"instance", "url", "pid", "state", "invocations", "slices"}]}`:
/// each handler instance and the leases (`{data}/leases.db`) it holds now.
async fn admin_instances(State(s): State<Arc<Shared>>) -> Response {
    use crate::leases::Leases;
    let db = s.data.join("leases.db");
    let mut held: std::collections::HashMap<String, Vec<String>> = Default::default();
    if db.exists() {
        let holders = match crate::leases::sqlite::SqliteLeases::open(&db) {
            Ok(l) => l.holders("").await,
            Err(e) => Err(e),
        };
        match holders {
            Ok(h) => {
                for (resource, holder) in h {
                    held.entry(holder).or_default().push(resource);
                }
            }
            Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read the leases: {e:#}")),
        }
    }
    let list: Vec<Value> = s
        .instances
        .iter()
        .map(|i| {
            let state = match &*i.state.borrow() {
                super::worker::WorkerState::Starting => "starting",
                super::worker::WorkerState::Ready => "ready",
                super::worker::WorkerState::Down(_) => "restarting",
                super::worker::WorkerState::Stopped => "stopped",
            };
            let pid = i.pid.load(std::sync::atomic::Ordering::Relaxed);
            let mut slices = held.remove(&i.id).unwrap_or_default();
            slices.sort();
            json!({
                "instance": i.id,
                "url": i.url,
                "pid": (pid > 0).then_some(pid),
                "state": state,
                "invocations": i.invocations.load(std::sync::atomic::Ordering::Relaxed),
                "slices": slices,
            })
        })
        .collect();
    axum::Json(json!({ "instances": list })).into_response()
}

/// `{"<queue>": {"function", "sessions", "active", "scheduled", "locked", "dead_lettered"}}`.
async fn admin_queues(State(s): State<Arc<Shared>>) -> Response {
    let store = s.store.clone();
    let counts = match tokio::task::spawn_blocking(move || store.counts(now_ms())).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return problem(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let mut out = Map::new();
    for spec in s.queues.values() {
        let c = counts.get(&spec.trigger.queue).copied().unwrap_or_default();
        out.insert(spec.trigger.queue.clone(), entry(Some(&spec.function), spec.trigger.sessions, c));
    }
    for (q, c) in counts {
        if !out.contains_key(&q) {
            out.insert(q, entry(None, false, c));
        }
    }
    axum::Json(Value::Object(out)).into_response()
}

fn entry(function: Option<&str>, sessions: bool, c: QueueCounts) -> Value {
    json!({
        "function": function,
        "sessions": sessions,
        "active": c.active,
        "scheduled": c.scheduled,
        "locked": c.locked,
        "dead_lettered": c.dead_lettered,
    })
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

/// The dead-letter queue of one queue, oldest first (`?limit=`, default 100).
async fn dead_letters(State(s): State<Arc<Shared>>, Path(queue): Path<String>, Query(l): Query<Limit>) -> Response {
    let Some(spec) = s.queue(&queue) else {
        return problem(StatusCode::NOT_FOUND, format!("no queue named {queue:?}"));
    };
    let store = s.store.clone();
    let q = spec.trigger.queue.clone();
    let limit = l.limit.unwrap_or(100).min(10_000);
    match tokio::task::spawn_blocking(move || store.dead_letters(&q, limit)).await {
        Ok(Ok(d)) => axum::Json(d).into_response(),
        Ok(Err(e)) => problem(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::super::queue::{Message, Take};
    use super::super::testkit::*;
    use super::super::worker::WorkerState;
    use super::*;

    const FUNCTIONS: &[Fn_] = &[("lookup", "ticket-lookup", false, 10), ("reserve", "ticket-reserve", true, 10)];

    /// A host whose handler never becomes ready: messages stay queued.
    async fn host() -> (tempfile::TempDir, super::super::Core) {
        let app = app(FUNCTIONS);
        let (core, _state) = core(app.path(), &app.path().join("data"), "http://127.0.0.1:9", WorkerState::Starting).await;
        (app, core)
    }

    fn take(core: &super::super::Core, queue: &str, sessions: bool) -> Vec<Message> {
        let busy = HashSet::new();
        core.shared
            .store
            .receive(queue, Take::up_to(100), sessions.then_some(&busy), Duration::from_secs(30), now_ms() + 3_600_000)
            .unwrap()
            .messages
    }

    #[tokio::test]
    async fn admin_instances_lists_each_handler_instance() {
        let (_app, core) = host().await;
        let r: serde_json::Value =
            reqwest::get(format!("{}/admin/instances", core.url)).await.unwrap().json().await.unwrap();
        let list = r["instances"].as_array().unwrap();
        assert_eq!(list.len(), 1, "{r}");
        let i = &list[0];
        assert_eq!(i["instance"], "instance-0");
        assert_eq!(i["url"], "http://127.0.0.1:9");
        assert_eq!(i["state"], "starting");
        assert!(i["pid"].is_null(), "{i}");
        assert_eq!(i["invocations"], 0);
        assert_eq!(i["slices"], serde_json::json!([]), "no leases.db yet: no slices");
    }

    #[tokio::test]
    async fn single_message_with_broker_and_custom_properties() {
        let (_app, core) = host().await;
        let c = reqwest::Client::new();
        let r = c
            .post(format!("{}/TICKET-LOOKUP/messages?api-version=2021-05", core.url))
            .bearer_auth(BUS_TOKEN)
            .header("Content-Type", "application/json")
            .header("BrokerProperties", r#"{"MessageId":"m1","CorrelationId":"c1","Label":"lookup","TimeToLive":7200}"#)
            .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .header("batch_id", "\"b1\"")
            .header("attempt", "2")
            .body(r#"{"ticket":"t1"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let m = take(&core, "ticket-lookup", false);
        assert_eq!(m.len(), 1);
        let m = &m[0];
        assert_eq!(m.message_id, "m1");
        assert_eq!(m.correlation_id.as_deref(), Some("c1"));
        assert_eq!(m.label.as_deref(), Some("lookup"));
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.body, br#"{"ticket":"t1"}"#);
        assert_eq!(m.expires_at.unwrap() - m.enqueued_at, 7_200_000);
        let props = Value::Object(m.properties.clone());
        assert_eq!(
            props,
            json!({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "batch_id": "b1", "attempt": 2})
        );
    }

    #[tokio::test]
    async fn batch_scheduled_and_duplicates() {
        let (_app, core) = host().await;
        let c = reqwest::Client::new();
        let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3600));
        let batch = json!([
            {"Body": "one", "BrokerProperties": {"MessageId": "a"}, "UserProperties": {"k": "v"}},
            {"Body": "two", "BrokerProperties": {"MessageId": "b", "ScheduledEnqueueTimeUtc": later}},
            {"Body": "dup", "BrokerProperties": {"MessageId": "a"}}
        ]);
        let r = c
            .post(format!("{}/ticket-lookup/messages", core.url))
            .bearer_auth(BUS_TOKEN)
            .header("Content-Type", BATCH_CONTENT_TYPE)
            .body(batch.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        // A duplicate MessageId sent again later is accepted and dropped.
        let r = c
            .post(format!("{}/ticket-lookup/messages", core.url))
            .bearer_auth(BUS_TOKEN)
            .header("BrokerProperties", r#"{"MessageId":"a"}"#)
            .body("again")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let q = admin(&core.url).await;
        assert_eq!(q["ticket-lookup"], json!({"function": "lookup", "sessions": false, "active": 1, "scheduled": 1, "locked": 0, "dead_lettered": 0}));
        assert_eq!(q["ticket-reserve"]["sessions"], json!(true));
        let m = take(&core, "ticket-lookup", false);
        let bodies: Vec<_> = m.iter().map(|m| String::from_utf8_lossy(&m.body).into_owned()).collect();
        assert_eq!(bodies, ["one", "two"]);
        assert_eq!(Value::Object(m[0].properties.clone()), json!({"k": "v"}));
    }

    #[tokio::test]
    async fn errors() {
        let (_app, core) = host().await;
        let c = reqwest::Client::new();
        let post = |path: &str| c.post(format!("{}/{path}", core.url)).bearer_auth(BUS_TOKEN);

        let r = post("nope/messages").body("x").send().await.unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["content-type"], "application/problem+json");

        let r = post("ticket-lookup/messages").header("BrokerProperties", "{not json").body("x").send().await.unwrap();
        assert_eq!(r.status(), 400);
        assert!(r.text().await.unwrap().contains("BrokerProperties"));

        let r = post("ticket-lookup/messages")
            .header("BrokerProperties", r#"{"ScheduledEnqueueTimeUtc":"tomorrow"}"#)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert!(r.text().await.unwrap().contains("ScheduledEnqueueTimeUtc"));

        let r = post("ticket-lookup/messages").header("Content-Type", BATCH_CONTENT_TYPE).body(r#"{"Body":"x"}"#).send().await.unwrap();
        assert_eq!(r.status(), 400);
        assert!(r.text().await.unwrap().contains("JSON array"));

        let r = post("ticket-reserve/messages").body("x").send().await.unwrap();
        assert_eq!(r.status(), 400);
        assert!(r.text().await.unwrap().contains("SessionId"));

        let r = post("ticket-reserve/messages").header("BrokerProperties", r#"{"SessionId":"batch-1"}"#).body("x").send().await.unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(take(&core, "ticket-reserve", true)[0].session_id.as_deref(), Some("batch-1"));
        assert_eq!(take(&core, "ticket-lookup", false).len(), 0, "nothing stored by the failed sends");
    }
}
