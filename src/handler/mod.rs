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

use crate::api::access::Access;
use crate::api::{self, App};
use crate::bus::BusSender;
use crate::config::{BusConfig, HandlerConfig, LeaseConfig, Settings, StoreConfig};
use crate::leases::Leases;
use crate::leases::blob::BlobLeases;
use crate::leases::sqlite::SqliteLeases;
use crate::store::Store;
use crate::store::cosmos::CosmosStore;
use crate::domain::Stage;
use crate::providers::client::ProviderClient;
use crate::stages::{Pipeline, StageMessage};
use crate::telemetry;
use tracing::Instrument;
use tracing::field::Empty;
use crate::store::sqlite::SqliteStore;
use invocation::Invocation;

/// The trigger binding's name in every queue function's function.json.
pub const TRIGGER_BINDING: &str = "message";

/// Behind [`crate::host::path::guarded`] as behind the local host: a path with
/// dot segments never reaches a route, whichever host forwarded it.
pub fn router(app: Arc<App>) -> Router {
    let api = api::router().layer(axum::middleware::from_fn_with_state(app.clone(), api::access::require_key));
    let routes = Router::new()
        .route("/", get(|| async { Json(json!({ "service": "ticketpay-handler" })) }))
        .route("/sweep", post(sweep))
        .route("/{function}", post(invoke))
        .merge(api)
        .with_state(app);
    crate::host::path::guarded(routes)
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
    let span = tracing::info_span!(
        "invocation",
        otel.name = %stage,
        otel.kind = "consumer",
        otel.status_code = Empty,
        batch_id = %message.batch_id,
        ticket_id = %message.ticket_id,
        client_id = Empty,
        stage = %stage,
        attempt = message.attempt,
        outcome = Empty,
        delivery_count = invocation.delivery_count,
        "messaging.system" = "servicebus",
        "messaging.destination.name" = %stage.queue(),
        "messaging.message.id" = invocation.message_id.as_deref().unwrap_or_default(),
    );
    telemetry::continue_from(&span, &invocation.application_properties);
    let handled = app.pipeline.handle(stage, message.clone()).instrument(span.clone()).await;
    let reply = match handled {
        Ok(handled) => {
            let outcome = handled.outcome(stage);
            span.record("outcome", outcome.as_str());
            span.record("otel.status_code", "ok");
            let log = format!("{stage} {}/{}: {outcome}", message.batch_id, message.ticket_id);
            Json(json!({ "Outputs": {}, "Logs": [log] })).into_response()
        }
        Err(e) => failed(&app, stage, &message, e).instrument(span.clone()).await,
    };
    drop(span);
    telemetry::flush().await;
    reply
}

/// The timer-triggered sweep (`functions/sweep`): overdue tickets moved again, batches completed.
async fn sweep(State(app): State<Arc<App>>) -> Response {
    let span = tracing::info_span!("sweep", otel.name = "sweep", otel.kind = "consumer", otel.status_code = Empty);
    let swept = app.pipeline.sweep(chrono::Utc::now()).instrument(span.clone()).await;
    let reply = match swept {
        Ok(s) => {
            span.record("otel.status_code", "ok");
            if s != Default::default() {
                tracing::info!(parent: &span, resent = s.resent, gave_up = s.gave_up, completed = s.completed, "sweep");
            }
            let log = format!("sweep: {} resent, {} given up, {} batches completed", s.resent, s.gave_up, s.completed);
            Json(json!({ "Outputs": {}, "Logs": [log], "ReturnValue": s })).into_response()
        }
        Err(e) => {
            span.record("otel.status_code", "error");
            tracing::warn!(parent: &span, error = %e, "sweep failed; the next run tries again");
            failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    };
    drop(span);
    telemetry::flush().await;
    reply
}

/// What becomes of a message whose stage failed: a permanent error parks the
/// ticket at once with the reason; a transient one comes back later with a
/// growing backoff; only when neither can be written does the host redeliver it.
async fn failed(app: &App, stage: Stage, message: &StageMessage, e: crate::stages::StageError) -> Response {
    let span = tracing::Span::current();
    span.record("otel.status_code", "error");
    let pipeline = &app.pipeline;
    let (outcome, done) = if e.is_transient() {
        ("deferred", pipeline.defer(stage, message).await)
    } else {
        tracing::error!(error = %e, "a permanent error: the ticket is parked for an operator");
        ("parked", pipeline.park_for_good(stage, message, &e).await)
    };
    if done {
        span.record("outcome", outcome);
        let log = format!("{stage} {}/{}: {outcome} after: {e}", message.batch_id, message.ticket_id);
        return Json(json!({ "Outputs": {}, "Logs": [log] })).into_response();
    }
    span.record("outcome", "error");
    tracing::warn!(error = %e, "invocation failed; the host will deliver the message again");
    failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

fn failure(status: StatusCode, error: String) -> Response {
    (status, Json(json!({ "error": error, "Logs": [error] }))).into_response()
}

/// Builds the app from its settings.
pub async fn build(config: HandlerConfig) -> anyhow::Result<Arc<App>> {
    let store: Arc<dyn Store> = match &config.store {
        StoreConfig::Embedded { path } => Arc::new(SqliteStore::open(path)?),
        StoreConfig::Cosmos { endpoint, database, identity } => {
            Arc::new(CosmosStore::connect(endpoint, database, identity.credential()?).await?)
        }
    };
    let bus = match &config.bus {
        BusConfig::Local { url, token: Some(token) } => BusSender::with_token(url, token),
        BusConfig::Local { url, token: None } => BusSender::new(url),
        BusConfig::Azure { url, identity } => BusSender::with_credential(url, identity.credential()?),
    };
    let spool = crate::stages::spool::AuditSpool::start(&config.spool_dir, store.clone())?;
    let leases: Arc<dyn Leases> = match &config.leases {
        LeaseConfig::Embedded { path } => Arc::new(SqliteLeases::open(path)?),
        LeaseConfig::Blob { service_url, container, identity } => {
            Arc::new(BlobLeases::new(service_url, container, identity.credential()?)?)
        }
    };
    let providers = ProviderClient::new(config.endpoints, &config.client, config.redactor)
        .with_journal(spool.clone())
        .with_shared_capacity(&config.client, leases, config.instance);
    let pipeline = Pipeline {
        store,
        spool: spool.clone(),
        bus,
        providers,
        retry: config.retry,
        sweep: config.sweep,
        claim_lease: config.claim_lease,
    };
    Ok(Arc::new(App { pipeline, authorities: config.authorities, access: config.access }))
}

pub async fn run() -> anyhow::Result<()> {
    let config = HandlerConfig::load(&Settings::from_env())?;
    if config.access == Access::Open {
        tracing::warn!("{} is not set: the API is open and every caller is an operator", crate::config::API_KEYS);
    }
    let port = config.port;
    let app = build(config).await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    tracing::info!(port, "ticketpay handler listening");
    axum::serve(listener, router(app.clone())).with_graceful_shutdown(crate::shutdown::signal()).await?;
    if let Some(capacity) = app.pipeline.providers.capacity() {
        capacity.release_all().await;
    }
    Ok(())
}
