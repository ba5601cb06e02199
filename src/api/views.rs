//! What the API shows of batches and tickets: amounts as decimal strings.

use serde_json::{Value, json};

use super::access::Principal;
use crate::domain::money::format_minor;
use crate::domain::{Batch, Event, Money, Ticket};
use crate::store::BatchSummary;

/// A batch is `completed` once its completion is recorded (every ticket ended and
/// told), `stalled` while tickets wait for a message that is overdue, else `running`.
fn state(batch: &Batch, stalled: u64) -> &'static str {
    match (batch.completed_at, stalled) {
        (Some(_), _) => "completed",
        (None, 0) => "running",
        (None, _) => "stalled",
    }
}

pub fn batch_status(batch: &Batch, summary: &BatchSummary, stalled: u64) -> Value {
    let counts: serde_json::Map<String, Value> =
        summary.counts.iter().map(|(status, n)| (status.as_str().to_owned(), json!(n))).collect();
    let money = |minor: i64| format_minor(minor, batch.currency);
    let progress = summary.stages(u64::from(batch.tickets));
    let stages: Vec<Value> = progress.iter().map(|p| json!({ "stage": p.stage, "waiting": p.waiting, "past": p.past })).collect();
    json!({
        "batch_id": batch.batch_id,
        "client_id": batch.client_id,
        "status": state(batch, stalled),
        "stalled": stalled,
        "queued": batch.enqueued,
        "currency": batch.currency,
        "budget": batch.budget().to_decimal(),
        "reserved": money(summary.reserved),
        "paid": money(summary.paid),
        "remaining": batch.remaining().to_decimal(),
        "tickets": batch.tickets,
        "counts": counts,
        "awaiting_notification": summary.awaiting_notification,
        "stages": stages,
        // Past notify: at an end state with the client told. What an ETA counts.
        "done": progress[4].past,
        "created_at": batch.created_at,
        "completed_at": batch.completed_at,
    })
}

/// A batch in a list; with its summary, everything its status shows.
pub fn batch_item(batch: &Batch, summary: Option<(&BatchSummary, u64)>) -> Value {
    let mut item = match summary {
        Some((summary, stalled)) => batch_status(batch, summary, stalled),
        None => json!({
            "batch_id": batch.batch_id,
            "client_id": batch.client_id,
            "status": state(batch, 0),
            "queued": batch.enqueued,
            "currency": batch.currency,
            "budget": batch.budget().to_decimal(),
            "tickets": batch.tickets,
            "created_at": batch.created_at,
            "completed_at": batch.completed_at,
        }),
    };
    item["status_url"] = json!(format!("/api/batches/{}", batch.batch_id));
    item
}

/// A ticket as `caller` may see it: a duplicate names the batch that pays it
/// only to whoever may see that batch.
pub fn ticket(t: &Ticket, caller: &Principal) -> Value {
    let duplicate_of = t.duplicate_of().filter(|d| caller.sees(&d.client_id)).map(|d| &d.batch_id);
    json!({
        "batch_id": t.batch_id,
        "ticket_id": t.ticket_id,
        "client_id": t.client_id,
        "authority": t.authority,
        "reference": t.reference,
        "status": t.status(),
        "stage": t.status().stage(),
        "currency": t.currency,
        "amount_due": t.amount_due().map(Money::to_decimal),
        "reserved": t.reserved().to_decimal(),
        "paid": t.paid().to_decimal(),
        "attempt": t.attempt,
        "failures": t.failures,
        "approved_by": t.approved_by(),
        "retry_at": t.retry_at,
        "last_error": t.last_error,
        "reason": t.reason(),
        "parked_stage": t.parked_stage(),
        "duplicate_of": duplicate_of,
        "payment": {
            "steps_done": t.pay.done,
            "steps_undone": t.pay.undone,
            "in_flight": t.pay.slot.in_flight,
            "outcome_unknown": t.pay.slot.is_unknown(),
            "failure": t.pay.failure,
        },
        "notified": t.notified,
        "notification": t.notification,
        "redrives": t.redrives,
        "resolution": t.resolution,
        "created_at": t.created_at,
        "updated_at": t.updated_at,
    })
}

pub fn ticket_with_timeline(t: &Ticket, events: &[Event], caller: &Principal) -> Value {
    let mut view = ticket(t, caller);
    // The ticket's distributed trace (App Insights' operation_Id), as its latest exchange recorded it.
    let trace_id = events.iter().rev().find_map(|e| match &e.kind {
        crate::domain::EventKind::Exchange(x) => x.trace_id.clone(),
        _ => None,
    });
    view["trace_id"] = serde_json::to_value(trace_id).unwrap_or(Value::Null);
    view["timeline"] = serde_json::to_value(events).unwrap_or(Value::Null);
    view
}
