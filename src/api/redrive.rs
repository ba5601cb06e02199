//! Redrive: an operator sends a batch's parked tickets back into the pipeline,
//! each at the stage where it stopped, and finishes queueing an upload that was
//! cut short. `{"dry_run": true}` only lists what would be done. Redrive is an
//! operator's decision: a client key may not redrive, even its own batch.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::access::{Principal, forbidden};
use super::batches::{enqueue, find_batch};
use super::extract::{PathParams, read_body};
use super::problem::Problem;
use super::App;
use crate::domain::Status;

/// `{"dry_run": true}` with room to spare; anything larger is not a redrive request.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveRequest {
    #[serde(default)]
    dry_run: bool,
}

pub async fn redrive(
    State(app): State<Arc<App>>,
    caller: Principal,
    PathParams(batch_id): PathParams<String>,
    body: Body,
) -> Result<Response, Problem> {
    let request = read_request(body).await?;
    let batch = find_batch(&app, &caller, &batch_id).await?;
    if caller != Principal::Operator {
        return Err(forbidden("redrive is an operator's decision; ask your operator to redrive this batch"));
    }
    // An upload cut short after it was stored (a crash, Service Bus down) left
    // tickets without their first message: send them now.
    let requeued = !batch.enqueued;
    if requeued && !request.dry_run {
        enqueue(&app, &batch).await?;
    }
    let store = &app.store;
    let mut tickets = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store.tickets(&batch.batch_id, Some(Status::Parked), 500, cursor.as_deref()).await?;
        for t in &page.tickets {
            let entry = json!({ "ticket_id": t.ticket_id, "stage": t.parked_stage(), "reason": t.reason() });
            if request.dry_run {
                tickets.push(entry);
                continue;
            }
            let Some(current) = store.ticket(&t.batch_id, &t.ticket_id).await? else { continue };
            let redriven = app.pipeline.redrive(current).await.map_err(|e| {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("ticket {}: {e}; redrive again", t.ticket_id))
            })?;
            if redriven.is_some() {
                tickets.push(entry);
            }
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let body = json!({
        "batch_id": batch.batch_id,
        "dry_run": request.dry_run,
        "count": tickets.len(),
        "tickets": tickets,
        "requeued_upload": requeued,
    });
    Ok(Json(body).into_response())
}

/// An empty body is a plain redrive.
async fn read_request(body: Body) -> Result<RedriveRequest, Problem> {
    let bytes = read_body(body, MAX_REQUEST_BYTES, || format!("a redrive request is at most {MAX_REQUEST_BYTES} bytes")).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(RedriveRequest::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| Problem::bad_request(format!("malformed redrive request: {e}")))
}
