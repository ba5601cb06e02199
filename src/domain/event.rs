//! The audit trail: an append-only log of what happened to each ticket,
//! including every exchange with a provider, as it was sent and answered.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ids::{BatchId, TicketId};
use super::ticket::{Stage, Status};
use crate::providers::ProviderName;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub batch_id: BatchId,
    pub ticket_id: TicketId,
    pub at: DateTime<Utc>,
    pub stage: Stage,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    Accepted,
    StatusChanged {
        from: Status,
        to: Status,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    RetryScheduled {
        attempt: u32,
        at: DateTime<Utc>,
        error: String,
    },
    BudgetReserved {
        amount: String,
    },
    BudgetReleased {
        amount: String,
    },
    Paid {
        amount: String,
    },
    Notified {
        outcome: String,
    },
    Exchange(Box<Exchange>),
}

/// One request to a provider and what came back (or did not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    pub provider: ProviderName,
    pub operation: String,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub request: HttpRequestRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HttpResponseRecord>,
    /// What the call came to: `ok`, `declined`, `transient`, `throttled`, `timeout`, ...
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub latency_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpRequestRecord {
    pub method: String,
    pub url: String,
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub body: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpResponseRecord {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub body: serde_json::Value,
}

impl Event {
    pub fn new(batch_id: &BatchId, ticket_id: &TicketId, stage: Stage, kind: EventKind, at: DateTime<Utc>) -> Event {
        Event { batch_id: batch_id.clone(), ticket_id: ticket_id.clone(), at, stage, kind }
    }
}
