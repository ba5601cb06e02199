//! Identifiers, parsed once at the edge.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn parse_token(what: &str, text: &str, max: usize) -> Result<String, String> {
    if text.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if text.len() > max {
        return Err(format!("{what} `{text}` is longer than {max} characters"));
    }
    if text.chars().all(|c| c == '.') {
        return Err(format!("{what} `{text}` is only dots, which no URL path can carry"));
    }
    if let Some(c) = text.chars().find(|&c| !is_id_char(c)) {
        return Err(format!(
            "{what} `{text}` has the character {c:?}; use letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(text.to_owned())
}

macro_rules! token_id {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn parse(text: &str) -> Result<Self, String> {
                parse_token($what, text, $max).map(Self)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                Self::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

token_id!(
    /// A batch, named by ticketpay when it is accepted.
    BatchId, "batch_id", 64
);
token_id!(
    /// A ticket within its batch, named by the client.
    TicketId, "ticket_id", 64
);
token_id!(
    /// The client a batch is paid for.
    ClientId, "client_id", 64
);
token_id!(
    /// An issuing authority, one of the configured codes.
    AuthorityCode, "authority", 32
);

impl BatchId {
    /// A new, time-ordered batch id.
    pub fn generate() -> BatchId {
        BatchId(format!("b-{}", uuid::Uuid::now_v7().simple()))
    }
}

/// The ticket's own reference as printed on it (free text, optional).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Reference(String);

impl Reference {
    pub const MAX_LEN: usize = 128;

    pub fn parse(text: &str) -> Result<Reference, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("reference is empty".into());
        }
        if text.chars().count() > Self::MAX_LEN {
            return Err(format!("reference is longer than {} characters", Self::MAX_LEN));
        }
        if text.chars().any(char::is_control) {
            return Err("reference contains control characters".into());
        }
        Ok(Reference(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An upload's idempotency key, as its client chose it. It becomes a document
/// id in Cosmos DB, which may not hold `/ \ ? #`, so the same keys are refused
/// in every store: 1 to 200 printable ASCII characters without those four,
/// spaces only inside.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 200;
    /// What a key may hold, in the words of every refusal.
    pub const RULE: &str = "1 to 200 printable ASCII characters other than / \\ ? # (spaces only inside)";

    pub fn parse(text: &str) -> Result<IdempotencyKey, String> {
        let refuse = |what: String| Err(format!("the Idempotency-Key {what}; use {}", Self::RULE));
        if text.is_empty() || text.len() > Self::MAX_LEN {
            return refuse(format!("has {} characters", text.chars().count()));
        }
        if let Some((i, c)) = text.char_indices().find(|&(_, c)| !(' '..='~').contains(&c) || matches!(c, '/' | '\\' | '?' | '#')) {
            return refuse(format!("has the character {c:?} at position {}", i + 1));
        }
        if text.starts_with(' ') || text.ends_with(' ') {
            return refuse("starts or ends with a space".into());
        }
        Ok(IdempotencyKey(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<IdempotencyKey> for String {
    fn from(key: IdempotencyKey) -> String {
        key.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_plain_tokens_and_name_what_is_wrong() {
        assert_eq!(TicketId::parse("T-0001.a_b").unwrap().as_str(), "T-0001.a_b");
        assert!(TicketId::parse("").unwrap_err().contains("ticket_id"));
        assert!(TicketId::parse("has space").unwrap_err().contains("' '"));
        assert!(ClientId::parse(&"x".repeat(65)).unwrap_err().contains("longer"));
        assert!(TicketId::parse("a/b").is_err());
    }

    #[test]
    fn generated_batch_ids_parse_and_sort_by_time() {
        let a = BatchId::generate();
        let b = BatchId::generate();
        assert_eq!(BatchId::parse(a.as_str()).unwrap(), a);
        assert!(a < b);
    }

    #[test]
    fn idempotency_keys_hold_what_a_cosmos_id_may_hold() {
        for good in ["upload-1", "acme:2026-12-01 run 2", "!\"$%&'()*+,-.:;<=>@[]^_`{|}~", &"k".repeat(200)] {
            assert_eq!(IdempotencyKey::parse(good).unwrap().as_str(), good);
        }
        for bad in ["", "a/b", "a\\b", "a?b", "a#b", "tab\there", "caf\u{e9}", " lead", "trail ", &"k".repeat(201)] {
            let e = IdempotencyKey::parse(bad).unwrap_err();
            assert!(e.contains(IdempotencyKey::RULE), "{bad:?}: {e}");
        }
        assert!(IdempotencyKey::parse("a/b").unwrap_err().contains("'/' at position 2"));
    }

    #[test]
    fn references_are_trimmed_and_bounded() {
        assert_eq!(Reference::parse("  FR 123 456 ").unwrap().as_str(), "FR 123 456");
        assert!(Reference::parse(&"r".repeat(129)).is_err());
        assert!(Reference::parse("a\u{0}b").is_err());
    }
}
