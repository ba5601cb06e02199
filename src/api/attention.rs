//! What needs a person in a batch: every ticket parked (an unknown outcome, a
//! refused compensation, stalled, retries spent), waiting for a message that
//! is overdue, a duplicate nobody has looked at, or disagreeing with a
//! provider in the last reconciliation; each with its reason, how long it has
//! waited and the actions open to it. An operator's view.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::access::{Principal, forbidden};
use super::batches::find_batch;
use super::extract::PathParams;
use super::problem::Problem;
use super::results::all_tickets;
use super::App;
use crate::domain::reconciliation::ReconciliationRun;
use crate::domain::{Money, Ticket};

pub async fn attention(State(app): State<Arc<App>>, caller: Principal, PathParams(batch_id): PathParams<String>) -> Result<Response, Problem> {
    let batch = find_batch(&app, &caller, &batch_id).await?;
    if caller != Principal::Operator {
        return Err(forbidden("what needs attention is an operator's view"));
    }
    let store = &app.store;
    let last = store.reconciliations(&batch.batch_id, 1).await?.into_iter().next();
    let now = Utc::now();
    let tickets: Vec<Value> = all_tickets(store.as_ref(), &batch.batch_id)
        .await?
        .iter()
        .filter_map(|t| entry(t, last.as_ref(), now - app.overdue_after, now))
        .collect();
    let body = json!({
        "batch_id": batch.batch_id,
        "count": tickets.len(),
        "tickets": tickets,
        "last_reconciliation": last.as_ref().map(super::reconciliation::summary),
    });
    Ok(Json(body).into_response())
}

/// Whether the last reconciliation disagreed on this ticket and nobody acted on it since.
pub(super) fn disagreeing(t: &Ticket, last: Option<&ReconciliationRun>) -> bool {
    last.is_some_and(|run| run.disagrees_on(&t.ticket_id) && t.resolution.as_ref().is_none_or(|r| r.at < run.at))
}

fn entry(t: &Ticket, last: Option<&ReconciliationRun>, overdue_before: DateTime<Utc>, now: DateTime<Utc>) -> Option<Value> {
    let disagrees = disagreeing(t, last);
    let mut concerns: Vec<Value> = t.concern().map(|c| json!(c)).into_iter().collect();
    let overdue = !t.status().is_end() && t.due_at() < overdue_before;
    if overdue {
        concerns.push(json!("stalled"));
    }
    if disagrees {
        concerns.push(json!("disagreeing"));
    }
    if concerns.is_empty() {
        return None;
    }
    let since = if overdue { t.due_at() } else { t.updated_at };
    let disagreements: Vec<Value> = last
        .filter(|_| disagrees)
        .map(|run| run.disagreements.iter().filter(|c| c.ticket_id == t.ticket_id).map(|c| json!(c)).collect())
        .unwrap_or_default();
    Some(json!({
        "ticket_id": t.ticket_id,
        "status": t.status(),
        "concerns": concerns,
        "reason": t.reason().or(t.last_error.as_deref()),
        "waiting_since": since,
        "waiting_seconds": (now - since).num_seconds().max(0),
        "amount_due": t.amount_due().map(Money::to_decimal),
        "reserved": t.reserved().to_decimal(),
        "actions": t.open_actions(disagrees),
        "disagreements": disagreements,
        "resolution": t.resolution,
        "ticket_url": format!("/api/batches/{}/tickets/{}", t.batch_id, t.ticket_id),
    }))
}
