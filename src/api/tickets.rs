//! Tickets: a batch's tickets page by page, one ticket with its timeline, and
//! lookup by the ticket's own reference.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::access::Principal;
use super::batches::{find_batch, parse_limit, with_field};
use super::extract::{PathParams, QueryParams};
use super::problem::Problem;
use super::{App, views};
use crate::domain::{Status, TicketId};

pub async fn list(
    State(app): State<Arc<App>>,
    caller: Principal,
    PathParams(batch_id): PathParams<String>,
    QueryParams(query): QueryParams,
) -> Result<Response, Problem> {
    let batch = find_batch(&app, &caller, &batch_id).await?;
    let status = match query.get("status").filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse::<Status>().map_err(|e| with_field(Problem::bad_request(e), "status"))?),
        None => None,
    };
    let limit = parse_limit(&query, 100, 1_000)?;
    let cursor = query.get("cursor").map(String::as_str).filter(|c| !c.is_empty());
    let page = app.store.tickets(&batch.batch_id, status, limit, cursor).await?;
    let tickets: Vec<_> = page.tickets.iter().map(|t| views::ticket(t, &caller)).collect();
    Ok(Json(json!({ "tickets": tickets, "next_cursor": page.next_cursor })).into_response())
}

pub async fn show(
    State(app): State<Arc<App>>,
    caller: Principal,
    PathParams((batch_id, ticket_id)): PathParams<(String, String)>,
) -> Result<Response, Problem> {
    let batch = find_batch(&app, &caller, &batch_id).await?;
    let not_found = || Problem::not_found(format!("no ticket `{ticket_id}` in batch `{batch_id}`"));
    let id = TicketId::parse(&ticket_id).map_err(|_| not_found())?;
    let ticket = app.store.ticket(&batch.batch_id, &id).await?.ok_or_else(not_found)?;
    let events = app.store.events(&batch.batch_id, &id).await?;
    Ok(Json(views::ticket_with_timeline(&ticket.value, &events, &caller)).into_response())
}

/// A client key finds its own client's tickets only.
pub async fn by_reference(State(app): State<Arc<App>>, caller: Principal, QueryParams(query): QueryParams) -> Result<Response, Problem> {
    let reference = query
        .get("reference")
        .filter(|r| !r.trim().is_empty())
        .ok_or_else(|| with_field(Problem::bad_request("the `reference` query parameter is required"), "reference"))?;
    let tickets = app.store.find_by_reference(reference.trim(), caller.client(), 100).await?;
    let tickets: Vec<_> = tickets.iter().map(|t| views::ticket(t, &caller)).collect();
    Ok(Json(json!({ "tickets": tickets })).into_response())
}
