//! The audit trail: an append-only log of what happened to each ticket,
//! including every exchange with a provider, as it was sent and answered.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ids::{BatchId, TicketId};
use super::money::{self, Currency, Money};
use super::ticket::{Stage, Status};
use super::ProviderName;

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
    /// An operator sent the parked ticket back into the pipeline.
    Redriven {
        /// Where the ticket re-entered (the event's own `stage` is where it was parked).
        to_stage: Stage,
        parked_because: String,
    },
    StatusChanged {
        from: Status,
        to: Status,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    RetryScheduled {
        attempt: u32,
        retry_at: DateTime<Utc>,
        error: String,
    },
    BudgetReserved {
        #[serde(with = "money::text")]
        amount: Money,
    },
    BudgetReleased {
        #[serde(with = "money::text")]
        amount: Money,
    },
    Paid {
        #[serde(with = "money::text")]
        amount: Money,
    },
    Notified {
        outcome: String,
    },
    /// A person acted on the ticket (`domain::resolution`), with the key's name and their note.
    Resolved {
        action: super::resolution::Action,
        by: String,
        note: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        provider_reference: Option<String>,
    },
    /// Shared, not copied: the same exchange goes to the journal, the store and the spool.
    Exchange(Arc<Exchange>),
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

/// The kinds with an `amount`: recorded as bare decimal text (`"12.50"`) before
/// amounts named their currency, as `"12.50 EUR"` since.
const WITH_AMOUNT: [&str; 3] = ["budget_reserved", "budget_released", "paid"];

/// Names `currency` on the amounts of events recorded before amounts named
/// theirs (one event or an array of them, as JSON): every amount of a batch is
/// in the batch's currency.
pub fn name_currency(recorded: &mut serde_json::Value, currency: Currency) {
    match recorded {
        serde_json::Value::Array(events) => events.iter_mut().for_each(|e| name_currency(e, currency)),
        serde_json::Value::Object(fields) => {
            let kind = fields.get("type").and_then(serde_json::Value::as_str);
            if !kind.is_some_and(|k| WITH_AMOUNT.contains(&k)) {
                return;
            }
            if let Some(serde_json::Value::String(amount)) = fields.get_mut("amount")
                && !amount.contains(' ')
            {
                *amount = format!("{amount} {currency}");
            }
        }
        _ => {}
    }
}

impl Event {
    pub fn new(batch_id: &BatchId, ticket_id: &TicketId, stage: Stage, kind: EventKind, at: DateTime<Utc>) -> Event {
        Event { batch_id: batch_id.clone(), ticket_id: ticket_id.clone(), at, stage, kind }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur(minor: i64) -> Money {
        Money::new(minor, Currency::parse("EUR").unwrap())
    }

    #[test]
    fn an_amount_is_recorded_with_its_currency_and_an_earlier_bare_one_is_read_in_the_batchs() {
        let paid = Event::new(&BatchId::parse("b1").unwrap(), &TicketId::parse("t1").unwrap(), Stage::Pay, EventKind::Paid { amount: eur(1250) }, Utc::now());
        let mut recorded = serde_json::to_value(&paid).unwrap();
        assert_eq!(recorded["amount"], "12.50 EUR");
        recorded["amount"] = "12.50".into();
        assert!(serde_json::from_value::<Event>(recorded.clone()).is_err(), "a bare amount names no currency");
        let mut trail = serde_json::json!([recorded, {"type": "notified", "outcome": "12.50"}]);
        name_currency(&mut trail, Currency::parse("EUR").unwrap());
        assert_eq!(serde_json::from_value::<Event>(trail[0].clone()).unwrap(), paid);
        assert_eq!(trail[1]["outcome"], "12.50", "only amounts are touched");
        let jpy = Money::new(-1250, Currency::parse("JPY").unwrap());
        assert_eq!(jpy.to_string().parse::<Money>(), Ok(jpy));
    }

    #[test]
    fn every_kind_of_event_reads_back_as_written() {
        let (b, t) = (BatchId::parse("b1").unwrap(), TicketId::parse("t1").unwrap());
        let record = HttpRequestRecord { method: "POST".into(), url: "http://p/x".into(), headers: BTreeMap::new(), body: serde_json::json!({"a": 1}) };
        let kinds = vec![
            EventKind::Accepted,
            EventKind::Redriven { to_stage: Stage::Pay, parked_because: "down".into() },
            EventKind::StatusChanged { from: Status::Lookup, to: Status::Validate, reason: Some("r".into()) },
            EventKind::RetryScheduled { attempt: 2, retry_at: Utc::now(), error: "503".into() },
            EventKind::BudgetReserved { amount: eur(100) },
            EventKind::BudgetReleased { amount: eur(100) },
            EventKind::Paid { amount: eur(100) },
            EventKind::Notified { outcome: "sent".into() },
            EventKind::Resolved {
                action: crate::domain::resolution::Action::ConfirmedApplied,
                by: "ops".into(),
                note: "the gateway's console shows it".into(),
                provider_reference: Some("gateway-1".into()),
            },
            EventKind::Exchange(Arc::new(Exchange {
                provider: ProviderName::Gateway,
                operation: "capture".into(),
                attempt: 1,
                idempotency_key: Some("k".into()),
                request: record,
                response: Some(HttpResponseRecord { status: 200, headers: BTreeMap::new(), body: serde_json::Value::Null }),
                outcome: "ok".into(),
                error: None,
                latency_ms: 3,
                trace_id: Some("0af7651916cd43dd8448eb211c80319c".into()),
            })),
        ];
        for kind in kinds {
            let event = Event::new(&b, &t, Stage::Pay, kind, Utc::now());
            let json = serde_json::to_string(&event).unwrap();
            let back: Event = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(back, event);
        }
    }
}
