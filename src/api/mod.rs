//! The HTTP API (the `api` function, under `/api`): upload batches, follow
//! them, and look into any ticket. Errors are `application/problem+json`.
//! `/api/console` serves a status page for people that reads this same API.
//! Every route but [`access::OPEN_PATHS`] needs a key ([`access`]).
//! `openapi.json` beside this file describes it and is served as it is.

pub mod access;
mod attention;
mod batches;
pub mod console;
mod extract;
pub mod problem;
mod reconciliation;
mod redrive;
mod resolve;
mod results;
mod tickets;
mod views;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};

use crate::domain::AuthorityCode;
use crate::providers::client::Providers;
use crate::stages::Pipeline;
use crate::stages::spool::AuditSpool;
use crate::providers::capacity::Capacity;
use crate::store::Store;
use access::Access;
use problem::Problem;

pub use batches::MAX_UPLOAD_BYTES;

/// The OpenAPI document of every route below.
pub const OPENAPI: &str = include_str!("openapi.json");

/// What the API and the stages share.
pub struct App {
    /// What the API reads and writes directly; the same store the pipeline moves tickets in.
    pub store: Arc<dyn Store>,
    /// What this instance holds of each provider's capacity, when it is shared.
    pub capacity: Option<Arc<Capacity>>,
    /// The providers, asked directly by reconciliation.
    pub providers: Arc<dyn Providers>,
    /// Where the API's own exchanges wait while the store cannot take them.
    pub spool: Arc<AuditSpool>,
    /// How long a ticket's message may be late before the ticket counts as stalled.
    pub overdue_after: chrono::Duration,
    /// The stages' operations the API starts: queueing an upload, redriving,
    /// sending a resolved ticket on, completing a batch.
    pub pipeline: Pipeline,
    pub authorities: Vec<AuthorityCode>,
    pub access: Access,
}

/// A table of routes, each with the methods it answers and their handlers,
/// made into both a router and the list of what it serves ([`ROUTES`]), which
/// the OpenAPI document is checked against.
macro_rules! route_table {
    ($name:ident, $router:ident: $($path:literal => $m0:ident($h0:path) $(, $m:ident($h:path))*;)+) => {
        /// Every route this router serves, with its methods.
        pub const $name: &[(&str, &[&str])] = &[$(($path, &[stringify!($m0) $(, stringify!($m))*])),+];

        fn $router() -> axum::Router<std::sync::Arc<crate::api::App>> {
            axum::Router::new() $(.route($path, axum::routing::$m0($h0) $(.$m($h))*))+
        }
    };
}
pub(crate) use route_table;

route_table! { ROUTES, routes:
    "/api/openapi.json" => get(openapi);
    "/api/authorities" => get(authorities);
    "/api/capacity" => get(capacity);
    "/api/batches" => get(batches::list), post(batches::upload);
    "/api/batches/{batch_id}" => get(batches::status);
    "/api/batches/{batch_id}/attention" => get(attention::attention);
    "/api/batches/{batch_id}/reconciliation" => get(reconciliation::reconcile);
    "/api/batches/{batch_id}/reconciliations" => get(reconciliation::runs);
    "/api/batches/{batch_id}/redrive" => post(redrive::redrive);
    "/api/batches/{batch_id}/results" => get(results::results);
    "/api/batches/{batch_id}/results.csv" => get(results::results_csv);
    "/api/batches/{batch_id}/tickets" => get(tickets::list);
    "/api/batches/{batch_id}/tickets/{ticket_id}" => get(tickets::show);
    "/api/batches/{batch_id}/tickets/{ticket_id}/resolve" => post(resolve::resolve);
    "/api/tickets" => get(tickets::by_reference);
}

pub fn router() -> Router<Arc<App>> {
    routes().merge(console::router()).fallback(not_found).method_not_allowed_fallback(method_not_allowed)
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn authorities(State(app): State<Arc<App>>) -> impl IntoResponse {
    Json(serde_json::json!({ "authorities": app.authorities }))
}

/// Each provider's shared capacity, here and across the deployment: an operator's view.
async fn capacity(State(app): State<Arc<App>>, caller: access::Principal) -> Result<Response, Problem> {
    if caller != access::Principal::Operator {
        return Err(access::forbidden("the providers' capacity is an operator's view"));
    }
    let body = match &app.capacity {
        Some(c) => serde_json::json!({ "instance": c.instance(), "shared": true, "providers": c.status().await }),
        None => serde_json::json!({ "instance": null, "shared": false, "providers": [] }),
    };
    Ok(Json(body).into_response())
}

async fn not_found() -> Problem {
    Problem::not_found("no such resource")
}

async fn method_not_allowed() -> Problem {
    Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "this method is not allowed here")
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use crate::domain::Status;

    #[test]
    fn the_document_knows_every_status() {
        let doc: Value = serde_json::from_str(super::OPENAPI).unwrap();
        let statuses: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(doc["components"]["schemas"]["Status"]["enum"], serde_json::json!(statuses));
        let mut counted = 0;
        for schema in doc["components"]["schemas"].as_object().unwrap().values() {
            let Some(counts) = schema["properties"]["counts"]["properties"].as_object() else { continue };
            let keys: std::collections::BTreeSet<&str> = counts.keys().map(String::as_str).collect();
            assert_eq!(keys, statuses.iter().copied().collect());
            counted += 1;
        }
        assert!(counted >= 2, "the batch status and the batch list item count by status");
    }
}
