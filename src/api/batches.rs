//! Batches: upload (all or nothing), list, and status.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde_json::json;

use super::access::{Principal, forbidden};
use super::extract::{PathParams, QueryParams, read_body};
use super::problem::Problem;
use super::{App, views};
use crate::domain::upload::{self, Header};
use crate::domain::ids::IdempotencyKey;
use crate::domain::{Batch, BatchId, BatchRequest, ClientId, Event, EventKind, Stage, Ticket};
use crate::stages::StageError;
use crate::telemetry;
use tracing::Instrument;
use crate::store::{BatchSummary, Created};

/// Large enough for 5,000 tickets with long references, small enough to refuse abuse.
pub const MAX_UPLOAD_BYTES: usize = 4 * 1024 * 1024;

pub async fn upload(
    State(app): State<Arc<App>>,
    caller: Principal,
    QueryParams(query): QueryParams,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let key = idempotency_key(&headers)?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if media != "application/json" && media != "text/csv" {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            format!("Content-Type `{content_type}` is not accepted; send application/json or text/csv"),
        ));
    }
    let bytes = read_body(body, MAX_UPLOAD_BYTES, || format!("the upload is larger than {MAX_UPLOAD_BYTES} bytes")).await?;
    let request = if media == "text/csv" {
        let header = Header {
            client_id: query.get("client_id").map(String::as_str),
            currency: query.get("currency").map(String::as_str),
            budget: query.get("budget").map(String::as_str),
        };
        upload::parse_csv(&bytes, &header, &app.authorities)?
    } else {
        upload::parse_json(&bytes, &app.authorities)?
    };
    if !caller.sees(&request.client_id) {
        return Err(with_field(forbidden(format!("this key uploads for its own client only, not for `{}`", request.client_id)), "client_id"));
    }
    let span = tracing::info_span!(
        "upload",
        otel.name = "POST /api/batches",
        otel.kind = "server",
        batch_id = tracing::field::Empty,
        client_id = %request.client_id,
        tickets = request.tickets.len(),
        stage = "upload",
        outcome = tracing::field::Empty,
    );
    let accepted = accept(&app, request, key).instrument(span.clone()).await;
    span.record("outcome", if accepted.is_ok() { "accepted" } else { "refused" });
    drop(span);
    telemetry::flush().await;
    accepted
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, Problem> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let parsed = match value.to_str() {
        Ok(text) => IdempotencyKey::parse(text),
        Err(_) => Err(format!("the Idempotency-Key is not ASCII; use {}", IdempotencyKey::RULE)),
    };
    parsed.map(Some).map_err(|e| with_field(Problem::bad_request(e), "Idempotency-Key"))
}

/// Stores the batch and its tickets in one write, then queues every ticket for lookup.
async fn accept(app: &App, request: BatchRequest, key: Option<IdempotencyKey>) -> Result<Response, Problem> {
    let now = Utc::now();
    let batch = Batch::accepted(BatchId::generate(), &request, key.clone().map(String::from), now);
    let tickets: Vec<Ticket> = request.tickets.into_iter().map(|line| Ticket::accepted(&batch, line, now)).collect();
    let events: Vec<Event> = tickets
        .iter()
        .map(|t| Event::new(&t.batch_id, &t.ticket_id, Stage::Lookup, EventKind::Accepted, now))
        .collect();
    let batch = match app.store.create_batch(&batch, &tickets, &events).await? {
        Created::New => batch,
        Created::Existing(existing) if existing.request_digest != batch.request_digest => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                format!(
                    "Idempotency-Key `{}` was already used for another upload (batch {})",
                    key.as_ref().map(IdempotencyKey::as_str).unwrap_or_default(),
                    existing.batch_id
                ),
            ));
        }
        Created::Existing(existing) => existing,
    };
    tracing::Span::current().record("batch_id", batch.batch_id.as_str());
    if !batch.enqueued {
        enqueue(app, &batch).await?;
    }
    let body = json!({
        "batch_id": batch.batch_id,
        "tickets": batch.tickets,
        "status_url": format!("/api/batches/{}", batch.batch_id),
    });
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, format!("/api/batches/{}", batch.batch_id))], Json(body)).into_response())
}

/// Sends every ticket's first message (see `Pipeline::enqueue_upload`).
pub(super) async fn enqueue(app: &App, batch: &Batch) -> Result<(), Problem> {
    app.pipeline.enqueue_upload(batch).await.map_err(|e| match e {
        StageError::Bus(e) => Problem {
            batch_id: Some(batch.batch_id.to_string()),
            ..Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not-queued",
                format!(
                    "batch {} is stored but not every ticket was queued ({e}); it is queued again by itself within minutes, \
                     or now if you send the same upload again with the same Idempotency-Key",
                    batch.batch_id
                ),
            )
        },
        StageError::Store(e) => e.into(),
        StageError::Busy { .. } => Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the upload is being queued; try again"),
    })
}

/// A client key lists its own batches; an operator's, every client's or the one asked for.
pub async fn list(State(app): State<Arc<App>>, caller: Principal, QueryParams(query): QueryParams) -> Result<Response, Problem> {
    let asked = match query.get("client_id") {
        Some(c) => Some(ClientId::parse(c).map_err(|e| with_field(Problem::bad_request(e), "client_id"))?),
        None => None,
    };
    let client = match (caller.client(), asked) {
        (Some(own), Some(asked)) if *own != asked => {
            return Err(with_field(forbidden(format!("this key lists its own client's batches only, not `{asked}`'s")), "client_id"));
        }
        (Some(own), _) => Some(own.clone()),
        (None, asked) => asked,
    };
    let limit = parse_limit(&query, 100, 1_000)?;
    let with_summary = parse_flag(&query, "summary")?;
    let store = &app.store;
    let mut items = Vec::new();
    for batch in store.batches(client.as_ref(), limit).await? {
        // Counting a batch's tickets costs a query per batch, so only when asked.
        let item = if with_summary {
            let (batch, summary, stalled) = summarise(&app, batch).await?;
            views::batch_item(&batch, Some((&summary, stalled)))
        } else {
            views::batch_item(&batch, None)
        };
        items.push(item);
    }
    Ok(Json(json!({ "batches": items })).into_response())
}

fn parse_flag(query: &HashMap<String, String>, name: &str) -> Result<bool, Problem> {
    match query.get(name).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(v) => Err(with_field(Problem::bad_request(format!("{name} must be `true` or `false`, found `{v}`")), name)),
    }
}

pub async fn status(State(app): State<Arc<App>>, caller: Principal, PathParams(batch_id): PathParams<String>) -> Result<Response, Problem> {
    let batch = find_batch(&app, &caller, &batch_id).await?;
    let (batch, summary, stalled) = summarise(&app, batch).await?;
    Ok(Json(views::batch_status(&batch, &summary, stalled)).into_response())
}

/// The batch's counts and its overdue tickets. A batch found complete whose
/// completion was never recorded (a crash between the last notification and
/// the record) is recorded now, and one recorded complete with a ticket on its
/// way again is reopened, so every view says the same.
async fn summarise(app: &App, mut batch: Batch) -> Result<(Batch, BatchSummary, u64), Problem> {
    let store = &app.store;
    let summary = store.summary(&batch.batch_id, chrono::Utc::now() - app.overdue_after).await?;
    match (summary.is_complete(), batch.completed_at) {
        (true, None) => app.pipeline.complete_if_done(&batch.batch_id).await?,
        // Completed, then a ticket sent back in (a redrive that stopped halfway).
        (false, Some(_)) => store.reopen(&batch.batch_id).await?,
        _ => {}
    }
    if summary.is_complete() != batch.completed_at.is_some() {
        batch = store.batch(&batch.batch_id).await?.unwrap_or(batch);
    }
    let stalled = match batch.completed_at {
        Some(_) => 0,
        None => summary.overdue,
    };
    Ok((batch, summary, stalled))
}

/// The batch, if the caller may see it: another client's batch is not found, like one that does not exist.
pub(super) async fn find_batch(app: &App, caller: &Principal, batch_id: &str) -> Result<Batch, Problem> {
    let not_found = || Problem::not_found(format!("no batch `{batch_id}`"));
    let id = BatchId::parse(batch_id).map_err(|_| not_found())?;
    let batch = app.store.batch(&id).await?.ok_or_else(not_found)?;
    if !caller.sees(&batch.client_id) {
        return Err(not_found());
    }
    Ok(batch)
}

pub(super) fn parse_limit(query: &HashMap<String, String>, default: usize, max: usize) -> Result<usize, Problem> {
    match query.get("limit") {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(with_field(Problem::bad_request(format!("limit must be a whole number from 1 to {max}, found `{v}`")), "limit")),
        },
    }
}

pub(super) fn with_field(mut p: Problem, field: &str) -> Problem {
    p.field = Some(field.to_owned());
    p
}
