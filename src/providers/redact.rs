//! Secrets never reach the audit trail: header values and JSON fields named as
//! secret are replaced before anything is recorded.

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;

pub const REDACTED: &str = "[REDACTED]";

const SECRET_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "x-functions-key"];
const SECRET_FIELDS: &[&str] = &["api_key", "apikey", "secret", "password", "token", "access_token", "card_number", "cvv", "pan"];

#[derive(Debug, Clone)]
pub struct Redactor {
    headers: HashSet<String>,
    fields: HashSet<String>,
}

impl Default for Redactor {
    fn default() -> Self {
        Redactor::new(&[], &[])
    }
}

impl Redactor {
    /// The built-in rules plus extra header names and JSON field names (case-insensitive).
    pub fn new(extra_headers: &[String], extra_fields: &[String]) -> Redactor {
        let lower = |s: &str| s.trim().to_ascii_lowercase();
        Redactor {
            headers: SECRET_HEADERS.iter().map(|h| lower(h)).chain(extra_headers.iter().map(|h| lower(h))).collect(),
            fields: SECRET_FIELDS.iter().map(|f| lower(f)).chain(extra_fields.iter().map(|f| lower(f))).collect(),
        }
    }

    pub fn headers<'a>(&self, headers: impl Iterator<Item = (&'a str, &'a str)>) -> BTreeMap<String, String> {
        headers
            .map(|(k, v)| {
                let k = k.to_ascii_lowercase();
                let v = if self.headers.contains(&k) { REDACTED.to_owned() } else { v.to_owned() };
                (k, v)
            })
            .collect()
    }

    pub fn body(&self, mut body: Value) -> Value {
        self.scrub(&mut body);
        body
    }

    fn scrub(&self, value: &mut Value) {
        match value {
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    if self.fields.contains(&k.to_ascii_lowercase()) {
                        *v = Value::String(REDACTED.to_owned());
                    } else {
                        self.scrub(v);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.scrub(v)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_headers_and_nested_fields_are_replaced() {
        let r = Redactor::new(&["X-Partner-Secret".into()], &["iban".into()]);
        let h = r.headers([("Authorization", "Bearer abc"), ("X-Partner-Secret", "s3"), ("Idempotency-Key", "k")].into_iter());
        assert_eq!(h["authorization"], REDACTED);
        assert_eq!(h["x-partner-secret"], REDACTED);
        assert_eq!(h["idempotency-key"], "k");
        let body = r.body(serde_json::json!({"payer": {"IBAN": "FR76", "name": "A"}, "cards": [{"card_number": "4111"}]}));
        assert_eq!(body["payer"]["IBAN"], REDACTED);
        assert_eq!(body["payer"]["name"], "A");
        assert_eq!(body["cards"][0]["card_number"], REDACTED);
    }
}
