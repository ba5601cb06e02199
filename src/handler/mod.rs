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

use futures::FutureExt;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::keys::Access;
use crate::api::{self, App};
use crate::bus::BusSender;
use crate::config::{BusConfig, HandlerConfig, LeaseConfig, Settings, StoreConfig};
use crate::leases::Leases;
use crate::leases::blob::BlobLeases;
use crate::leases::sqlite::SqliteLeases;
use crate::store::Store;
use crate::store::meter::working_for;
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
    let api = api::router()
        .layer(axum::middleware::from_fn_with_state(app.clone(), api::access::require_key))
        .layer(axum::middleware::from_fn(|request: axum::extract::Request, next: axum::middleware::Next| {
            working_for("api", next.run(request))
        }));
    let routes = Router::new()
        .route("/", get(|| async { Json(json!({ "service": "ticketpay-handler" })) }))
        .route("/sweep", post(|app| working_for("sweep", sweep(app))))
        .route("/{function}", post(invoke))
        .merge(api)
        .with_state(app);
    crate::host::path::guarded(routes)
}

async fn invoke(State(app): State<Arc<App>>, Path(function): Path<String>, body: Bytes) -> Response {
    let Some(stage) = Stage::from_function(&function) else {
        return failure(StatusCode::NOT_FOUND, format!("no queue function `{function}`"));
    };
    let run = async {
        match Delivered::parse(&body, TRIGGER_BINDING) {
            Err(e) => failure(StatusCode::BAD_REQUEST, e),
            Ok(Delivered::One(invocation)) => match member(stage, &invocation, None) {
                Err(e) => failure(StatusCode::BAD_REQUEST, e),
                Ok(m) => match run_member(app.clone(), stage, m, tokio::time::Instant::now()).await {
                    Settled::Done(log) => Json(json!({ "Outputs": {}, "Logs": [log] })).into_response(),
                    Settled::Unreadable(e) => failure(StatusCode::BAD_REQUEST, e),
                    Settled::Back(e) => failure(StatusCode::SERVICE_UNAVAILABLE, e),
                },
            },
            Ok(Delivered::Batch(messages)) => batch(&app, stage, messages).await,
        }
    };
    let reply = working_for(stage.function(), run).await;
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

/// Messages of one batch handled at once. A batch ends only when its last
/// message does, so a stage whose tickets make several calls in a row (pay)
/// needs room to run well ahead of its providers' pace, or each batch ends in
/// a long tail and the next one waits. Few enough that a caller in line at a
/// slow provider (20 requests a second) gets its slot within the limiter's wait.
const BATCH_IN_FLIGHT: usize = 128;

/// Batches get no lock renewal, so a batch answers within its queue's lock
/// (`lockDuration` in function.json, at least twice this): no message is begun
/// this long after its batch arrived; the rest are put off, and come back shortly.
pub const BATCH_STARTS_WITHIN: Duration = Duration::from_secs(30);

/// Once every message of a batch has begun, how long the batch waits for the
/// last ones before handing them off (see [`batch`]). Each stage a ticket
/// passes may wait this long for the batch before it to answer; each copy is
/// a message and a ticket read a minute later (`docs/benchmarks.md` weighs the two).
const TAIL_ALLOWANCE: Duration = Duration::from_millis(100);

/// One message of a batch, decoded, with the span that continues its ticket's trace.
#[derive(Clone)]
struct Member {
    message: StageMessage,
    span: tracing::Span,
}

fn member(stage: Stage, invocation: &Invocation, batch: Option<&tracing::Span>) -> Result<Member, String> {
    let message: StageMessage = serde_json::from_slice(&invocation.body).map_err(|e| format!("not a {stage} message: {e}"))?;
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
    Ok(Member { message, span })
}

/// A batch: every message is handled and settled on its own (concurrently;
/// a session's in order), and the batch answers 2xx unless one of them
/// must come back, which only the host's redelivery of the whole batch can do.
///
/// The host sends the next batch only once this one is answered, so the last
/// messages of a batch would leave the providers idle while they finish (for
/// pay, four calls in a row). Once every message has begun and the last ones
/// run past [`TAIL_ALLOWANCE`], each gets a copy sent for later and is left to
/// finish on its own: the batch answers, the next one starts, and should this
/// process die meanwhile, the copy does the work again (every stage is
/// idempotent per message). No message begins [`BATCH_STARTS_WITHIN`] after
/// its batch arrived; those left are put off, so a batch answers within its lock.
async fn batch(app: &Arc<App>, stage: Stage, messages: Vec<Result<Invocation, Unreadable>>) -> Response {
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
        handed_off = Empty,
    );
    let arrived = tokio::time::Instant::now();
    let mut settled = Vec::with_capacity(messages.len());
    let mut members = Vec::with_capacity(messages.len());
    for m in messages {
        let decoded = m.map_err(|u| format!("message {}: {}", u.message_id.unwrap_or_default(), u.error));
        match decoded.and_then(|i| member(stage, &i, Some(&span))) {
            Ok(member) => members.push(member),
            Err(e) => settled.push(Settled::Unreadable(e)),
        }
    }
    if stage.uses_sessions() {
        let messages: Vec<_> = members.into_iter().map(|m| (m.message, m.span)).collect();
        let handled = app.pipeline.handle_session(stage, &messages).await;
        for ((message, span), handled) in messages.into_iter().zip(handled) {
            settled.push(settle(app, stage, &message, handled).instrument(span).await);
        }
        return answer(&span, stage, settled);
    }
    let (done, handed_off) = concurrently(app, stage, members, arrived).await;
    settled.extend(done);
    span.record("handed_off", handed_off);
    answer(&span, stage, settled)
}

/// Runs a batch's members at most [`BATCH_IN_FLIGHT`] at a time, each in a
/// task of its own; once all have begun and the last ones run past
/// [`TAIL_ALLOWANCE`], those still running are handed to copies. How each one
/// was settled, and how many were handed off.
async fn concurrently(app: &Arc<App>, stage: Stage, members: Vec<Member>, arrived: tokio::time::Instant) -> (Vec<Settled>, usize) {
    let mut settled = Vec::with_capacity(members.len());
    let total = members.len();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Settled)>();
    let permits = Arc::new(tokio::sync::Semaphore::new(BATCH_IN_FLIGHT));
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let all_started = Arc::new(tokio::sync::Notify::new());
    let kept = members.clone();
    for (i, m) in members.into_iter().enumerate() {
        let (app, permits, started, all_started, done) = (app.clone(), permits.clone(), started.clone(), all_started.clone(), done_tx.clone());
        tokio::spawn(working_for(stage.function(), async move {
            let _permit = permits.acquire_owned().await;
            if started.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == total {
                all_started.notify_one();
            }
            let label = format!("{stage} {}/{}", m.message.batch_id, m.message.ticket_id);
            let s = std::panic::AssertUnwindSafe(run_member(app, stage, m, arrived)).catch_unwind().await;
            let _ = done.send((i, s.unwrap_or_else(|_| Settled::Back(format!("{label}: the handler failed")))));
        }));
    }
    drop(done_tx);
    let mut open = vec![true; total];
    let mut remaining = total;
    let mut tail_from: Option<tokio::time::Instant> = None;
    let mut handed_off = 0;
    let mut tail_handed = false;
    while remaining > 0 {
        let tail = async {
            match tail_from {
                Some(at) => tokio::time::sleep_until(at + TAIL_ALLOWANCE).await,
                None => all_started.notified().await,
            }
        };
        tokio::select! {
            done = done_rx.recv() => {
                let Some((i, s)) = done else { break };
                if std::mem::replace(&mut open[i], false) {
                    remaining -= 1;
                    settled.push(s);
                }
            }
            _ = tail, if !tail_handed => {
                if tail_from.is_none() {
                    tail_from = Some(tokio::time::Instant::now());
                    continue;
                }
                let still: Vec<usize> = (0..total).filter(|i| open[*i]).collect();
                // Sent together, so they leave as one batch request.
                let sent = futures::future::join_all(still.iter().map(|&i| app.pipeline.hand_off(stage, &kept[i].message).instrument(kept[i].span.clone()))).await;
                for (i, copied) in still.into_iter().zip(sent) {
                    let m = &kept[i];
                    if copied {
                        open[i] = false;
                        remaining -= 1;
                        handed_off += 1;
                        settled.push(Settled::Done(format!("{stage} {}/{}: still running, handed to a copy", m.message.batch_id, m.message.ticket_id)));
                    }
                }
                // Whatever could not be handed off is waited for.
                tail_handed = true;
            }
        }
    }
    (settled, handed_off)
}

/// The batch's answer from how each of its messages was settled.
fn answer(span: &tracing::Span, stage: Stage, settled: Vec<Settled>) -> Response {
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

/// Handles one message in its span, and settles it: done, put off, parked,
/// or back to the host. A batch member begun too late is put off instead.
async fn run_member(app: Arc<App>, stage: Stage, m: Member, arrived: tokio::time::Instant) -> Settled {
    let Member { message, span } = m;
    let label = format!("{stage} {}/{}", message.batch_id, message.ticket_id);
    if arrived.elapsed() >= BATCH_STARTS_WITHIN {
        return if app.pipeline.put_off(stage, &message).instrument(span).await {
            Settled::Done(format!("{label}: put off, no time left in its batch"))
        } else {
            Settled::Back(format!("{label}: no time left in its batch, and it could not be put off"))
        };
    }
    let handled = app.pipeline.handle(stage, message.clone()).instrument(span.clone()).await;
    settle(&app, stage, &message, handled).instrument(span).await
}

/// How a handled message is settled: done, put off, parked, or back to the host.
async fn settle(app: &App, stage: Stage, message: &StageMessage, handled: Result<crate::stages::Handled, crate::stages::StageError>) -> Settled {
    let span = tracing::Span::current();
    match handled {
        Ok(handled) => {
            let outcome = handled.outcome(stage);
            span.record("outcome", outcome.as_str());
            span.record("otel.status_code", "ok");
            Settled::Done(format!("{stage} {}/{}: {outcome}", message.batch_id, message.ticket_id))
        }
        Err(e) => failed(app, stage, message, e).await,
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
        StoreConfig::CosmosEmulator { emulation, charges } => emulated_store(*emulation, charges).await?,
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
    let capacity = providers.capacity().cloned();
    let pipeline = Pipeline {
        store,
        spool: spool.clone(),
        bus: Arc::new(bus),
        providers: Arc::new(providers),
        retry: config.retry,
        sweep: config.sweep,
        claim_lease: config.claim_lease,
    };
    Ok(Arc::new(App {
        store: pipeline.store.clone(),
        capacity,
        providers: pipeline.providers.clone(),
        spool,
        overdue_after: chrono::Duration::from_std(config.sweep.overdue_after).unwrap_or_default(),
        pipeline,
        authorities: config.authorities,
        access: config.access,
    }))
}

/// The Cosmos store on the in-memory emulator, its charges written to `charges` each second.
#[cfg(feature = "cosmos-emulator")]
async fn emulated_store(emulation: crate::config::Emulation, charges: &std::path::Path) -> anyhow::Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> = Arc::new(CosmosStore::emulated(emulation).await?);
    let (watched, charges) = (store.clone(), charges.to_owned());
    tokio::spawn(async move {
        let mut written = None;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = watched.charges();
            if written != now {
                if let Some(now) = &now {
                    write_charges(now, &charges);
                }
                written = now;
            }
        }
    });
    Ok(store)
}

#[cfg(not(feature = "cosmos-emulator"))]
async fn emulated_store(_: crate::config::Emulation, _: &std::path::Path) -> anyhow::Result<Arc<dyn Store>> {
    anyhow::bail!("{}=cosmos-emulator: this build has no Cosmos emulator (build with --features cosmos-emulator)", crate::config::STORE)
}

/// Writes what the store's requests cost so far to `file`, whole or not at all.
fn write_charges(charges: &crate::store::meter::Charges, file: &std::path::Path) {
    let new = file.with_extension("json.new");
    let saved = std::fs::write(&new, serde_json::to_vec(charges).unwrap_or_default()).and_then(|()| std::fs::rename(&new, file));
    if let Err(e) = saved {
        tracing::warn!(error = %e, file = %file.display(), "could not write the store's charges");
    }
}

pub async fn run() -> anyhow::Result<()> {
    let config = HandlerConfig::load(&Settings::from_env())?;
    if config.access == Access::Open {
        tracing::warn!("{} is not set: the API is open and every caller is an operator", crate::config::API_KEYS);
    }
    let port = config.port;
    let charges = match &config.store {
        StoreConfig::CosmosEmulator { charges, .. } => Some(charges.clone()),
        _ => None,
    };
    let app = build(config).await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    tracing::info!(port, "ticketpay handler listening");
    axum::serve(listener, router(app.clone())).with_graceful_shutdown(crate::shutdown::signal()).await?;
    if let (Some(file), Some(now)) = (charges, app.store.charges()) {
        write_charges(&now, &file);
    }
    if let Some(capacity) = &app.capacity {
        capacity.release_all().await;
    }
    Ok(())
}
