//! One invocation of a queue-triggered function, in the custom-handler wire
//! format of the real Functions host: `POST /{FunctionName}` with
//! `{"Data": {...}, "Metadata": {...}}`, values encoded as the host encodes them
//! (`GetHttpScriptInvocationContextValue`): a byte array as base64, a string or
//! a number JSON-encoded again, a dictionary as an object, and an array (a
//! batch's bodies, its metadata columns) as a JSON string holding the array.

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

/// What every Service Bus invocation carries besides the messages: the
/// settlement objects (empty for an HTTP worker, which cannot use them) and `sys`.
fn common_metadata(md: &mut Map<String, Value>, spec: &QueueSpec, now: DateTime<Utc>) {
    let actions = if spec.trigger.sessions {
        json!({ "SessionLockedUntil": format!("{}+00:00", date_time(now + chrono::Duration::minutes(1))) })
    } else {
        json!({})
    };
    for key in ["MessageReceiver", "MessageSession", "MessageActions", "SessionActions"] {
        md.insert(key.into(), actions.clone());
    }
    md.insert("ReceiveActions".into(), json!({}));
    md.insert(
        "sys".into(),
        json!({
            "MethodName": spec.function,
            "UtcNow": format!("{}.{:07}Z", date_time(now), now.timestamp_subsec_nanos() / 100),
            "RandGuid": uuid::Uuid::new_v4().to_string(),
        }),
    );
}

/// An array as the host hands it over: serialised into a JSON string.
fn serialised(items: Vec<Value>) -> Value {
    Value::String(Value::Array(items).to_string())
}

/// DateTime with milliseconds, as an array element (`2025-01-02T03:04:05.123`).
fn date_time_ms(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3f").to_string()
}

/// The request body for delivering the batch `ms` to `spec`'s function
/// (`"cardinality": "many"`): the bodies and each metadata column as arrays,
/// one entry per message at the same index, and no single-message keys.
pub(crate) fn batch_payload(spec: &QueueSpec, ms: &[Message], now: DateTime<Utc>) -> Value {
    let t = &spec.trigger;
    let bodies = ms
        .iter()
        .map(|m| match t.data_type {
            DataType::Binary => Value::String(base64::engine::general_purpose::STANDARD.encode(&m.body)),
            DataType::String => Value::String(String::from_utf8_lossy(&m.body).into_owned()),
        })
        .collect();
    let column = |f: &dyn Fn(&Message) -> Value| serialised(ms.iter().map(f).collect());
    let text = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
    let expiry = |m: &Message| m.expires_at.map(millis).map(date_time_ms).unwrap_or_else(|| "9999-12-31T23:59:59.999".into());
    let mut md = Map::new();
    md.insert("DeliveryCountArray".into(), column(&|m| m.delivery_count.into()));
    md.insert("SequenceNumberArray".into(), column(&|m| m.sequence_number.into()));
    md.insert("LockTokenArray".into(), column(&|m| m.lock_token.clone().into()));
    md.insert("MessageIdArray".into(), column(&|m| m.message_id.clone().into()));
    md.insert("DeadLetterSourceArray".into(), column(&|_| Value::Null));
    md.insert("ContentTypeArray".into(), column(&|m| text(&m.content_type)));
    md.insert("CorrelationIdArray".into(), column(&|m| text(&m.correlation_id)));
    md.insert("SessionIdArray".into(), column(&|m| text(&m.session_id)));
    md.insert("ReplyToArray".into(), column(&|m| text(&m.reply_to)));
    md.insert("ToArray".into(), column(&|m| text(&m.to)));
    md.insert("ReplyToSessionIdArray".into(), column(&|m| text(&m.reply_to_session_id)));
    md.insert("SubjectArray".into(), column(&|m| text(&m.label)));
    md.insert("LabelArray".into(), column(&|m| text(&m.label)));
    md.insert("PartitionKeyArray".into(), column(&|m| text(&m.partition_key)));
    // The extension fills this one with the partition keys too.
    md.insert("TransactionPartitionKeyArray".into(), column(&|m| text(&m.partition_key)));
    md.insert("EnqueuedTimeUtcArray".into(), column(&|m| date_time_ms(millis(m.enqueued_at)).into()));
    md.insert("EnqueuedTimeArray".into(), column(&|m| format!("{}+00:00", date_time_ms(millis(m.enqueued_at))).into()));
    md.insert("ExpiresAtUtcArray".into(), column(&|m| expiry(m).into()));
    md.insert("ExpiresAtArray".into(), column(&|m| format!("{}+00:00", expiry(m)).into()));
    md.insert("ApplicationPropertiesArray".into(), column(&|m| Value::Object(m.properties.clone())));
    md.insert("UserPropertiesArray".into(), column(&|m| Value::Object(m.properties.clone())));
    common_metadata(&mut md, spec, now);
    json!({ "Data": { t.binding.clone(): serialised(bodies) }, "Metadata": md })
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
    common_metadata(&mut md, spec, now);
    json!({ "Data": { t.binding.clone(): data }, "Metadata": md })
}

/// Delivers an invocation's `body` (a [`payload`] or [`batch_payload`]) to the
/// handler at `base` (e.g. `http://127.0.0.1:4321`). Success is a 2xx reply
/// with a JSON content type and a JSON body; its `Logs` lines are logged at info.
pub(crate) async fn invoke(client: &reqwest::Client, base: &str, spec: &QueueSpec, body: &Value) -> Result<(), InvokeError> {
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
