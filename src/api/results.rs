//! A batch's results for its client: one row per ticket (where it ended, what
//! was owed and paid, why, the payment providers' references, whether the
//! client was told) and a totals line. CSV for `Accept: text/csv` and at
//! `results.csv`, else JSON. A client key gets its own batches' results only.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use serde_json::{Value, json};

use super::access::Principal;
use super::batches::find_batch;
use super::extract::PathParams;
use super::problem::Problem;
use super::App;
use crate::domain::money::format_minor;
use crate::domain::{Batch, BatchId, Event, EventKind, Money, Status, Ticket};
use crate::providers::ProviderName;
use crate::store::{Store, StoreError};

/// Tickets whose audit trails are read at once.
const TRAILS_AT_ONCE: usize = 16;

/// The payment providers, in the order a payment reaches them: one references column each.
const PAYMENT_PROVIDERS: [ProviderName; 4] = [ProviderName::Gateway, ProviderName::Settlement, ProviderName::Ledger, ProviderName::Receipt];

#[derive(Debug, Serialize)]
struct Row {
    ticket_id: String,
    authority: String,
    reference: String,
    status: Status,
    amount_due: String,
    paid: String,
    currency: &'static str,
    reason: String,
    /// Per payment provider, `operation:reference` of each operation it applied, space-separated.
    references: BTreeMap<ProviderName, String>,
    notified: bool,
    #[serde(skip)]
    due_minor: Option<i64>,
    #[serde(skip)]
    paid_minor: i64,
}

pub async fn results(
    State(app): State<Arc<App>>,
    caller: Principal,
    headers: HeaderMap,
    PathParams(batch_id): PathParams<String>,
) -> Result<Response, Problem> {
    let batch = find_batch(&app, &caller, &batch_id).await?;
    let rows = rows(app.store.as_ref(), &batch).await?;
    if wants_csv(&headers) {
        return csv_answer(&batch, &rows);
    }
    Ok(Json(json_answer(&batch, &rows)).into_response())
}

pub async fn results_csv(
    State(app): State<Arc<App>>,
    caller: Principal,
    PathParams(batch_id): PathParams<String>,
) -> Result<Response, Problem> {
    let batch = find_batch(&app, &caller, &batch_id).await?;
    let rows = rows(app.store.as_ref(), &batch).await?;
    csv_answer(&batch, &rows)
}

fn wants_csv(headers: &HeaderMap) -> bool {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    accept.split(',').any(|part| part.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("text/csv")))
}

/// Every ticket of the batch, in ticket id order.
pub(super) async fn all_tickets(store: &dyn Store, batch_id: &BatchId) -> Result<Vec<Ticket>, StoreError> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store.tickets(batch_id, None, 1_000, cursor.as_deref()).await?;
        out.extend(page.tickets);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(out),
        }
    }
}

async fn rows(store: &dyn Store, batch: &Batch) -> Result<Vec<Row>, StoreError> {
    let tickets = all_tickets(store, &batch.batch_id).await?;
    futures::stream::iter(tickets)
        .map(|t| async move {
            let events = store.events(&t.batch_id, &t.ticket_id).await?;
            Ok::<_, StoreError>(row(&t, &events))
        })
        .buffered(TRAILS_AT_ONCE)
        .try_collect()
        .await
}

fn row(t: &Ticket, events: &[Event]) -> Row {
    Row {
        ticket_id: t.ticket_id.to_string(),
        authority: t.authority.to_string(),
        reference: t.reference.as_ref().map(|r| r.as_str().to_owned()).unwrap_or_default(),
        status: t.status(),
        amount_due: t.amount_due().map(Money::to_decimal).unwrap_or_default(),
        paid: t.paid().to_decimal(),
        currency: t.currency.code(),
        reason: t.reason().unwrap_or_default().to_owned(),
        references: provider_references(events),
        notified: t.notified,
        due_minor: t.amount_due().map(|m| m.minor),
        paid_minor: t.paid().minor,
    }
}

/// What each payment provider said it applied, as its answers (to the
/// operation, or to a status query about it) recorded in the audit trail.
pub(super) fn provider_references(events: &[Event]) -> BTreeMap<ProviderName, String> {
    let mut seen: BTreeMap<ProviderName, Vec<(String, String)>> = PAYMENT_PROVIDERS.iter().map(|p| (*p, Vec::new())).collect();
    for e in events {
        let EventKind::Exchange(x) = &e.kind else { continue };
        let Some(list) = seen.get_mut(&x.provider) else { continue };
        let Some(body) = x.response.as_ref().filter(|_| x.outcome == "ok").map(|r| &r.body) else { continue };
        let (Some(id), Some(operation)) = (body["id"].as_str(), body["operation"].as_str()) else { continue };
        if !list.iter().any(|(op, _)| op == operation) {
            list.push((operation.to_owned(), id.to_owned()));
        }
    }
    seen.into_iter().map(|(p, list)| (p, list.iter().map(|(op, id)| format!("{op}:{id}")).collect::<Vec<_>>().join(" "))).collect()
}

struct Totals {
    tickets: usize,
    amount_due: i64,
    paid: i64,
    notified: usize,
    counts: BTreeMap<&'static str, usize>,
}

fn totals(rows: &[Row]) -> Totals {
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    for r in rows {
        *counts.entry(r.status.as_str()).or_default() += 1;
    }
    Totals {
        tickets: rows.len(),
        amount_due: rows.iter().filter_map(|r| r.due_minor).sum(),
        paid: rows.iter().map(|r| r.paid_minor).sum(),
        notified: rows.iter().filter(|r| r.notified).count(),
        counts,
    }
}

fn json_answer(batch: &Batch, rows: &[Row]) -> Value {
    let t = totals(rows);
    let money = |minor: i64| format_minor(minor, batch.currency);
    json!({
        "batch_id": batch.batch_id,
        "client_id": batch.client_id,
        "currency": batch.currency,
        "complete": batch.completed_at.is_some(),
        "tickets": rows,
        "totals": {
            "tickets": t.tickets,
            "amount_due": money(t.amount_due),
            "paid": money(t.paid),
            "budget": batch.budget().to_decimal(),
            "notified": t.notified,
            "counts": t.counts,
        },
    })
}

/// The header of the CSV: `kind` is `ticket` on each ticket's row and `total` on the last.
pub const CSV_HEADER: [&str; 14] = [
    "kind", "ticket_id", "authority", "reference", "status", "amount_due", "paid", "currency", "reason",
    "gateway_references", "settlement_references", "ledger_references", "receipt_references", "notified",
];

fn csv_answer(batch: &Batch, rows: &[Row]) -> Result<Response, Problem> {
    let failed = |e: &dyn std::fmt::Display| Problem::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("cannot write the CSV: {e}"));
    let mut out = csv::Writer::from_writer(Vec::new());
    out.write_record(CSV_HEADER).map_err(|e| failed(&e))?;
    for r in rows {
        let notified = r.notified.to_string();
        let mut record = vec!["ticket", &r.ticket_id, &r.authority, &r.reference, r.status.as_str(), &r.amount_due, &r.paid, r.currency, &r.reason];
        record.extend(PAYMENT_PROVIDERS.iter().map(|p| r.references.get(p).map(String::as_str).unwrap_or_default()));
        record.push(&notified);
        out.write_record(&record).map_err(|e| failed(&e))?;
    }
    let t = totals(rows);
    let counts = t.counts.iter().map(|(s, n)| format!("{s}={n}")).collect::<Vec<_>>().join(" ");
    let (tickets, due, paid, notified) =
        (t.tickets.to_string(), format_minor(t.amount_due, batch.currency), format_minor(t.paid, batch.currency), t.notified.to_string());
    out.write_record(["total", &tickets, "", "", &counts, &due, &paid, batch.currency.code(), "", "", "", "", "", &notified])
        .map_err(|e| failed(&e))?;
    let body = out.into_inner().map_err(|e| failed(&e))?;
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    let disposition = format!("attachment; filename=\"{}-results.csv\"", batch.batch_id);
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}
