//! What the Functions host sends a custom handler for a queue trigger, parsed.
//!
//! One message: `{"Data": {"<binding>": <body>}, "Metadata": {...}}`. With
//! `dataType: binary` the body is one base64 string. Metadata strings and
//! numbers arrive JSON-encoded a second time (`"\"abc\""`, `"1"`); objects
//! arrive as objects; unknown keys are ignored.
//!
//! A batch (`"cardinality": "many"`): `Data.<binding>` holds every body, and
//! the metadata comes as parallel arrays (`DeliveryCountArray`,
//! `MessageIdArray`, `SessionIdArray`, `ApplicationPropertiesArray`, ...), one
//! entry per message at the same index. The host serialises an array it cannot
//! turn into a JSON object as a JSON string holding the array; a real array is
//! accepted too.

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

/// What one invocation delivered: one message, or a batch of them.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivered {
    One(Invocation),
    /// In the host's order; a message whose body cannot be decoded is kept as
    /// what is known of it, so its batch-mates are still handled.
    Batch(Vec<Result<Invocation, Unreadable>>),
}

/// A batch member whose body could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    pub message_id: Option<String>,
    pub delivery_count: u32,
    pub error: String,
}

/// A message's application properties, values as plain strings.
fn properties_of(value: Option<&Value>) -> BTreeMap<String, String> {
    value
        .and_then(Value::as_object)
        .map(|props| props.iter().filter_map(|(k, v)| Some((k.clone(), unwrap_twice(v).or_else(|| v.as_str().map(str::to_owned))?))).collect())
        .unwrap_or_default()
}

/// A batch value: a JSON array, or a JSON string holding one.
fn array_of(value: &Value) -> Option<Vec<Value>> {
    match value {
        Value::Array(items) => Some(items.clone()),
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Array(items)) => Some(items),
            _ => None,
        },
        _ => None,
    }
}

/// The metadata keys whose presence marks a batch invocation.
const BATCH_MARKERS: [&str; 3] = ["MessageIdArray", "DeliveryCountArray", "LockTokenArray"];

impl Invocation {
    /// One message's invocation.
    pub fn parse(raw: &[u8], binding: &str) -> Result<Invocation, String> {
        match Delivered::parse(raw, binding)? {
            Delivered::One(one) => Ok(one),
            Delivered::Batch(_) => Err("a batch invocation where one message was expected".to_owned()),
        }
    }

    fn one(data: &Value, meta: &Map<String, Value>) -> Result<Invocation, String> {
        let body = body_of(data)?;
        let delivery_count = meta.get("DeliveryCount").and_then(unwrap_twice).and_then(|v| v.parse().ok()).unwrap_or(1);
        Ok(Invocation {
            body,
            delivery_count,
            message_id: meta.get("MessageId").and_then(unwrap_twice),
            session_id: meta.get("SessionId").and_then(unwrap_twice),
            application_properties: properties_of(meta.get("ApplicationProperties").or_else(|| meta.get("UserProperties"))),
        })
    }
}

impl Delivered {
    pub fn parse(raw: &[u8], binding: &str) -> Result<Delivered, String> {
        let payload: Payload = serde_json::from_slice(raw).map_err(|e| format!("not a host invocation: {e}"))?;
        let data = payload
            .data
            .get(binding)
            .ok_or_else(|| format!("the invocation has no `Data.{binding}`"))?;
        let meta = &payload.metadata;
        if !BATCH_MARKERS.iter().any(|k| meta.contains_key(*k)) {
            return Invocation::one(data, meta).map(Delivered::One);
        }
        let bodies = array_of(data).ok_or_else(|| format!("a batch invocation whose `Data.{binding}` is not an array"))?;
        let column = |key: &str| -> Result<Vec<Value>, String> {
            match meta.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(v) => match array_of(v) {
                    Some(items) if items.len() == bodies.len() => Ok(items),
                    Some(items) => Err(format!("`{key}` has {} entries for {} messages", items.len(), bodies.len())),
                    None => Err(format!("`{key}` is not an array")),
                },
            }
        };
        let counts = column("DeliveryCountArray")?;
        let ids = column("MessageIdArray")?;
        let sessions = column("SessionIdArray")?;
        let mut properties = column("ApplicationPropertiesArray")?;
        if properties.is_empty() {
            properties = column("UserPropertiesArray")?;
        }
        let at = |items: &[Value], i: usize| items.get(i).and_then(unwrap_twice);
        let messages = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| {
                let message_id = at(&ids, i);
                let delivery_count = at(&counts, i).and_then(|v| v.parse().ok()).unwrap_or(1);
                match body_of(body) {
                    Ok(body) => Ok(Invocation {
                        body,
                        delivery_count,
                        message_id,
                        session_id: at(&sessions, i),
                        application_properties: properties_of(properties.get(i)),
                    }),
                    Err(error) => Err(Unreadable { message_id, delivery_count, error }),
                }
            })
            .collect::<Vec<_>>();
        Ok(Delivered::Batch(messages))
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

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn batch(raw: serde_json::Value) -> Vec<Result<Invocation, Unreadable>> {
        match Delivered::parse(raw.to_string().as_bytes(), "message").unwrap() {
            Delivered::Batch(messages) => messages,
            Delivered::One(one) => panic!("read as one message: {one:?}"),
        }
    }

    #[test]
    fn a_batch_as_the_host_serialises_it_arrays_inside_json_strings() {
        let bodies = serde_json::to_string(&[b64(r#"{"a":1}"#), b64(r#"{"a":2}"#)]).unwrap();
        let messages = batch(serde_json::json!({
            "Data": {"message": bodies},
            "Metadata": {
                "DeliveryCountArray": "[1,4]",
                "MessageIdArray": "[\"m-1\",\"m-2\"]",
                "SessionIdArray": "[\"b-1\",\"b-1\"]",
                "LockTokenArray": "[\"t1\",\"t2\"]",
                "ApplicationPropertiesArray": "[{\"traceparent\":\"00-aa-01\"},{\"traceparent\":\"00-bb-01\"}]",
                "EnqueuedTimeUtcArray": "[\"2025-01-02T03:04:05\",\"2025-01-02T03:04:06\"]",
                "sys": {"MethodName": "reserve", "UtcNow": "x", "RandGuid": "y"}
            }
        }));
        let [first, second] = [&messages[0], &messages[1]].map(|m| m.as_ref().unwrap());
        assert_eq!((first.body.as_slice(), second.body.as_slice()), (&br#"{"a":1}"#[..], &br#"{"a":2}"#[..]));
        assert_eq!((first.delivery_count, second.delivery_count), (1, 4));
        assert_eq!(second.message_id.as_deref(), Some("m-2"));
        assert_eq!(second.session_id.as_deref(), Some("b-1"));
        assert_eq!(second.application_properties["traceparent"], "00-bb-01");
    }

    #[test]
    fn a_batch_with_real_arrays_and_string_bodies_is_read_too() {
        let messages = batch(serde_json::json!({
            "Data": {"message": [r#"{"a":1}"#]},
            "Metadata": {"DeliveryCountArray": [2], "MessageIdArray": ["m-1"], "UserPropertiesArray": [{"k": "v"}]}
        }));
        let one = messages[0].as_ref().unwrap();
        assert_eq!((one.body.as_slice(), one.delivery_count), (&br#"{"a":1}"#[..], 2));
        assert_eq!(one.application_properties["k"], "v");
    }

    #[test]
    fn one_undecodable_body_leaves_its_batch_mates_readable() {
        let bodies = serde_json::to_string(&["%%%".to_owned(), b64("{}")]).unwrap();
        let messages = batch(serde_json::json!({
            "Data": {"message": bodies},
            "Metadata": {"MessageIdArray": "[\"bad\",\"good\"]", "DeliveryCountArray": "[3,1]"}
        }));
        let bad = messages[0].as_ref().unwrap_err();
        assert_eq!((bad.message_id.as_deref(), bad.delivery_count), (Some("bad"), 3));
        assert!(bad.error.contains("base64"), "{}", bad.error);
        assert_eq!(messages[1].as_ref().unwrap().message_id.as_deref(), Some("good"));
    }

    #[test]
    fn a_batch_whose_arrays_disagree_is_refused_whole() {
        let bodies = serde_json::to_string(&[b64("{}"), b64("{}")]).unwrap();
        let raw = serde_json::json!({"Data": {"message": bodies}, "Metadata": {"MessageIdArray": "[\"only-one\"]"}});
        let e = Delivered::parse(raw.to_string().as_bytes(), "message").unwrap_err();
        assert!(e.contains("MessageIdArray") && e.contains("1 entries for 2"), "{e}");
        let raw = serde_json::json!({"Data": {"message": "not an array"}, "Metadata": {"MessageIdArray": "[]"}});
        assert!(Delivered::parse(raw.to_string().as_bytes(), "message").unwrap_err().contains("not an array"));
    }

    #[test]
    fn malformed_invocations_say_what_is_wrong() {
        assert!(Invocation::parse(b"[]", "message").unwrap_err().contains("not a host invocation"));
        assert!(Invocation::parse(br#"{"Data":{}}"#, "message").unwrap_err().contains("Data.message"));
        assert!(Invocation::parse(br#"{"Data":{"message":"%%%"}}"#, "message").unwrap_err().contains("base64"));
    }
}
