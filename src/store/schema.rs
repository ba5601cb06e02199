//! The shapes stored tickets and audit entries are written in, and reading the
//! shapes before them.
//!
//! Every ticket document and audit entry carries `schema`, the version of its
//! shape, beside its fields. A store reads its own version and every earlier
//! one (a document without `schema` is in the first shape, as written before
//! versions) and refuses a later one: a document written by a newer release is
//! never guessed at. The next change of shape bumps [`TICKET_SCHEMA`] or
//! [`EVENT_SCHEMA`] and upgrades the older shapes here, as they are read.

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Result, StoreError};
use crate::domain::event::name_currency;
use crate::domain::{Currency, Event, Ticket};

/// The shape of a ticket this release writes. 1: as written before versions;
/// 2: the same fields, with `schema`; 3: the same fields, and a Cosmos ticket
/// document may hold the events of its latest writes beside the ticket, which
/// a release before it would drop when it wrote the ticket (so it refuses it).
pub const TICKET_SCHEMA: u32 = 3;

/// The shape of an audit entry this release writes. 1: amounts as bare
/// decimal text (`"12.50"`); 2: amounts naming their currency (`"12.50 EUR"`).
pub const EVENT_SCHEMA: u32 = 2;

/// The shape of a document that does not say.
const FIRST: u32 = 1;

fn newer(schema: u32) -> String {
    format!("a ticket in shape {schema}, written by a newer release (this one reads up to {TICKET_SCHEMA})")
}

fn newer_event(schema: u32) -> String {
    format!("an audit entry in shape {schema}, written by a newer release (this one reads up to {EVENT_SCHEMA})")
}

/// An audit entry as JSON, its shape first.
pub fn encode_event(event: &Event) -> Result<String> {
    let json = serde_json::to_string(event).map_err(|e| StoreError::Invalid(e.to_string()))?;
    Ok(format!("{{\"schema\":{EVENT_SCHEMA},{}", &json[1..]))
}

/// An audit entry (or an array of them) from its JSON in shape `schema` or an
/// earlier one; `currency` gives the batch's currency, which amounts recorded
/// in the first shape are in (asked only for those).
pub fn decode_events<T: DeserializeOwned>(json: &[u8], schema: u32, currency: impl FnOnce() -> Result<Currency>) -> Result<T> {
    let invalid = |e: serde_json::Error| StoreError::Invalid(e.to_string());
    match schema {
        FIRST => {
            let mut recorded: serde_json::Value = serde_json::from_slice(json).map_err(invalid)?;
            name_currency(&mut recorded, currency()?);
            serde_json::from_value(recorded).map_err(invalid)
        }
        s => {
            readable_event_shape(s)?;
            serde_json::from_slice(json).map_err(invalid)
        }
    }
}

/// Whether this release reads audit entries in shape `schema`.
pub fn readable_event_shape(schema: u32) -> Result<()> {
    match schema {
        s if s <= EVENT_SCHEMA => Ok(()),
        s => Err(StoreError::Invalid(newer_event(s))),
    }
}

/// The shape an audit entry's JSON says it has.
pub fn event_shape(json: &str) -> Result<u32> {
    match json.strip_prefix("{\"schema\":") {
        Some(rest) => rest.split(',').next().and_then(|n| n.trim().parse().ok()).ok_or_else(|| StoreError::Invalid("an audit entry whose shape cannot be read".into())),
        None => shape_of(json),
    }
}

/// A ticket as JSON, its shape first.
pub fn encode_ticket(ticket: &Ticket) -> Result<String> {
    let json = serde_json::to_string(ticket).map_err(|e| StoreError::Invalid(e.to_string()))?;
    Ok(format!("{{\"schema\":{TICKET_SCHEMA},{}", &json[1..]))
}

/// A ticket from its JSON, in this shape or an earlier one.
pub fn decode_ticket(json: &str) -> Result<Ticket> {
    let schema = match json.strip_prefix("{\"schema\":") {
        Some(rest) => rest.split(',').next().and_then(|n| n.trim().parse().ok()),
        None => Some(shape_of(json)?),
    };
    match schema {
        Some(s) if s <= TICKET_SCHEMA => serde_json::from_str(json).map_err(|e| StoreError::Invalid(e.to_string())),
        Some(s) => Err(StoreError::Invalid(newer(s))),
        None => Err(StoreError::Invalid(format!("a ticket whose shape cannot be read: {}", &json[..json.len().min(40)]))),
    }
}

/// The shape a document says it has, wherever `schema` is in it.
fn shape_of(json: &str) -> Result<u32> {
    #[derive(Deserialize)]
    struct Shape {
        #[serde(default = "first")]
        schema: u32,
    }
    serde_json::from_str::<Shape>(json).map(|s| s.schema).map_err(|e| StoreError::Invalid(e.to_string()))
}

fn first() -> u32 {
    FIRST
}

/// For a ticket nested in a document: `#[serde(with = "schema::nested")]`.
pub mod nested {
    use super::*;

    #[derive(Serialize)]
    struct Shaped<'a, T> {
        schema: u32,
        #[serde(flatten)]
        value: &'a T,
    }

    #[derive(Deserialize)]
    struct Read<T> {
        #[serde(default = "first")]
        schema: u32,
        #[serde(flatten)]
        value: T,
    }

    pub fn serialize<S: Serializer>(ticket: &Ticket, s: S) -> std::result::Result<S::Ok, S::Error> {
        Shaped { schema: TICKET_SCHEMA, value: ticket }.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Ticket, D::Error> {
        read(d)
    }

    fn read<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> std::result::Result<T, D::Error> {
        let stored = Read::<T>::deserialize(d)?;
        if stored.schema > TICKET_SCHEMA {
            return Err(D::Error::custom(newer(stored.schema)));
        }
        Ok(stored.value)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ticket as this store wrote it before documents had a version: the
    /// shape every store must go on reading.
    pub(crate) const FIRST_SHAPE: &str = r#"{"batch_id":"b-0000000000000000000000000000000a","ticket_id":"T000001","client_id":"acme","authority":"CITY-PARKING","reference":"REF-1","currency":"EUR","status":"pay","amount_due":12500,"reserved":12500,"paid":0,"attempt":1,"retry_at":"2026-12-01T10:00:05Z","last_error":"outcome unknown at settlement (settle): timed out after 3000 ms","pay":{"done":1,"in_flight":"settle","undone":0},"notified":false,"redrives":0,"created_at":"2026-12-01T09:59:00Z","updated_at":"2026-12-01T10:00:01Z"}"#;

    pub(crate) fn first_shape_ticket() -> Ticket {
        let ticket: Ticket = serde_json::from_str(FIRST_SHAPE).expect("the first shape reads");
        assert_eq!(ticket.pay.slot.in_flight.map(|o| o.name()), Some("settle"));
        assert!(ticket.pay.slot.is_unknown(), "its settle's answer was lost");
        ticket
    }

    #[test]
    fn a_ticket_is_written_in_this_shape_and_read_in_any_earlier_one() {
        let ticket = first_shape_ticket();
        assert_eq!(decode_ticket(FIRST_SHAPE).unwrap(), ticket);
        let written = encode_ticket(&ticket).unwrap();
        assert!(written.starts_with(&format!("{{\"schema\":{TICKET_SCHEMA},")), "{written}");
        assert_eq!(decode_ticket(&written).unwrap(), ticket);
        let nested: serde_json::Value = serde_json::from_str(&written).unwrap();
        assert_eq!(nested["schema"], TICKET_SCHEMA);
    }

    #[test]
    fn a_ticket_in_a_newer_shape_is_refused() {
        let later = FIRST_SHAPE.replacen('{', &format!("{{\"schema\":{},", TICKET_SCHEMA + 1), 1);
        let err = decode_ticket(&later).unwrap_err();
        assert!(matches!(&err, StoreError::Invalid(m) if m.contains("newer release")), "{err}");
        let elsewhere = FIRST_SHAPE.replacen("\"currency\"", &format!("\"schema\":{},\"currency\"", TICKET_SCHEMA + 1), 1);
        assert!(decode_ticket(&elsewhere).is_err(), "wherever it says so");
    }
}
