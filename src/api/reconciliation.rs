//! Reconciliation: asks each payment provider, by idempotency key and through
//! the same limited client as the payments, about every operation the batch
//! recorded as applied, declined or unknown, and records the run (who, when,
//! what agreed and what did not). Each query is an exchange in the ticket's
//! audit trail, like any other.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::StreamExt;
use serde_json::{Value, json};

use super::access::{Principal, KeyName, forbidden};
use super::batches::{find_batch, parse_limit, with_field};
use super::extract::{PathParams, QueryParams};
use super::problem::Problem;
use super::results::all_tickets;
use super::App;
use crate::domain::reconciliation::{Check, Expected, ProviderView, ReconciliationRun, expected_operations, verdict};
use crate::domain::{Batch, Event, EventKind, PayStep, Stage, Ticket};
use crate::providers::ProviderName;
use crate::providers::client::{CallError, Caller};

/// Queries in flight at once; the providers' own limits are kept by the client's limiter.
const QUERIES_AT_ONCE: usize = 64;
/// A query with no usable answer (5xx, 429, a refused query) is asked again this many times in all.
const ATTEMPTS: u32 = 5;

pub async fn reconcile(
    State(app): State<Arc<App>>,
    caller: Principal,
    KeyName(by): KeyName,
    PathParams(batch_id): PathParams<String>,
    QueryParams(query): QueryParams,
) -> Result<Response, Problem> {
    let batch = operators_batch(&app, &caller, &batch_id).await?;
    let provider = match query.get("provider").filter(|p| !p.is_empty()) {
        Some(p) => Some(payment_provider(p)?),
        None => None,
    };
    let tickets = all_tickets(app.store.as_ref(), &batch.batch_id).await?;
    let asked: Vec<(Arc<Ticket>, Expected)> = tickets
        .into_iter()
        .map(Arc::new)
        .flat_map(|t| expected_operations(&t).into_iter().map(move |e| (t.clone(), e)).collect::<Vec<_>>())
        .filter(|(_, e)| provider.is_none_or(|p| p == e.provider))
        .collect();
    let answers: Vec<(Check, Event)> = futures::stream::iter(asked)
        .map(|(t, e)| {
            let app = app.clone();
            async move { ask(&app, &t, e).await }
        })
        .buffer_unordered(QUERIES_AT_ONCE)
        .concat()
        .await;
    let (checks, events): (Vec<Check>, Vec<Event>) = answers.into_iter().unzip();
    record(&app, events).await;
    let run = ReconciliationRun::new(batch.batch_id.clone(), by, provider, Utc::now(), checks);
    app.store.record_reconciliation(&run).await?;
    let mut body = summary(&run);
    body["batch_id"] = json!(batch.batch_id);
    body["disagreements"] = json!(run.disagreements.iter().map(|c| with_link(&batch.batch_id, c)).collect::<Vec<_>>());
    Ok(Json(body).into_response())
}

/// The recorded runs of a batch, newest first.
pub async fn runs(
    State(app): State<Arc<App>>,
    caller: Principal,
    PathParams(batch_id): PathParams<String>,
    QueryParams(query): QueryParams,
) -> Result<Response, Problem> {
    let batch = operators_batch(&app, &caller, &batch_id).await?;
    let limit = parse_limit(&query, 20, 100)?;
    let runs = app.store.reconciliations(&batch.batch_id, limit).await?;
    Ok(Json(json!({ "batch_id": batch.batch_id, "runs": runs.iter().map(summary).collect::<Vec<_>>() })).into_response())
}

/// A batch as the caller may see it (404 as if absent), and only for an operator.
async fn operators_batch(app: &App, caller: &Principal, batch_id: &str) -> Result<Batch, Problem> {
    let batch = find_batch(app, caller, batch_id).await?;
    if *caller != Principal::Operator {
        return Err(forbidden("reconciliation is an operator's check"));
    }
    Ok(batch)
}

fn payment_provider(name: &str) -> Result<ProviderName, Problem> {
    let payment: Vec<ProviderName> = PayStep::ALL.iter().map(|s| s.provider()).collect();
    name.parse::<ProviderName>().ok().filter(|p| payment.contains(p)).ok_or_else(|| {
        let names: Vec<&str> = payment.iter().map(|p| p.as_str()).collect();
        with_field(Problem::bad_request(format!("provider must be one of {}, found `{name}`", names.join(", "))), "provider")
    })
}

/// Asks the provider about one operation, again while it gives no usable answer.
async fn ask(app: &App, t: &Ticket, e: Expected) -> Vec<(Check, Event)> {
    let caller = Caller::of(t, Stage::Pay);
    let mut out = Vec::new();
    for attempt in 1..=ATTEMPTS {
        let call = app.providers.operation_status(e.provider, &e.key, &caller).await;
        let event = Event::new(&t.batch_id, &t.ticket_id, Stage::Pay, EventKind::Exchange(std::sync::Arc::new(call.exchange)), Utc::now());
        let (theirs, wait) = match call.result {
            Ok(Some(r)) => (ProviderView::Applied { reference: r.id, amount_minor: r.amount.minor, currency: r.amount.currency }, None),
            Ok(None) => (ProviderView::Absent, None),
            Err(err) => {
                let wait = match &err {
                    CallError::Throttled { retry_after } => *retry_after,
                    _ => Duration::from_millis(200 * u64::from(attempt)),
                };
                (ProviderView::NoAnswer { error: err.to_string() }, Some(wait))
            }
        };
        let answered = wait.is_none();
        if answered || attempt == ATTEMPTS {
            let amount = t.amount_due().unwrap_or(t.paid()).minor;
            let check = Check {
                ticket_id: t.ticket_id.clone(),
                provider: e.provider,
                operation: e.operation.to_owned(),
                idempotency_key: e.key.clone(),
                ours: e.recorded,
                amount_minor: amount,
                currency: t.currency.code().to_owned(),
                verdict: verdict(e.recorded, amount, t.currency.code(), &theirs),
                theirs,
            };
            out.push((check, event));
            break;
        }
        // The unanswered query is in the trail too, even though it is asked again.
        record(app, vec![event]).await;
        tokio::time::sleep(wait.unwrap_or_default()).await;
    }
    out
}

/// The queries' exchanges into the audit trail; the spool keeps what the store cannot take now.
async fn record(app: &App, events: Vec<Event>) {
    if events.is_empty() {
        return;
    }
    if let Err(e) = app.store.append_events(&events).await {
        tracing::warn!(error = %e, "the store cannot take {} reconciliation exchange(s) now; they wait in the spool", events.len());
        app.spool.keep(events).await;
    }
}

fn with_link(batch_id: &crate::domain::BatchId, c: &Check) -> Value {
    let mut v = json!(c);
    v["ticket_url"] = json!(format!("/api/batches/{batch_id}/tickets/{}", c.ticket_id));
    v
}

/// A run as the batch shows it: who, when, and the counts.
pub(super) fn summary(run: &ReconciliationRun) -> Value {
    json!({
        "run_id": run.run_id,
        "at": run.at,
        "by": run.by,
        "provider": run.provider,
        "checked": run.checked,
        "disagreements": run.disagreements.len(),
        "agrees": run.agrees(),
        "providers": run.providers,
    })
}
