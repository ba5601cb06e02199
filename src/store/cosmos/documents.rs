//! The Cosmos store's documents and the logical partitions they live in.
//!
//! Container `records`, partition key `/pk`:
//! - `{batch_id}`, the batch's home: the batch document (`batch`), a commitment
//!   per ticket holding budget (`commitment:{ticket_id}`) and the recorded
//!   reconciliation runs (`reconciliation:{run_id}`);
//! - `{batch_id}:{nn}`, one of [`TICKET_PARTITIONS`] per batch picked by a hash
//!   of the ticket id: the tickets (`ticket:{ticket_id}`, each holding its
//!   latest writes' events while it fits a kilobyte) and their audit entries,
//!   each of the writes a document could not hold (`events:{ticket_id}:…`),
//!   and one entry with what the upload recorded for all of them (`events:upload`);
//! - `claim:{authority}:{ticket_id}`: the payment claim on a ticket, whichever
//!   batch holds it.
//!
//! Identifiers hold no `:` (see `domain::ids`) and batch ids never start with
//! `claim`, so the three kinds of partition never meet. Top-level properties
//! are what queries filter and sort on, derived from the nested value on every
//! write; the rest is nested, and the container's indexing policy indexes only
//! the top level (`infra/modules/cosmos.bicep`, [`INDEXED_PATHS`]).

use chrono::{DateTime, Utc};
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::domain::reconciliation::ReconciliationRun;
use crate::domain::{AuthorityCode, Batch, BatchId, Currency, Event, EventKind, Stage, Status, Ticket, TicketId};
use crate::store::schema::{decode_events, readable_event_shape, EVENT_SCHEMA};
use crate::store::{PaymentClaim, StoreError};

/// The ticket partitions of one batch: its tickets spread over this many logical
/// partitions, so no batch is held to what one logical partition can serve.
pub const TICKET_PARTITIONS: u32 = 64;

/// The paths the container's indexing policy indexes: every property a query filters or sorts on.
pub const INDEXED_PATHS: [&str; 10] = [
    "/id/?", "/type/?", "/client_id/?", "/created_us/?", "/open/?", "/status/?", "/notified/?", "/due_us/?", "/reference/?", "/at_us/?",
];

pub(super) const BATCH_DOC_ID: &str = "batch";
pub(super) const CLAIM_DOC_ID: &str = "claim";
pub(super) const UPLOAD_EVENTS_DOC_ID: &str = "events:upload";

/// The logical partition of a ticket and its audit entries.
pub(super) fn ticket_partition(batch_id: &str, ticket_id: &str) -> String {
    format!("{batch_id}:{:02}", bucket(ticket_id))
}

/// Every ticket partition of a batch.
pub(super) fn ticket_partitions(batch_id: &str) -> Vec<String> {
    (0..TICKET_PARTITIONS).map(|n| format!("{batch_id}:{n:02}")).collect()
}

/// FNV-1a of the ticket id: the same partition in every process and every version.
fn bucket(ticket_id: &str) -> u32 {
    let hash = ticket_id.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    hash % TICKET_PARTITIONS
}

pub(super) fn claim_partition(authority: &AuthorityCode, ticket_id: &TicketId) -> String {
    format!("claim:{authority}:{ticket_id}")
}

/// What every ticket document's id begins with: the kind is told apart by its id
/// (no billed property of its own), and the ids sort as the ticket ids do.
pub(super) const TICKET_DOC_PREFIX: &str = "ticket:";
/// A query's filter for ticket documents.
pub(super) const IS_TICKET: &str = "STARTSWITH(c.id, 'ticket:')";
/// A query's filter for ticket documents of tickets not told yet: with `due_us`,
/// and, in a document written before told tickets left it out, not `notified`.
pub(super) const NOT_TOLD: &str = "IS_DEFINED(c.due_us) AND (NOT IS_DEFINED(c.notified) OR c.notified = false)";

pub(super) fn ticket_doc_id(ticket_id: &TicketId) -> String {
    format!("{TICKET_DOC_PREFIX}{ticket_id}")
}

/// What the ids of a ticket's audit entries begin with (its upload's entry aside).
pub(super) fn events_doc_prefix(ticket_id: &TicketId) -> String {
    format!("events:{ticket_id}:")
}

/// The ticket of an audit entry, from its id.
fn ticket_of_entry(id: &str) -> Option<&str> {
    id.strip_prefix("events:")?.split_once(':').map(|(ticket, _)| ticket)
}

pub(super) fn commitment_doc_id(ticket_id: &TicketId) -> String {
    format!("commitment:{ticket_id}")
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct BatchDoc {
    pub id: String,
    pub pk: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub client_id: String,
    /// `created_at` in microseconds: sortable (RFC 3339 text with a variable
    /// number of fractional digits does not sort as text).
    pub created_us: i64,
    /// No completion is recorded.
    pub open: bool,
    pub batch: Batch,
    #[serde(rename = "_etag", default, skip_serializing)]
    pub etag: Option<String>,
}

impl BatchDoc {
    pub fn new(batch: &Batch) -> BatchDoc {
        BatchDoc {
            id: BATCH_DOC_ID.into(),
            pk: batch.batch_id.to_string(),
            kind: "batch".into(),
            client_id: batch.client_id.to_string(),
            created_us: batch.created_at.timestamp_micros(),
            open: batch.completed_at.is_none(),
            batch: batch.clone(),
            etag: None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct TicketDoc {
    pub id: String,
    pub pk: String,
    pub status: Status,
    /// Whether the ticket is told, in documents written before `due_us` was left
    /// out of told tickets; read by [`NOT_TOLD`], never written now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notified: Option<bool>,
    /// [`Ticket::due_at`] in microseconds, while the ticket is not told: for the
    /// sweep's query, and whether its batch is done ([`NOT_TOLD`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_us: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(rename = "ticket")]
    pub nested: Nested,
    #[serde(rename = "_etag", default, skip_serializing)]
    pub etag: Option<String>,
}

/// What a ticket document holds that no query asks about, nested: the ticket,
/// with the version of its shape, and the events the document holds beside it.
/// Only what queries filter on is a (billed) property of the document's own.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Nested {
    #[serde(flatten, with = "crate::store::schema::nested")]
    pub ticket: Ticket,
    /// The events of the ticket's latest writes that are in no entry of their
    /// own: `[schema, [[seq, nonce, [events…]]…]]`, deflated as an entry's. See [`Written`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recent: Option<String>,
}

impl TicketDoc {
    pub fn new(t: &Ticket) -> TicketDoc {
        TicketDoc {
            id: ticket_doc_id(&t.ticket_id),
            pk: ticket_partition(t.batch_id.as_str(), t.ticket_id.as_str()),
            status: t.status(),
            notified: None,
            due_us: (!t.notified).then(|| t.due_at().timestamp_micros()),
            reference: t.reference.as_ref().map(|r| r.as_str().to_owned()),
            nested: Nested { ticket: t.clone(), recent: None },
            etag: None,
        }
    }

    /// The writes whose events the document holds, oldest first.
    pub fn recent_writes(&self) -> Result<Vec<Written>, String> {
        match &self.nested.recent {
            Some(text) => recent_writes(text, &self.nested.ticket.batch_id, &self.nested.ticket.ticket_id),
            None => Ok(Vec::new()),
        }
    }

    /// Holds `writes` beside the ticket (none: it holds no events).
    pub fn holding(mut self, writes: &[Written]) -> Result<TicketDoc, String> {
        self.nested.recent = if writes.is_empty() { None } else { Some(deflate_writes(writes)?) };
        Ok(self)
    }

    /// Whether the document is written in the first kilobyte a write is billed by.
    pub fn fits_a_kilobyte(&self) -> bool {
        serde_json::to_vec(self).is_ok_and(|b| b.len() <= BILLED_BYTES)
    }
}

/// The writes a ticket document holds (its `recent`), oldest first.
pub(super) fn recent_writes(text: &str, batch_id: &BatchId, ticket_id: &TicketId) -> Result<Vec<Written>, String> {
    let what = |e: &dyn std::fmt::Display| format!("recent events of ticket {batch_id}/{ticket_id}: {e}");
    let json = inflate(text).map_err(|e| what(&e))?;
    let no_currency = || Err(StoreError::Invalid("in the first shape, which only entries were written in".into()));
    match read_entry(&json, no_currency).map_err(|e| what(&e))? {
        Entry::Writes(writes) => Ok(writes.into_iter().map(|w| placed(w, batch_id, ticket_id)).collect()),
        Entry::Events(_) => Err(what(&"not a list of writes")),
    }
}

/// What a write is billed by: its document's size in kilobytes (rounded up, doubling).
const BILLED_BYTES: usize = 1024;

/// The events of one write of one ticket: appended together, never changed.
///
/// They stay in the ticket's document while it is written in its first
/// kilobyte (a write is billed by the kilobyte, and another document is
/// another write); the write that would take it past one moves them, with its
/// own, into an entry. Either way the write's events are found by its `seq`
/// and `nonce`: an entry holding them alone has the id [`Written::entry_id`],
/// one holding several writes' events the id of the last.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Written {
    /// Append order: microseconds since the epoch, strictly increasing within a process.
    pub seq: i64,
    /// Tells writes of one microsecond in different processes apart.
    pub nonce: String,
    pub events: Vec<Event>,
}

impl Written {
    /// The id of the entry that holds this write's events (and those of the writes before it it carries).
    pub fn entry_id(&self) -> String {
        format!("{}{:016}-{}", events_doc_prefix(&self.events[0].ticket_id), self.seq, self.nonce)
    }

    fn stored(&self) -> StoredWrite {
        (self.seq, self.nonce.clone(), self.events.iter().map(StoredEvent::of).collect())
    }
}

/// A write as an entry or a ticket document holds it: its batch and ticket are the document's.
type StoredWrite = (i64, String, Vec<StoredEvent>);

fn placed((seq, nonce, events): StoredWrite, batch_id: &BatchId, ticket_id: &TicketId) -> Written {
    Written { seq, nonce, events: events.into_iter().map(|e| e.into_event(batch_id, ticket_id)).collect() }
}

/// What an entry's JSON holds after its shape: one write's events, or several writes.
#[derive(Deserialize)]
#[serde(untagged)]
enum Entry {
    Writes(Vec<StoredWrite>),
    Events(Vec<StoredEvent>),
}

/// An entry's JSON, in any shape this release reads; `currency` is asked for only by the first.
fn read_entry(json: &[u8], currency: impl FnOnce() -> crate::store::Result<Currency>) -> Result<Entry, String> {
    if first_shape(json) {
        return decode_events(json, 1, currency).map(Entry::Events).map_err(|e| e.to_string());
    }
    let (schema, _): (u32, serde::de::IgnoredAny) = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    readable_event_shape(schema).map_err(|e| e.to_string())?;
    serde_json::from_slice::<(u32, Entry)>(json).map(|(_, entry)| entry).map_err(|e| e.to_string())
}

fn deflate_writes(writes: &[Written]) -> Result<String, String> {
    let stored: Vec<StoredWrite> = writes.iter().map(Written::stored).collect();
    deflate(&serde_json::to_vec(&(EVENT_SCHEMA, stored)).map_err(|e| e.to_string())?).map_err(|e| e.to_string())
}

/// An event as an audit entry holds it: its batch and ticket are the entry's.
#[derive(Debug, Serialize, Deserialize)]
struct StoredEvent {
    at: DateTime<Utc>,
    stage: Stage,
    #[serde(flatten)]
    kind: EventKind,
}

impl StoredEvent {
    fn of(e: &Event) -> StoredEvent {
        StoredEvent { at: e.at, stage: e.stage, kind: e.kind.clone() }
    }

    fn into_event(self, batch_id: &BatchId, ticket_id: &TicketId) -> Event {
        Event { batch_id: batch_id.clone(), ticket_id: ticket_id.clone(), at: self.at, stage: self.stage, kind: self.kind }
    }
}

/// The events of one write of one ticket, appended together and never changed.
/// They are kept deflated: an audit entry is read whole or not at all (never
/// queried inside), and what a provider was sent and answered repeats itself
/// (ids, keys, header names) and says what every entry says, which
/// [`ENTRY_DICTIONARY`] holds: an entry is a seventh to a quarter of its JSON.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct EventsDoc {
    /// `events:{ticket_id}:{seq}-{nonce}`: the ticket and the place of its (last)
    /// write are read from it. Entries written before said `seq` again, in a
    /// property of its own, billed on every entry and read no more.
    pub id: String,
    pub pk: String,
    /// `[schema, [events…]]`, raw-deflated with [`ENTRY_DICTIONARY`], in standard
    /// base64 after [`WITH_DICTIONARY`] (without it: deflated before the
    /// dictionary); in the first shape, the events array alone. The shape travels inside, and the batch is
    /// read from the partition key: a property of their own would be billed on
    /// every entry.
    pub deflated: String,
}

impl EventsDoc {
    /// `events`, all of one ticket, under document id `id`.
    pub fn new(events: &[Event], id: String) -> Result<EventsDoc, String> {
        let first = &events[0];
        let stored: Vec<StoredEvent> = events.iter().map(StoredEvent::of).collect();
        Ok(EventsDoc {
            id,
            pk: ticket_partition(first.batch_id.as_str(), first.ticket_id.as_str()),
            deflated: deflate(&serde_json::to_vec(&(EVENT_SCHEMA, stored)).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?,
        })
    }

    /// The entry of `writes` (oldest first, at least one): under the last one's id.
    pub fn of_writes(writes: &[Written]) -> Result<EventsDoc, String> {
        let last = writes.last().ok_or("an entry of no write")?;
        if let [only] = writes {
            return EventsDoc::new(&only.events, only.entry_id());
        }
        let first = &writes[0].events[0];
        Ok(EventsDoc {
            id: last.entry_id(),
            pk: ticket_partition(first.batch_id.as_str(), first.ticket_id.as_str()),
            deflated: deflate_writes(writes)?,
        })
    }

    /// The sequence and nonce of the write the entry is named after.
    fn place(&self) -> Result<(i64, String), String> {
        let place = self.id.rsplit_once(':').map_or("", |(_, place)| place);
        let (seq, nonce) = place.split_once('-').unwrap_or((place, ""));
        Ok((seq.parse().map_err(|_| format!("no sequence in its id ({place})"))?, nonce.to_owned()))
    }

    /// Whether the entry is in the first shape, whose amounts name no currency.
    pub fn is_first_shape(&self) -> bool {
        inflate(&self.deflated).is_ok_and(|json| first_shape(&json))
    }

    /// The writes the entry holds, oldest first; `currency`, the batch's, is asked for only by the first shape.
    pub fn into_writes(self, currency: impl FnOnce() -> crate::store::Result<Currency>) -> Result<Vec<Written>, String> {
        let what = |e: &dyn std::fmt::Display| format!("audit entry {}: {e}", self.id);
        let ticket_id = TicketId::parse(ticket_of_entry(&self.id).unwrap_or_default()).map_err(|e| what(&e))?;
        let batch_id = BatchId::parse(self.pk.rsplit_once(':').map_or("", |(batch, _)| batch)).map_err(|e| what(&e))?;
        let json = inflate(&self.deflated).map_err(|e| what(&e))?;
        Ok(match read_entry(&json, currency).map_err(|e| what(&e))? {
            Entry::Writes(writes) => writes.into_iter().map(|w| placed(w, &batch_id, &ticket_id)).collect(),
            Entry::Events(events) => {
                let events = events.into_iter().map(|e| e.into_event(&batch_id, &ticket_id)).collect();
                let (seq, nonce) = self.place().map_err(|e| what(&e))?;
                vec![Written { seq, nonce, events }]
            }
        })
    }

    /// The events, in the order written.
    #[cfg(test)]
    pub fn into_events(self, currency: impl FnOnce() -> crate::store::Result<Currency>) -> Result<Vec<Event>, String> {
        Ok(self.into_writes(currency)?.into_iter().flat_map(|w| w.events).collect())
    }
}

/// The events an upload recorded for the tickets of one ticket partition (their
/// `accepted`), all in one entry written with the tickets: one write per
/// partition instead of one per ticket. Read with a ticket's own entries, first.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct UploadEventsDoc {
    pub id: String,
    pub pk: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// `[schema, [[ticket_id, [events…]]…]]`, deflated as an [`EventsDoc`]'s.
    pub deflated: String,
}

impl UploadEventsDoc {
    /// The upload's events of partition `pk`, each ticket's in their order.
    pub fn new(pk: String, by_ticket: &[(&TicketId, Vec<&Event>)]) -> Result<UploadEventsDoc, String> {
        let stored: Vec<(&str, Vec<StoredEvent>)> = by_ticket
            .iter()
            .map(|(t, events)| (t.as_str(), events.iter().map(|e| StoredEvent::of(e)).collect()))
            .collect();
        let json = serde_json::to_vec(&(EVENT_SCHEMA, stored)).map_err(|e| e.to_string())?;
        Ok(UploadEventsDoc { id: UPLOAD_EVENTS_DOC_ID.into(), pk, kind: "upload".into(), deflated: deflate(&json).map_err(|e| e.to_string())? })
    }

    /// What the upload recorded for `ticket_id`.
    pub fn events_of(self, ticket_id: &TicketId) -> Result<Vec<Event>, String> {
        let what = |e: &dyn std::fmt::Display| format!("upload entry of {}: {e}", self.pk);
        let batch_id = BatchId::parse(self.pk.rsplit_once(':').map_or("", |(batch, _)| batch)).map_err(|e| what(&e))?;
        let json = inflate(&self.deflated).map_err(|e| what(&e))?;
        let (schema, _): (u32, serde::de::IgnoredAny) = serde_json::from_slice(&json).map_err(|e| what(&e))?;
        readable_event_shape(schema).map_err(|e| what(&e))?;
        let (_, tickets): (u32, Vec<(String, Vec<StoredEvent>)>) = serde_json::from_slice(&json).map_err(|e| what(&e))?;
        let events = tickets.into_iter().find(|(t, _)| t == ticket_id.as_str()).map(|(_, events)| events).unwrap_or_default();
        Ok(events.into_iter().map(|e| e.into_event(&batch_id, ticket_id)).collect())
    }
}

/// The first shape is an array of events; later ones open with their number.
fn first_shape(json: &[u8]) -> bool {
    !json.get(1).is_some_and(u8::is_ascii_digit)
}

/// What an entry deflated with [`ENTRY_DICTIONARY`] begins with (never in base64's alphabet).
const WITH_DICTIONARY: &str = "d1:";

/// A preset dictionary for deflating audit entries: the entries of a rejected, a
/// failed and a paid ticket as the simulator answers, their ids, times and
/// amounts blanked. An entry is small, so most of what it says (keys, header
/// names, operations, providers) is found in here rather than earlier in itself:
/// a payment's entry shrinks from about 1.2 KB to about 0.55 KB, under the 1 KB
/// a write is billed by. Entries name it ([`WITH_DICTIONARY`]) and it never
/// changes: another dictionary would be another name.
const ENTRY_DICTIONARY: &[u8] = include_bytes!("entry-dictionary.json");

fn deflate(bytes: &[u8]) -> std::io::Result<String> {
    use std::io::Write;
    let mut compress = flate2::Compress::new(flate2::Compression::best(), false);
    compress.set_dictionary(ENTRY_DICTIONARY).map_err(std::io::Error::other)?;
    let mut encoder = flate2::write::ZlibEncoder::new_with_compress(Vec::with_capacity(bytes.len() / 4), compress);
    encoder.write_all(bytes)?;
    let deflated = encoder.finish()?;
    let mut text = String::with_capacity(WITH_DICTIONARY.len() + deflated.len() * 4 / 3 + 4);
    text.push_str(WITH_DICTIONARY);
    base64::engine::general_purpose::STANDARD.encode_string(deflated, &mut text);
    Ok(text)
}

/// An entry's JSON, deflated with the dictionary it names, or with none.
fn inflate(text: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let (encoded, dictionary) = match text.strip_prefix(WITH_DICTIONARY) {
        Some(encoded) => (encoded, Some(ENTRY_DICTIONARY)),
        None => (text, None),
    };
    let deflated = base64::engine::general_purpose::STANDARD.decode(encoded).map_err(std::io::Error::other)?;
    let mut decompress = flate2::Decompress::new(false);
    if let Some(dictionary) = dictionary {
        decompress.set_dictionary(dictionary).map_err(std::io::Error::other)?;
    }
    let mut json = Vec::new();
    flate2::read::ZlibDecoder::new_with_decompress(deflated.as_slice(), decompress).read_to_end(&mut json)?;
    Ok(json)
}

/// Budget a ticket holds: reserved, or paid. The batch's `committed` is the sum of its commitments.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CommitmentDoc {
    /// `commitment:{ticket_id}`; read by id, never queried. When it was made is
    /// its `_ts` (documents written before also said so in `at`).
    pub id: String,
    pub pk: String,
    pub amount: i64,
    #[serde(rename = "_etag", default, skip_serializing)]
    pub etag: Option<String>,
}

impl CommitmentDoc {
    pub fn new(batch_id: &BatchId, ticket_id: &TicketId, amount: i64) -> CommitmentDoc {
        CommitmentDoc { id: commitment_doc_id(ticket_id), pk: batch_id.to_string(), amount, etag: None }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ReconciliationDoc {
    pub id: String,
    pub pk: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// `at` in microseconds, for ordering.
    pub at_us: i64,
    pub run: ReconciliationRun,
}

impl ReconciliationDoc {
    pub fn new(run: &ReconciliationRun) -> ReconciliationDoc {
        ReconciliationDoc {
            id: format!("reconciliation:{}", run.run_id),
            pk: run.batch_id.to_string(),
            kind: "reconciliation".into(),
            at_us: run.at.timestamp_micros(),
            run: run.clone(),
        }
    }
}

/// A payment claim. Its partition names the ticket, so every batch taking that
/// ticket meets on this one document; `owner` is the batch holding it.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ClaimDoc {
    pub id: String,
    /// `claim:{authority}:{ticket_id}`: the claim's ticket is its partition's.
    pub pk: String,
    pub owner: BatchId,
    pub claimed_at: DateTime<Utc>,
    #[serde(rename = "_etag", default, skip_serializing)]
    pub etag: Option<String>,
}

impl ClaimDoc {
    pub fn new(c: &PaymentClaim) -> ClaimDoc {
        ClaimDoc { id: CLAIM_DOC_ID.into(), pk: claim_partition(&c.authority, &c.ticket_id), owner: c.batch_id.clone(), claimed_at: c.claimed_at, etag: None }
    }

    /// The claim on the ticket of `authority` and `ticket_id`, whose partition this document was read from.
    pub fn claim(&self, authority: &AuthorityCode, ticket_id: &TicketId) -> PaymentClaim {
        PaymentClaim { authority: authority.clone(), ticket_id: ticket_id.clone(), batch_id: self.owner.clone(), claimed_at: self.claimed_at }
    }
}

/// An idempotency key (container `idempotency`, partition key `/client_id`).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct KeyDoc {
    pub id: String,
    pub client_id: String,
    pub batch_id: String,
    pub claimed_at: DateTime<Utc>,
    #[serde(rename = "_etag", default, skip_serializing)]
    pub etag: Option<String>,
}

impl KeyDoc {
    pub fn new(batch: &Batch, key: &str) -> KeyDoc {
        KeyDoc { id: key.to_owned(), client_id: batch.client_id.to_string(), batch_id: batch.batch_id.to_string(), claimed_at: Utc::now(), etag: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batchs_tickets_spread_over_its_ticket_partitions_and_each_stays_in_one() {
        let partitions = ticket_partitions("b-1");
        let mut used = std::collections::HashMap::<String, u32>::new();
        for i in 0..5_000 {
            let p = ticket_partition("b-1", &format!("T{i:06}"));
            assert!(partitions.contains(&p), "{p}");
            *used.entry(p).or_default() += 1;
        }
        assert_eq!(used.len(), TICKET_PARTITIONS as usize, "every partition takes tickets");
        let most = used.values().max().copied().unwrap_or_default();
        assert!(most < 2 * 5_000 / TICKET_PARTITIONS, "no partition takes twice its share: {most}");
    }

    fn exchange(batch_id: &BatchId, ticket_id: &TicketId) -> Event {
        use crate::domain::event::{HttpRequestRecord, HttpResponseRecord};
        use crate::domain::{Exchange, ProviderName};
        let key = format!("{batch_id}:{ticket_id}:capture");
        let body = serde_json::json!({"amount": {"currency": "EUR", "minor": 10021}, "batch_id": batch_id, "ticket_id": ticket_id, "client_id": "acme"});
        let exchange = Exchange {
            provider: ProviderName::Gateway,
            operation: "capture".into(),
            attempt: 0,
            idempotency_key: Some(key.clone()),
            request: HttpRequestRecord {
                method: "POST".into(),
                url: "http://127.0.0.1:1/gateway/capture".into(),
                headers: [("idempotency-key".to_owned(), key.clone()), ("x-request-id".into(), uuid::Uuid::new_v4().to_string())].into(),
                body,
            },
            response: Some(HttpResponseRecord {
                status: 200,
                headers: [("content-type".to_owned(), "application/json".to_owned())].into(),
                body: serde_json::json!({"id": "gateway-1", "idempotency_key": key, "operation": "capture", "statement": "capture of 10021 EUR"}),
            }),
            outcome: "ok".into(),
            error: None,
            latency_ms: 3,
            trace_id: Some("7c8b34bfacea4172fe0ebee190ace6f7".into()),
        };
        Event::new(batch_id, ticket_id, Stage::Pay, EventKind::Exchange(std::sync::Arc::new(exchange)), Utc::now())
    }

    #[test]
    fn an_audit_entry_gives_back_exactly_the_events_written_in_less_room() {
        let (batch_id, ticket_id) = (BatchId::parse("b-01a2430cae1d73998923576a16b14cf2").unwrap(), TicketId::parse("T000001").unwrap());
        let changed = EventKind::StatusChanged { from: Status::Pay, to: Status::Paid, reason: None };
        let events = vec![exchange(&batch_id, &ticket_id), Event::new(&batch_id, &ticket_id, Stage::Pay, changed, Utc::now())];
        let doc = EventsDoc::new(&events, "events:T000001:1".into()).unwrap();
        let stored = serde_json::to_string(&doc).unwrap();
        let read: EventsDoc = serde_json::from_str(&stored).unwrap();
        assert_eq!(read.into_events(|| unreachable!("the current shape names its currency")).unwrap(), events);
        let plain = serde_json::to_string(&events).unwrap().len();
        assert!(stored.len() < plain * 3 / 4, "{} bytes stored for {plain} of events", stored.len());
    }

    #[test]
    fn a_payments_entry_is_written_in_under_a_kilobyte() {
        let (batch_id, ticket_id) = (BatchId::parse("b-01a2430cae1d73998923576a16b14cf2").unwrap(), TicketId::parse("T000001").unwrap());
        let mut events: Vec<Event> = ["capture", "settle", "post", "issue"]
            .into_iter()
            .map(|operation| {
                let mut e = exchange(&batch_id, &ticket_id);
                let EventKind::Exchange(x) = &mut e.kind else { unreachable!() };
                std::sync::Arc::make_mut(x).operation = operation.into();
                e
            })
            .collect();
        let paid = EventKind::Paid { amount: crate::domain::Money { minor: 10021, currency: Currency::parse("EUR").unwrap() } };
        events.push(Event::new(&batch_id, &ticket_id, Stage::Pay, paid, Utc::now()));
        events.push(Event::new(&batch_id, &ticket_id, Stage::Pay, EventKind::StatusChanged { from: Status::Pay, to: Status::Paid, reason: None }, Utc::now()));
        let doc = serde_json::to_vec(&EventsDoc::new(&events, "events:T000001:1765000000000000".into()).unwrap()).unwrap();
        // A write is billed by the kilobyte: a payment's entry costs no more than a lookup's.
        assert!(doc.len() <= 1024, "{} bytes", doc.len());
    }

    #[test]
    fn writes_kept_together_read_back_each_in_its_place() {
        let (batch_id, ticket_id) = (BatchId::parse("b-01a2430cae1d73998923576a16b14cf2").unwrap(), TicketId::parse("T000001").unwrap());
        let changed = Event::new(&batch_id, &ticket_id, Stage::Pay, EventKind::StatusChanged { from: Status::Pay, to: Status::Paid, reason: None }, Utc::now());
        let writes: Vec<Written> = (0..3)
            .map(|i| Written { seq: 1_765_000_000_000_000 + i, nonce: format!("0000000{i}"), events: vec![exchange(&batch_id, &ticket_id), changed.clone()] })
            .collect();

        let entry = EventsDoc::of_writes(&writes).unwrap();
        assert_eq!(entry.id, "events:T000001:1765000000000002-00000002", "named by the last write");
        assert_eq!(entry.into_writes(|| unreachable!()).unwrap(), writes);

        let alone = EventsDoc::of_writes(&writes[..1]).unwrap();
        assert!(!alone.is_first_shape() && inflate(&alone.deflated).unwrap().starts_with(b"[2,[{"), "one write's entry is as entries always were");
        assert_eq!(alone.into_writes(|| unreachable!()).unwrap(), writes[..1]);

        let ticket = crate::store::schema::tests::first_shape_ticket();
        let doc = TicketDoc::new(&ticket).holding(&writes[..2]).unwrap();
        let stored: TicketDoc = serde_json::from_slice(&serde_json::to_vec(&doc).unwrap()).unwrap();
        let placed: Vec<Written> = writes[..2].iter().map(|w| Written { events: w.events.iter().map(|e| Event { batch_id: ticket.batch_id.clone(), ticket_id: ticket.ticket_id.clone(), ..e.clone() }).collect(), ..w.clone() }).collect();
        assert_eq!(stored.recent_writes().unwrap(), placed, "the document's events are its ticket's");
        assert!(TicketDoc::new(&ticket).holding(&[]).unwrap().nested.recent.is_none());
    }

    #[test]
    fn an_audit_entry_deflated_without_the_dictionary_still_reads() {
        use std::io::Write;
        let (batch_id, ticket_id) = (BatchId::parse("b-1").unwrap(), TicketId::parse("t1").unwrap());
        let events = vec![exchange(&batch_id, &ticket_id)];
        let stored: Vec<StoredEvent> = events.iter().map(|e| StoredEvent { at: e.at, stage: e.stage, kind: e.kind.clone() }).collect();
        let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&serde_json::to_vec(&(EVENT_SCHEMA, stored)).unwrap()).unwrap();
        let mut doc = EventsDoc::new(&events, "events:t1:1".into()).unwrap();
        assert!(doc.deflated.starts_with(WITH_DICTIONARY));
        doc.deflated = base64::engine::general_purpose::STANDARD.encode(encoder.finish().unwrap());
        assert_eq!(doc.into_events(|| unreachable!()).unwrap(), events);
    }

    #[test]
    fn an_audit_entry_that_does_not_inflate_is_invalid_not_empty() {
        let (batch_id, ticket_id) = (BatchId::parse("b-1").unwrap(), TicketId::parse("t1").unwrap());
        let mut doc = EventsDoc::new(&[exchange(&batch_id, &ticket_id)], "events:t1:1".into()).unwrap();
        doc.deflated = "bm90IGRlZmxhdGVk".into();
        assert!(doc.into_events(|| unreachable!()).unwrap_err().contains("audit entry events:t1:1"));
    }

    #[test]
    fn a_tickets_partition_never_moves() {
        // Stored tickets are found where this function put them: it must not change.
        assert_eq!(ticket_partition("b-1", "T000042"), "b-1:21");
        assert_eq!(ticket_partition("b-1", "t0001"), "b-1:00");
        assert_eq!(ticket_partition("b-2", "abc"), "b-2:11");
    }
}
