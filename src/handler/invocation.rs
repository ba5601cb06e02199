//! What the Functions host sends a custom handler for a queue trigger, parsed.
//!
//! `{"Data": {"<binding>": <body>}, "Metadata": {...}}`. With `dataType:
//! binary` the body is one base64 string. Metadata strings and numbers arrive
//! JSON-encoded a second time (`"\"abc\""`, `"1"`); objects arrive as objects;
//! unknown keys are ignored.

use std::collections::BTreeMap;

use base64::Engine;
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    pub body: Vec<u8>,
    pub delivery_count: u32,
    pub message_id: Option<String>,
    pub session_id: Option<String>,
    pub application_properties: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Payload {
    data: Map<String, Value>,
    #[serde(default)]
    metadata: Map<String, Value>,
}

/// A Metadata value with its second JSON encoding removed.
fn unwrap_twice(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::String(inner)) => Some(inner),
            Ok(Value::Number(n)) => Some(n.to_string()),
            Ok(Value::Bool(b)) => Some(b.to_string()),
            Ok(Value::Null) => None,
            _ => Some(s.clone()),
        },
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The message body from the trigger binding's value. Base64 (binary) is what
/// our function.json asks for; a JSON-encoded string (no dataType) is accepted too.
fn body_of(value: &Value) -> Result<Vec<u8>, String> {
    match value {
        Value::String(s) if s.starts_with('"') => match serde_json::from_str::<String>(s) {
            Ok(inner) => Ok(inner.into_bytes()),
            Err(e) => Err(format!("the message body is a malformed JSON string: {e}")),
        },
        Value::String(s) if s.starts_with('{') || s.starts_with('[') => Ok(s.clone().into_bytes()),
        Value::String(s) => base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| format!("the message body is not base64: {e}")),
        Value::Object(_) | Value::Array(_) => Ok(value.to_string().into_bytes()),
        other => Err(format!("the message body has an unexpected JSON type: {other}")),
    }
}

impl Invocation {
    pub fn parse(raw: &[u8], binding: &str) -> Result<Invocation, String> {
        let payload: Payload = serde_json::from_slice(raw).map_err(|e| format!("not a host invocation: {e}"))?;
        let data = payload
            .data
            .get(binding)
            .ok_or_else(|| format!("the invocation has no `Data.{binding}`"))?;
        let body = body_of(data)?;
        let meta = &payload.metadata;
        let delivery_count = meta.get("DeliveryCount").and_then(unwrap_twice).and_then(|v| v.parse().ok()).unwrap_or(1);
        let application_properties = meta
            .get("ApplicationProperties")
            .or_else(|| meta.get("UserProperties"))
            .and_then(Value::as_object)
            .map(|props| props.iter().filter_map(|(k, v)| Some((k.clone(), unwrap_twice(v).or_else(|| v.as_str().map(str::to_owned))?))).collect())
            .unwrap_or_default();
        Ok(Invocation {
            body,
            delivery_count,
            message_id: meta.get("MessageId").and_then(unwrap_twice),
            session_id: meta.get("SessionId").and_then(unwrap_twice),
            application_properties,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_data_and_twice_encoded_metadata_as_the_host_sends_them() {
        let raw = serde_json::json!({
            "Data": {"message": base64::engine::general_purpose::STANDARD.encode(br#"{"a":1}"#)},
            "Metadata": {
                "DeliveryCount": "3", "MessageId": "\"m-1\"", "SessionId": "\"b-1\"",
                "EnqueuedTimeUtc": "2025-01-02T03:04:05", "LockToken": "\"2f1c\"",
                "ApplicationProperties": {"traceparent": "00-abc-def-01"},
                "UserProperties": {"traceparent": "00-abc-def-01"},
                "MessageActions": {}, "sys": {"MethodName": "lookup", "UtcNow": "x", "RandGuid": "y"},
                "SomethingNew": "\"ignored\""
            }
        });
        let inv = Invocation::parse(raw.to_string().as_bytes(), "message").unwrap();
        assert_eq!(inv.body, br#"{"a":1}"#);
        assert_eq!(inv.delivery_count, 3);
        assert_eq!(inv.message_id.as_deref(), Some("m-1"));
        assert_eq!(inv.session_id.as_deref(), Some("b-1"));
        assert_eq!(inv.application_properties["traceparent"], "00-abc-def-01");
    }

    #[test]
    fn a_string_body_without_data_type_is_json_encoded_again() {
        let raw = r#"{"Data":{"msg":"\"{\\\"jobId\\\":\\\"j1\\\",\\\"step\\\":2}\""},"Metadata":{"DeliveryCount":"1","jobId":"\"j1\""}}"#;
        let inv = Invocation::parse(raw.as_bytes(), "msg").unwrap();
        assert_eq!(inv.body, br#"{"jobId":"j1","step":2}"#);
        assert_eq!(inv.delivery_count, 1);
    }

    #[test]
    fn malformed_invocations_say_what_is_wrong() {
        assert!(Invocation::parse(b"[]", "message").unwrap_err().contains("not a host invocation"));
        assert!(Invocation::parse(br#"{"Data":{}}"#, "message").unwrap_err().contains("Data.message"));
        assert!(Invocation::parse(br#"{"Data":{"message":"%%%"}}"#, "message").unwrap_err().contains("base64"));
    }
}
