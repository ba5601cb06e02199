//! `ticketpay handler`: the custom handler the Functions host starts.
//!
//! An HTTP server on `FUNCTIONS_CUSTOMHANDLER_PORT`. The host forwards the
//! `api` function's requests as they are (`/api/...`), and invokes each queue
//! function as `POST /{function}` with the message in its payload. A 2xx JSON
//! answer completes the message; anything else makes the host redeliver it.

pub mod invocation;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::api::{self, App};
use crate::bus::BusSender;
use crate::config::{HandlerConfig, Settings};
use crate::domain::Stage;
use crate::providers::client::ProviderClient;
use crate::stages::{Handled, Pipeline, StageMessage};
use crate::store::sqlite::SqliteStore;
use invocation::Invocation;

/// The trigger binding's name in every queue function's function.json.
pub const TRIGGER_BINDING: &str = "message";

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(|| async { Json(json!({ "service": "ticketpay-handler" })) }))
        .route("/{function}", post(invoke))
        .merge(api::router())
        .with_state(app)
}

async fn invoke(State(app): State<Arc<App>>, Path(function): Path<String>, body: Bytes) -> Response {
    let Some(stage) = Stage::from_function(&function) else {
        return failure(StatusCode::NOT_FOUND, format!("no queue function `{function}`"));
    };
    let invocation = match Invocation::parse(&body, TRIGGER_BINDING) {
        Ok(i) => i,
        Err(e) => return failure(StatusCode::BAD_REQUEST, e),
    };
    let message: StageMessage = match serde_json::from_slice(&invocation.body) {
        Ok(m) => m,
        // Failing makes the host redeliver it and, in the end, dead-letter it, where an operator sees it.
        Err(e) => return failure(StatusCode::BAD_REQUEST, format!("not a {stage} message: {e}")),
    };
    match app.pipeline.handle(stage, message.clone()).await {
        Ok(handled) => {
            let log = match handled {
                Handled::Done(status) => format!("{stage} {}/{}: now {status}", message.batch_id, message.ticket_id),
                Handled::Stale => format!("{stage} {}/{}: stale message, nothing to do", message.batch_id, message.ticket_id),
                Handled::Deferred => format!("{stage} {}/{}: in progress elsewhere, checking back later", message.batch_id, message.ticket_id),
                Handled::UnknownTicket => format!("{stage} {}/{}: no such ticket, dropped", message.batch_id, message.ticket_id),
            };
            Json(json!({ "Outputs": {}, "Logs": [log] })).into_response()
        }
        Err(e) => {
            tracing::warn!(%stage, batch_id = %message.batch_id, ticket_id = %message.ticket_id, error = %e, delivery = invocation.delivery_count, "invocation failed");
            failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

fn failure(status: StatusCode, error: String) -> Response {
    (status, Json(json!({ "error": error, "Logs": [error] }))).into_response()
}

/// Builds the app from its settings.
pub fn build(config: HandlerConfig) -> anyhow::Result<Arc<App>> {
    let store = SqliteStore::open(&config.store_path)?;
    let pipeline = Pipeline {
        store: Arc::new(store),
        bus: BusSender::new(&config.bus_url),
        providers: ProviderClient::new(config.endpoints, &config.client, config.redactor),
        retry: config.retry,
        claim_lease: config.claim_lease,
    };
    Ok(Arc::new(App { pipeline, authorities: config.authorities }))
}

pub async fn run() -> anyhow::Result<()> {
    let config = HandlerConfig::load(&Settings::from_env())?;
    let port = config.port;
    let app = build(config)?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    tracing::info!(port, "ticketpay handler listening");
    axum::serve(listener, router(app)).with_graceful_shutdown(crate::shutdown::signal()).await?;
    Ok(())
}
