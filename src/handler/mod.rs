//! `ticketpay handler`: the custom handler the Functions host starts.
//!
//! An HTTP server on `FUNCTIONS_CUSTOMHANDLER_PORT`. The host forwards the
//! `api` function's requests as they are (`/api/...`), and invokes each queue
//! function as `POST /{function}` with one message, or a batch of them, in its
//! payload. A 2xx JSON answer completes every message delivered; anything else
//! makes the host redeliver them all, so each message of a batch is settled
//! here on its own (done, put off with its own backoff, or parked) and the
//! batch fails only for a message that could be none of these.

pub mod invocation;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

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
use invocation::{Delivered, Invocation, Unreadable};

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
    let reply = match Delivered::parse(&body, TRIGGER_BINDING) {
        Err(e) => failure(StatusCode::BAD_REQUEST, e),
        Ok(Delivered::One(invocation)) => match settle(&app, stage, invocation, None).await {
            Settled::Done(log) => Json(json!({ "Outputs": {}, "Logs": [log] })).into_response(),
            Settled::Unreadable(e) => failure(StatusCode::BAD_REQUEST, e),
            Settled::Back(e) => failure(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        Ok(Delivered::Batch(messages)) => batch(&app, stage, messages).await,
    };
    telemetry::flush().await;
    reply
}

/// How one delivered message ended.
enum Settled {
    /// Handled, deferred or parked: the host may complete it. The line for its log.
    Done(String),
    /// Not a stage message at all.
    Unreadable(String),
    /// Neither handled nor put off: only the host's redelivery can bring it back.
    Back(String),
}

/// Messages of one batch handled at once: as many as one-message delivery
/// gives each instance (host.json `maxConcurrentCalls`), so a large batch
/// waits in line here and no call waits past its slot at the limiter.
const BATCH_IN_FLIGHT: usize = 64;

/// Batches get no lock renewal, so a batch answers within its queue's lock
/// (`lockDuration` in function.json, at least twice this): no message is begun
/// this long after its batch arrived; the rest are put off, and come back shortly.
pub const BATCH_STARTS_WITHIN: Duration = Duration::from_secs(30);

/// A batch message there is no time left for in its batch: sent again for shortly after.
async fn put_off(app: &App, stage: Stage, invocation: Invocation) -> Settled {
    let message: StageMessage = match serde_json::from_slice(&invocation.body) {
        Ok(m) => m,
        Err(e) => return Settled::Unreadable(format!("not a {stage} message: {e}")),
    };
    let label = format!("{stage} {}/{}", message.batch_id, message.ticket_id);
    if app.pipeline.put_off(stage, &message).await {
        Settled::Done(format!("{label}: put off, no time left in its batch"))
    } else {
        Settled::Back(format!("{label}: no time left in its batch, and it could not be put off"))
    }
}

/// A batch: every message is handled and settled on its own (concurrently;
/// a session's in order), and the batch answers 2xx unless one of them
/// must come back, which only the host's redelivery of the whole batch can do.
async fn batch(app: &App, stage: Stage, messages: Vec<Result<Invocation, Unreadable>>) -> Response {
    let span = tracing::info_span!(
        "invocation batch",
        otel.name = %format!("{stage} batch"),
        otel.kind = "consumer",
        otel.status_code = Empty,
        stage = %stage,
        "messaging.system" = "servicebus",
        "messaging.destination.name" = %stage.queue(),
        "messaging.batch.message_count" = messages.len(),
        back = Empty,
    );
    let arrived = tokio::time::Instant::now();
    let span = &span;
    let each = messages.into_iter().map(|m| async move {
        match m {
            Ok(invocation) if arrived.elapsed() < BATCH_STARTS_WITHIN => settle(app, stage, invocation, Some(span)).await,
            Ok(invocation) => put_off(app, stage, invocation).await,
            Err(u) => Settled::Unreadable(format!("message {}: {}", u.message_id.unwrap_or_default(), u.error)),
        }
    });
    let settled: Vec<Settled> = if stage.uses_sessions() {
        let mut settled = Vec::new();
        for one in each {
            settled.push(one.await);
        }
        settled
    } else {
        futures::stream::iter(each).buffer_unordered(BATCH_IN_FLIGHT).collect().await
    };
    let mut logs = Vec::with_capacity(settled.len());
    let mut back = Vec::new();
    for s in settled {
        match s {
            Settled::Done(log) => logs.push(log),
            // A stage message is only ever a pointer to a ticket's state, which the
            // sweep re-sends when the ticket is overdue: this one is logged and dropped
            // rather than holding its batch-mates hostage until they are all dead-lettered.
            Settled::Unreadable(e) => {
                tracing::error!(parent: span, error = %e, "an unreadable message in a {stage} batch is dropped");
                logs.push(format!("dropped: {e}"));
            }
            Settled::Back(e) => back.push(e),
        }
    }
    span.record("back", back.len());
    if back.is_empty() {
        span.record("otel.status_code", "ok");
        return Json(json!({ "Outputs": {}, "Logs": logs })).into_response();
    }
    span.record("otel.status_code", "error");
    tracing::warn!(parent: span, "{} message(s) of the batch could be neither handled nor put off; the host will deliver the batch again", back.len());
    failure(StatusCode::SERVICE_UNAVAILABLE, back.join("; "))
}

/// Handles one message, in a span that continues its ticket's trace (linked
/// from its batch's span, if it came in one), and settles it: done, put off,
/// parked, or back to the host.
async fn settle(app: &App, stage: Stage, invocation: Invocation, batch: Option<&tracing::Span>) -> Settled {
    let message: StageMessage = match serde_json::from_slice(&invocation.body) {
        Ok(m) => m,
        // Failing makes the host redeliver it and, in the end, dead-letter it, where an operator sees it.
        Err(e) => return Settled::Unreadable(format!("not a {stage} message: {e}")),
    };
    let span = tracing::info_span!(
        parent: None,
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
    if let Some(batch) = batch {
        telemetry::link(batch, &span);
    }
    let handled = app.pipeline.handle(stage, message.clone()).instrument(span.clone()).await;
    match handled {
        Ok(handled) => {
            let outcome = handled.outcome(stage);
            span.record("outcome", outcome.as_str());
            span.record("otel.status_code", "ok");
            Settled::Done(format!("{stage} {}/{}: {outcome}", message.batch_id, message.ticket_id))
        }
        Err(e) => failed(app, stage, &message, e).instrument(span).await,
    }
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
async fn failed(app: &App, stage: Stage, message: &StageMessage, e: crate::stages::StageError) -> Settled {
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
        return Settled::Done(format!("{stage} {}/{}: {outcome} after: {e}", message.batch_id, message.ticket_id));
    }
    span.record("outcome", "error");
    tracing::warn!(error = %e, "invocation failed; the host will deliver the message again");
    Settled::Back(format!("{stage} {}/{}: {e}", message.batch_id, message.ticket_id))
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
