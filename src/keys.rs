//! The API's keys: who each one stands for. Configured in `TICKETPAY_API_KEYS`,
//! a JSON array of `{"name", "role": "operator" | "client", "client_id"?,
//! "sha256"}`: only the SHA-256 of each key is configured, never the key.
//! [`crate::api::access`] checks the key each request presents.

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::domain::ClientId;

/// Who is calling, once their key is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Sees and acts on every client's batches (everyone, when the API is open).
    Operator,
    /// Sees and uploads only this client's batches.
    Client(ClientId),
}

impl Principal {
    pub fn sees(&self, client: &ClientId) -> bool {
        match self {
            Principal::Operator => true,
            Principal::Client(own) => own == client,
        }
    }

    /// The only client this caller may see, if it is limited to one.
    pub fn client(&self) -> Option<&ClientId> {
        match self {
            Principal::Operator => None,
            Principal::Client(own) => Some(own),
        }
    }
}

/// The name of the caller's key, as configured: who acted, in the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyName(pub String);

/// The name audit trails give every caller of an API that takes no keys.
pub const OPEN_KEY_NAME: &str = "anyone (the API takes no keys)";

/// How the API is guarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// No keys configured: every caller is an operator (local use only).
    Open,
    Keys(ApiKeys),
}

/// Why a presented key stands for nobody.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Missing,
    Invalid,
}

impl Access {
    /// Who a presented key stands for.
    pub fn principal(&self, presented: Option<&str>) -> Result<Principal, Refused> {
        match self {
            Access::Open => Ok(Principal::Operator),
            Access::Keys(keys) => keys.caller(presented.ok_or(Refused::Missing)?).ok_or(Refused::Invalid),
        }
    }

    /// The name of a presented key (checked by [`Access::principal`] first).
    pub fn name(&self, presented: Option<&str>) -> KeyName {
        match self {
            Access::Open => KeyName(OPEN_KEY_NAME.into()),
            Access::Keys(keys) => KeyName(presented.and_then(|k| keys.name(k)).unwrap_or_default()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Role {
    Operator,
    Client,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: String,
    role: Role,
    #[serde(default)]
    client_id: Option<String>,
    sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyEntry {
    digest: [u8; 32],
    caller: Principal,
    name: String,
}

/// The configured keys, by the SHA-256 of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeys(Vec<KeyEntry>);

impl ApiKeys {
    /// Parses the `TICKETPAY_API_KEYS` JSON.
    pub fn parse(json: &str) -> Result<ApiKeys, String> {
        let raw: Vec<RawKey> = serde_json::from_str(json).map_err(|e| format!("not a JSON array of keys: {e}"))?;
        let mut entries: Vec<KeyEntry> = Vec::with_capacity(raw.len());
        for key in raw {
            let entry = KeyEntry::parse(key)?;
            if entries.iter().any(|e| e.digest == entry.digest) {
                return Err("the same sha256 is listed twice".into());
            }
            entries.push(entry);
        }
        Ok(ApiKeys(entries))
    }

    /// The caller a presented key stands for. Every entry is compared in
    /// constant time, so the answer's timing says nothing about the keys.
    fn caller(&self, presented: &str) -> Option<Principal> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.0.iter().fold(None, |found, e| if same(&e.digest, &digest) { Some(e.caller.clone()) } else { found })
    }

    fn name(&self, presented: &str) -> Option<String> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.0.iter().fold(None, |found, e| if same(&e.digest, &digest) { Some(e.name.clone()) } else { found })
    }
}

impl KeyEntry {
    fn parse(raw: RawKey) -> Result<KeyEntry, String> {
        let name = raw.name.trim();
        if name.is_empty() {
            return Err("every key needs a non-empty name".into());
        }
        let digest = parse_digest(&raw.sha256).ok_or_else(|| format!("key `{name}`: sha256 must be 64 hexadecimal digits"))?;
        let caller = match (raw.role, raw.client_id) {
            (Role::Operator, None) => Principal::Operator,
            (Role::Operator, Some(_)) => return Err(format!("key `{name}`: an operator key has no client_id")),
            (Role::Client, Some(c)) => Principal::Client(ClientId::parse(&c).map_err(|e| format!("key `{name}`: {e}"))?),
            (Role::Client, None) => return Err(format!("key `{name}`: a client key needs its client_id")),
        };
        Ok(KeyEntry { digest, caller, name: name.to_owned() })
    }
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The SHA-256 of a key as configured in `TICKETPAY_API_KEYS` (lower-case hex).
pub fn key_digest(key: &str) -> String {
    format!("{:x}", Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ApiKeys {
        let json = serde_json::json!([
            { "name": "ops", "role": "operator", "sha256": key_digest("op-key") },
            { "name": "acme-erp", "role": "client", "client_id": "acme", "sha256": key_digest("acme-key").to_uppercase() },
        ]);
        ApiKeys::parse(&json.to_string()).unwrap()
    }

    #[test]
    fn a_key_stands_for_its_role_and_a_wrong_or_missing_key_for_nobody() {
        let access = Access::Keys(keys());
        assert_eq!(access.principal(Some("op-key")).unwrap(), Principal::Operator);
        assert_eq!(access.principal(Some("acme-key")).unwrap(), Principal::Client(ClientId::parse("acme").unwrap()));
        assert_eq!(access.principal(Some("acme-key ")), Err(Refused::Invalid));
        assert_eq!(access.principal(None), Err(Refused::Missing));
        assert_eq!(Access::Open.principal(None).unwrap(), Principal::Operator);
        assert_eq!(access.name(Some("acme-key")), KeyName("acme-erp".into()));
    }

    #[test]
    fn a_malformed_entry_is_named() {
        let cases = [
            (r#"{"name": "ops"}"#, "JSON array"),
            (r#"[{"name": "ops", "role": "operator", "key": "plain", "sha256": ""}]"#, "unknown field `key`"),
            (r#"[{"name": "ops", "role": "operator", "sha256": "abc"}]"#, "`ops`: sha256"),
            (r#"[{"name": "x", "role": "client", "sha256": "00"}]"#, "sha256"),
            (r#"[{"name": "", "role": "operator", "sha256": "00"}]"#, "non-empty name"),
            (r#"[{"name": "who", "role": "admin", "sha256": "00"}]"#, "unknown variant `admin`"),
        ];
        for (json, expected) in cases {
            let e = ApiKeys::parse(json).unwrap_err();
            assert!(e.contains(expected), "{json}: {e}");
        }
        let digest = key_digest("k");
        let client_without_id = format!(r#"[{{"name": "c", "role": "client", "sha256": "{digest}"}}]"#);
        assert!(ApiKeys::parse(&client_without_id).unwrap_err().contains("needs its client_id"));
        let twice = format!(r#"[{{"name": "a", "role": "operator", "sha256": "{digest}"}}, {{"name": "b", "role": "operator", "sha256": "{digest}"}}]"#);
        assert!(ApiKeys::parse(&twice).unwrap_err().contains("twice"));
    }
}
