//! One invocation of a queue-triggered function, in the custom-handler wire
//! format of the real Functions host: `POST /{FunctionName}` with
//! `{"Data": {...}, "Metadata": {...}}`, values encoded as the host encodes them.

use base64::Engine;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::QueueSpec;
use super::config::DataType;
use super::queue::Message;

/// Reported in `X-Azure-Functions-HostVersion` and `User-Agent`.
pub const HOST_VERSION: &str = "4.1037.0";

#[derive(Debug)]
pub enum InvokeError {
    /// The request never reached the handler (connection refused): the
    /// delivery does not count.
    NotDelivered(String),
    /// The handler failed the invocation (or broke off mid-way).
    Failed(String),
}

/// A string as the host sends it in Metadata: JSON-encoded again.
fn quoted(s: &str) -> Value {
    Value::String(Value::String(s.to_string()).to_string())
}

/// DateTime (UTC): `2025-01-02T03:04:05`.
fn date_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S").to_string()
}

fn millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// The request body for delivering `m` to `spec`'s function.
pub(crate) fn payload(spec: &QueueSpec, m: &Message, now: DateTime<Utc>) -> Value {
    let t = &spec.trigger;
    let data = match t.data_type {
        DataType::Binary => Value::String(base64::engine::general_purpose::STANDARD.encode(&m.body)),
        DataType::String => quoted(&String::from_utf8_lossy(&m.body)),
    };
    let mut md = Map::new();
    md.insert("DeliveryCount".into(), Value::String(m.delivery_count.to_string()));
    md.insert("LockToken".into(), quoted(&m.lock_token));
    md.insert("MessageId".into(), quoted(&m.message_id));
    md.insert("SequenceNumber".into(), Value::String(m.sequence_number.to_string()));
    let enq = millis(m.enqueued_at);
    md.insert("EnqueuedTimeUtc".into(), Value::String(date_time(enq)));
    md.insert("EnqueuedTime".into(), Value::String(format!("{}+00:00", date_time(enq))));
    let exp = match m.expires_at {
        Some(ms) => date_time(millis(ms)),
        None => "9999-12-31T23:59:59".to_string(),
    };
    md.insert("ExpiresAt".into(), Value::String(format!("{exp}+00:00")));
    md.insert("ExpiresAtUtc".into(), Value::String(exp));
    let optional = [
        ("ContentType", &m.content_type),
        ("CorrelationId", &m.correlation_id),
        ("SessionId", &m.session_id),
        ("ReplyTo", &m.reply_to),
        ("To", &m.to),
        ("ReplyToSessionId", &m.reply_to_session_id),
        ("PartitionKey", &m.partition_key),
        ("Subject", &m.label),
        ("Label", &m.label),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            md.insert(k.into(), quoted(v));
        }
    }
    md.insert("ApplicationProperties".into(), Value::Object(m.properties.clone()));
    md.insert("UserProperties".into(), Value::Object(m.properties.clone()));
    // Without dataType binary the host also copies a JSON body's top-level
    // scalars into Metadata (as JSON-encoded strings).
    if t.data_type == DataType::String
        && let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&m.body)
    {
        for (k, v) in body {
            let s = match v {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => continue,
            };
            md.entry(k).or_insert_with(|| quoted(&s));
        }
    }
    md.insert(
        "sys".into(),
        json!({
            "MethodName": spec.function,
            "UtcNow": format!("{}.{:07}Z", date_time(now), now.timestamp_subsec_nanos() / 100),
            "RandGuid": uuid::Uuid::new_v4().to_string(),
        }),
    );
    json!({ "Data": { t.binding.clone(): data }, "Metadata": md })
}

/// Delivers `m` to the handler at `base` (e.g. `http://127.0.0.1:4321`).
/// Success is a 2xx reply with a JSON content type and a JSON body; its
/// `Logs` lines are logged at info.
pub(crate) async fn invoke(client: &reqwest::Client, base: &str, spec: &QueueSpec, m: &Message) -> Result<(), InvokeError> {
    let body = payload(spec, m, Utc::now());
    let invocation_id = uuid::Uuid::new_v4().to_string();
    let resp = client
        .post(format!("{base}/{}", spec.function))
        .header(reqwest::header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header(reqwest::header::USER_AGENT, format!("Azure-Functions-Host/{HOST_VERSION}"))
        .header("X-Azure-Functions-HostVersion", HOST_VERSION)
        .header("X-Azure-Functions-InvocationId", &invocation_id)
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| {
            if e.is_connect() {
                InvokeError::NotDelivered(format!("{e}"))
            } else {
                InvokeError::Failed(format!("request to the handler failed: {e}"))
            }
        })?;
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let text = resp.text().await.map_err(|e| InvokeError::Failed(format!("reading the handler's reply failed: {e}")))?;
    let parsed: Option<Value> = serde_json::from_str(&text).ok();
    if let Some(Value::Array(logs)) = parsed.as_ref().and_then(|v| v.get("Logs")) {
        for line in logs {
            match line {
                Value::String(s) => tracing::info!(function = %spec.function, invocation_id = %invocation_id, "{s}"),
                other => tracing::info!(function = %spec.function, invocation_id = %invocation_id, "{other}"),
            }
        }
    }
    if !status.is_success() {
        let mut snippet: String = text.chars().take(300).collect();
        if snippet.is_empty() {
            snippet = "(empty body)".into();
        }
        return Err(InvokeError::Failed(format!("handler answered {status}: {snippet}")));
    }
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if mime != "application/json" && mime != "text/json" {
        return Err(InvokeError::Failed(format!("handler answered {status} with content type {content_type:?}, not JSON")));
    }
    if parsed.is_none() {
        return Err(InvokeError::Failed(format!("handler answered {status} with a body that is not JSON")));
    }
    Ok(())
}
