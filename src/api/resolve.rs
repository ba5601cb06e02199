//! Resolution by an operator: `POST .../tickets/{ticket_id}/resolve` with
//! `{"action", "note", "provider_reference"?}` settles a ticket the machine
//! cannot (`domain::resolution`). The action must be one the ticket's state
//! opens; it is recorded in the audit trail with the key's name and the note,
//! and the ticket, its budget movement and that record are written together.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;

use super::access::{Principal, KeyName, forbidden};
use super::attention::disagreeing;
use super::batches::{find_batch, with_field};
use super::extract::{PathParams, read_body};
use super::problem::Problem;
use super::{App, views};
use crate::domain::resolution::{Action, Resolution};
use crate::domain::{Event, EventKind, Ticket, TicketId};
use crate::store::{BudgetChange, StoreError, TicketUpdate, Versioned};

const MAX_REQUEST_BYTES: usize = 64 * 1024;
const MAX_NOTE_CHARS: usize = 2_000;
const MAX_REFERENCE_CHARS: usize = 200;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveRequest {
    action: Action,
    note: String,
    #[serde(default)]
    provider_reference: Option<String>,
}

pub async fn resolve(
    State(app): State<Arc<App>>,
    caller: Principal,
    KeyName(by): KeyName,
    PathParams((batch_id, ticket_id)): PathParams<(String, String)>,
    body: Body,
) -> Result<Response, Problem> {
    let bytes = read_body(body, MAX_REQUEST_BYTES, || format!("a resolve request is at most {MAX_REQUEST_BYTES} bytes")).await?;
    let batch = find_batch(&app, &caller, &batch_id).await?;
    let not_found = || Problem::not_found(format!("no ticket `{ticket_id}` in batch `{batch_id}`"));
    let id = TicketId::parse(&ticket_id).map_err(|_| not_found())?;
    if caller != Principal::Operator {
        return Err(forbidden("resolving a ticket is an operator's decision"));
    }
    let request = parse(&bytes)?;
    let store = &app.store;
    let current = store.ticket(&batch.batch_id, &id).await?.ok_or_else(not_found)?;
    let last = store.reconciliations(&batch.batch_id, 1).await?.into_iter().next();
    let open = current.value.open_actions(disagreeing(&current.value, last.as_ref()));
    if !open.contains(&request.action) {
        return Err(not_open(&current.value, request.action, &open));
    }
    let resolution = Resolution {
        action: request.action,
        by,
        note: request.note.trim().to_owned(),
        provider_reference: request.provider_reference.map(|r| r.trim().to_owned()),
        at: Utc::now(),
    };
    let after = write(&app, &current, resolution).await?;
    if after.value.pending().is_some() {
        store.reopen(&after.value.batch_id).await?;
        if let Err(e) = app.pipeline.send_pending(&after.value).await {
            // Written and overdue from now on: the sweep sends it.
            tracing::warn!(error = %e, ticket_id = %after.value.ticket_id, "a resolved ticket's message could not be sent; the sweep will");
        }
    } else {
        app.pipeline.complete_if_done(&after.value.batch_id).await?;
    }
    let t = &after.value;
    let body = json!({
        "batch_id": t.batch_id,
        "ticket_id": t.ticket_id,
        "action": request.action,
        "status": t.status(),
        "actions": t.open_actions(false),
        "ticket": views::ticket(t, &caller),
    });
    Ok(Json(body).into_response())
}

fn parse(bytes: &[u8]) -> Result<ResolveRequest, Problem> {
    let request: ResolveRequest = serde_json::from_slice(bytes).map_err(|e| {
        let text = e.to_string();
        // Only the action is an enum: an unknown variant is an unknown action.
        let field = ["action", "note", "provider_reference"]
            .into_iter()
            .find(|f| text.contains(&format!("`{f}`")) || (*f == "action" && text.contains("unknown variant")));
        let p = Problem::bad_request(format!("malformed resolve request: {e}"));
        match field {
            Some(f) => with_field(p, f),
            None => p,
        }
    })?;
    let note = request.note.trim();
    if note.is_empty() || note.chars().count() > MAX_NOTE_CHARS {
        return Err(with_field(Problem::bad_request(format!("a note of 1 to {MAX_NOTE_CHARS} characters says why")), "note"));
    }
    let takes_reference = matches!(request.action, Action::ConfirmedApplied | Action::UndoneByHand);
    match request.provider_reference.as_deref().map(str::trim) {
        None if request.action == Action::ConfirmedApplied => {
            Err(with_field(Problem::bad_request("confirmed_applied needs the provider's reference for the operation"), "provider_reference"))
        }
        Some(_) if !takes_reference => Err(with_field(
            Problem::bad_request(format!("{} takes no provider_reference", request.action)),
            "provider_reference",
        )),
        Some(r) if r.is_empty() || r.len() > MAX_REFERENCE_CHARS || r.chars().any(|c| c.is_control()) => Err(with_field(
            Problem::bad_request(format!("provider_reference must be 1 to {MAX_REFERENCE_CHARS} characters, none a control character")),
            "provider_reference",
        )),
        _ => Ok(request),
    }
}

fn not_open(t: &Ticket, action: Action, open: &[Action]) -> Problem {
    let offered = match open {
        [] => "none: it needs no person".to_owned(),
        _ => open.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", "),
    };
    let state = match t.concern() {
        Some(c) => format!("{} ({})", t.status(), serde_json::to_value(c).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()),
        None => t.status().to_string(),
    };
    let mut p = Problem::new(StatusCode::CONFLICT, "conflict", format!("ticket {} is {state}: {action} is not open to it; open: {offered}", t.ticket_id));
    p.field = Some("action".into());
    p
}

/// The ticket as the action leaves it, with the record of who did what and any budget given back.
async fn write(app: &App, current: &Versioned<Ticket>, resolution: Resolution) -> Result<Versioned<Ticket>, Problem> {
    let before = &current.value;
    let mut ticket = before.clone();
    let stage = before.status().stage();
    let kind = EventKind::Resolved {
        action: resolution.action,
        by: resolution.by.clone(),
        note: resolution.note.clone(),
        provider_reference: resolution.provider_reference.clone(),
    };
    let resolved = ticket.resolve(resolution).map_err(|e| Problem::new(StatusCode::CONFLICT, "conflict", e))?;
    let event = |kind| Event::new(&ticket.batch_id, &ticket.ticket_id, stage, kind, Utc::now());
    let mut events = vec![event(kind)];
    if let Some(to_stage) = resolved.redriven_to {
        events.push(event(EventKind::Redriven { to_stage, parked_because: resolved.parked_because.clone() }));
    }
    if ticket.status() != before.status() {
        events.push(event(EventKind::StatusChanged { from: before.status(), to: ticket.status(), reason: ticket.reason().map(str::to_owned) }));
    }
    let budget = (resolved.release.minor > 0).then_some(BudgetChange::Release(resolved.release));
    if budget.is_some() {
        events.push(event(EventKind::BudgetReleased { amount: resolved.release }));
    }
    let update = TicketUpdate { ticket, etag: current.etag.clone(), budget, events };
    app.store.update_ticket(update).await.map_err(|e| match e {
        StoreError::Conflict(_) => Problem::new(StatusCode::CONFLICT, "conflict", "the ticket changed while this was decided; look at it again"),
        e => e.into(),
    })
}
