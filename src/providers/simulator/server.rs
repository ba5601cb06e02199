//! The HTTP side of the simulator: one axum router playing all nine providers,
//! with per-provider limits, latency, faults, idempotency records and counters.

// The `Err` of the helpers below is the HTTP answer itself, built once per request.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::Rng;
use serde::Serialize;
use serde_json::{Value, json};

use super::scenario::{ProviderSettings, Scenario, outcome_for};
use crate::domain::ticket::Operation;
use crate::domain::PayStep;
use crate::providers::ProviderName;
use crate::providers::wire::{
    CheckRequest, CheckResponse, Decision, DueStatus, IDEMPOTENCY_KEY, LookupResponse, REQUEST_ID,
    OperationRequest, OperationResponse, ProviderError, WireMoney,
};

/// Builds the router serving every provider for `scenario`.
pub fn router(scenario: Scenario) -> Router {
    let sim = Arc::new(Sim::new(scenario));
    Router::new()
        .route("/", get(root))
        .route("/stats", get(stats))
        .route("/admin/outages", post(start_outage))
        .route("/admin/forget", post(forget))
        .route("/requests", get(requests))
        .route("/operations", get(applied_operations))
        .route("/authority/{authority}/tickets/{ticket_id}", get(lookup))
        .route("/{provider}/operations/{key}", get(status))
        .route("/{provider}/{operation}", post(operate))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(sim.clone(), log_request))
        .with_state(sim)
}

/// One request as a provider received it.
#[derive(Debug, Clone, Serialize)]
struct Received {
    request_id: Option<String>,
    method: String,
    path: String,
}

/// Keeps every request to a provider (not the simulator's own endpoints) in
/// `GET /requests`, and sees each one through to its end.
async fn log_request(State(sim): State<Arc<Sim>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = req.uri().path();
    if !matches!(path, "/" | "/stats" | "/requests" | "/operations" | "/admin/outages" | "/admin/forget") {
        let request_id = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let received = Received { request_id, method: req.method().to_string(), path: path.to_owned() };
        lock(&sim.received).push(received);
    }
    // A provider goes on with a request whose caller hung up, as a real one
    // does: it stays in flight, and an operation is still applied.
    match tokio::spawn(next.run(req)).await {
        Ok(response) => response,
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "simulator_failed", Some(e.to_string())),
    }
}

/// `GET /operations`: every operation applied so far, in the order applied.
async fn applied_operations(State(sim): State<Arc<Sim>>) -> Response {
    let all = lock(&sim.applied).clone();
    ok(json!({ "operations": all }))
}

/// `GET /requests`: every provider request received so far, in arrival order.
async fn requests(State(sim): State<Arc<Sim>>) -> Response {
    let all = lock(&sim.received).clone();
    ok(json!({ "requests": all }))
}

// ---- state -------------------------------------------------------------------

struct Sim {
    scenario: Scenario,
    started: Instant,
    /// Distinguishes the references of one simulator run from another's.
    run_tag: u32,
    providers: Vec<ProviderState>,
    received: Mutex<Vec<Received>>,
    /// Every operation applied, in the order applied.
    applied: Mutex<Vec<AppliedOperation>>,
}

/// An operation as a provider applied it: what ticketpay's records must match.
#[derive(Debug, Clone, Serialize)]
struct AppliedOperation {
    provider: ProviderName,
    operation: String,
    idempotency_key: String,
    ticket_id: String,
    batch_id: String,
    amount: WireMoney,
}

impl Sim {
    fn new(scenario: Scenario) -> Self {
        let providers = ProviderName::ALL
            .into_iter()
            .map(|p| ProviderState::new(p, scenario.provider(p).clone()))
            .collect();
        Sim { scenario, started: Instant::now(), run_tag: rand::rng().random(), providers, received: Mutex::new(Vec::new()), applied: Mutex::new(Vec::new()) }
    }

    fn state(&self, p: ProviderName) -> &ProviderState {
        // `providers` is built from ProviderName::ALL, in order.
        &self.providers[ProviderName::ALL.iter().position(|q| *q == p).unwrap_or(0)]
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    /// Accepted (not throttled) requests in flight: what the limit applies to.
    active: AtomicU64,
    throttled: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    applied: AtomicU64,
    declined: AtomicU64,
    duplicates: AtomicU64,
    charges: AtomicU64,
    duplicate_charges: AtomicU64,
    sequence: AtomicU64,
}

/// Fixed one-second windows by arrival time, since the server started.
#[derive(Default)]
struct Window {
    second: u64,
    received: u64,
    accepted: u64,
    peak_received: u64,
}

struct Applied {
    operation: String,
    ticket_id: String,
    amount: WireMoney,
    response: OperationResponse,
}

struct ProviderState {
    name: ProviderName,
    settings: ProviderSettings,
    counters: Counters,
    window: Mutex<Window>,
    applied: Mutex<HashMap<String, Applied>>,
    outage: Mutex<Option<Outage>>,
}

/// How a provider misbehaves for a while, whatever its scenario says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
enum OutageKind {
    /// Every request answered 503.
    Down,
    /// Every request held for `hang_ms`, then 504.
    Hang,
    /// Every request answered 429 with `Retry-After: 1`.
    Throttle,
    /// Every request held for `hang_ms`, then 504; operations are applied first.
    HangAfterApply,
    /// Every request answered 500; operations are applied first.
    ErrorAfterApply,
    /// Status queries (`GET /operations/{key}`) answered `status` (default 409); the rest as usual.
    StatusError,
    /// Every request answered `status` (default 403), nothing applied.
    Refuse,
    /// Compensations (refund, cancel, reverse, void) declined for good (the
    /// documented 422), nothing undone; the rest as usual. What a person must settle.
    RefuseUndo,
}

#[derive(Debug, Clone, Copy)]
struct Outage {
    kind: OutageKind,
    status: StatusCode,
    until: Instant,
}

impl ProviderState {
    fn new(name: ProviderName, settings: ProviderSettings) -> Self {
        ProviderState {
            name,
            settings,
            counters: Counters::default(),
            window: Mutex::new(Window::default()),
            applied: Mutex::new(HashMap::new()),
            outage: Mutex::new(None),
        }
    }

    fn outage(&self) -> Option<Outage> {
        lock(&self.outage).filter(|o| Instant::now() < o.until)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Decrements a gauge when the request ends, however it ends.
struct Gauge<'a>(&'a AtomicU64);

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// A request the provider accepted; holds its place in the in-flight counts.
struct Admitted<'a> {
    _in_flight: Gauge<'a>,
    _active: Gauge<'a>,
}

enum Fault {
    None,
    Error(StatusCode),
    Timeout { apply_first: bool },
    /// Applied (if it is an operation), then answered 500.
    ErrorAfterApply,
    /// Answered with this 4xx, nothing applied.
    Refused(StatusCode),
}

/// What a request asks of a provider, as far as faults go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asks {
    /// A lookup or a check: nothing to apply.
    Answer,
    Operation,
    /// `GET /operations/{key}`.
    Status,
}

/// The answers a status query may get instead of the truth under `status_error_rate`.
const STATUS_ERRORS: [StatusCode; 4] =
    [StatusCode::BAD_REQUEST, StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN, StatusCode::CONFLICT];

impl ProviderState {
    /// Counts the request, then applies the concurrency and rate limits.
    fn admit(&self, started: Instant) -> Result<Admitted<'_>, Response> {
        let c = &self.counters;
        c.requests.fetch_add(1, Relaxed);
        let now_in_flight = c.in_flight.fetch_add(1, Relaxed) + 1;
        let in_flight = Gauge(&c.in_flight);
        c.peak_in_flight.fetch_max(now_in_flight, Relaxed);

        let second = started.elapsed().as_secs();
        let verdict = {
            let mut w = lock(&self.window);
            if w.second != second {
                w.second = second;
                w.received = 0;
                w.accepted = 0;
            }
            w.received += 1;
            w.peak_received = w.peak_received.max(w.received);
            let conc = u64::from(self.settings.concurrency_limit);
            let rate = u64::from(self.settings.rate_limit);
            if self.outage().is_some_and(|o| o.kind == OutageKind::Throttle) {
                Err("throttled")
            } else if conc > 0 && c.active.load(Relaxed) >= conc {
                Err("too_many_in_flight")
            } else if rate > 0 && w.accepted >= rate {
                Err("rate_limited")
            } else if self.settings.throttle_rate > 0.0 && rand::rng().random_bool(self.settings.throttle_rate) {
                Err("throttled")
            } else {
                w.accepted += 1;
                c.active.fetch_add(1, Relaxed);
                Ok(())
            }
        };
        match verdict {
            Ok(()) => Ok(Admitted { _in_flight: in_flight, _active: Gauge(&c.active) }),
            Err(code) => {
                c.throttled.fetch_add(1, Relaxed);
                let mut r = error(StatusCode::TOO_MANY_REQUESTS, code, None);
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                Err(r)
            }
        }
    }

    async fn latency(&self) {
        let [lo, hi] = self.settings.latency_ms;
        if hi == 0 {
            return;
        }
        let ms = rand::rng().random_range(lo..=hi);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    fn draw_fault(&self, asks: Asks) -> Fault {
        let c = &self.counters;
        match self.outage().map(|o| (o.kind, o.status)) {
            Some((OutageKind::Down, _)) => {
                c.errors.fetch_add(1, Relaxed);
                return Fault::Error(StatusCode::SERVICE_UNAVAILABLE);
            }
            Some((OutageKind::Hang, _)) => {
                c.timeouts.fetch_add(1, Relaxed);
                return Fault::Timeout { apply_first: false };
            }
            Some((OutageKind::HangAfterApply, _)) => {
                c.timeouts.fetch_add(1, Relaxed);
                return Fault::Timeout { apply_first: true };
            }
            Some((OutageKind::ErrorAfterApply, _)) => {
                c.errors.fetch_add(1, Relaxed);
                return Fault::ErrorAfterApply;
            }
            Some((OutageKind::Refuse, status)) => {
                c.errors.fetch_add(1, Relaxed);
                return Fault::Refused(status);
            }
            Some((OutageKind::StatusError, status)) if asks == Asks::Status => {
                c.errors.fetch_add(1, Relaxed);
                return Fault::Refused(status);
            }
            Some((OutageKind::Throttle | OutageKind::StatusError | OutageKind::RefuseUndo, _)) | None => {}
        }
        let s = &self.settings;
        let mut rng = rand::rng();
        if asks == Asks::Status && s.status_error_rate > 0.0 && rng.random_bool(s.status_error_rate) {
            c.errors.fetch_add(1, Relaxed);
            return Fault::Refused(STATUS_ERRORS[rng.random_range(0..STATUS_ERRORS.len())]);
        }
        if s.error_rate == 0.0 && s.timeout_rate == 0.0 && s.error_after_apply_rate == 0.0 {
            return Fault::None;
        }
        let u: f64 = rng.random();
        if u < s.error_rate {
            self.counters.errors.fetch_add(1, Relaxed);
            let status = if rng.random_bool(0.5) {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            Fault::Error(status)
        } else if u < s.error_rate + s.timeout_rate {
            self.counters.timeouts.fetch_add(1, Relaxed);
            Fault::Timeout { apply_first: rng.random_bool(0.5) }
        } else if asks == Asks::Operation && u < s.error_rate + s.timeout_rate + s.error_after_apply_rate {
            self.counters.errors.fetch_add(1, Relaxed);
            Fault::ErrorAfterApply
        } else {
            Fault::None
        }
    }

    /// Holds the request for `hang_ms`, then answers 504.
    async fn hang(&self) -> Response {
        tokio::time::sleep(Duration::from_millis(self.settings.hang_ms)).await;
        error(StatusCode::GATEWAY_TIMEOUT, "timeout", None)
    }
}

fn transient(status: StatusCode) -> Response {
    let code = if status == StatusCode::SERVICE_UNAVAILABLE { "unavailable" } else { "internal_error" };
    error(status, code, None)
}

fn error(status: StatusCode, code: &str, reason: Option<String>) -> Response {
    (status, axum::Json(ProviderError { error: code.to_string(), reason })).into_response()
}

fn ok<T: Serialize>(body: T) -> Response {
    (StatusCode::OK, axum::Json(body)).into_response()
}

// ---- handlers --------------------------------------------------------------

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", None)
}

async fn method_not_allowed() -> Response {
    error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None)
}

async fn root(State(sim): State<Arc<Sim>>) -> Response {
    ok(json!({
        "service": "ticketpay-providers",
        "scenario": sim.scenario.name,
        "description": sim.scenario.description,
    }))
}

async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    let mut out = serde_json::Map::new();
    for ps in &sim.providers {
        let c = &ps.counters;
        let peak_rps = lock(&ps.window).peak_received;
        let mut o = json!({
            "requests": c.requests.load(Relaxed),
            "in_flight": c.in_flight.load(Relaxed),
            "peak_in_flight": c.peak_in_flight.load(Relaxed),
            "peak_rps": peak_rps,
            "limit_rps": ps.settings.rate_limit,
            "limit_in_flight": ps.settings.concurrency_limit,
            "throttled": c.throttled.load(Relaxed),
            "errors": c.errors.load(Relaxed),
            "timeouts": c.timeouts.load(Relaxed),
        });
        if operations(ps.name).is_some() {
            o["applied"] = json!(c.applied.load(Relaxed));
            o["declined"] = json!(c.declined.load(Relaxed));
            o["duplicates"] = json!(c.duplicates.load(Relaxed));
        }
        if ps.name.takes_money() {
            o["charges"] = json!(c.charges.load(Relaxed));
            o["duplicate_charges"] = json!(c.duplicate_charges.load(Relaxed));
        }
        out.insert(ps.name.as_str().to_string(), o);
    }
    ok(Value::Object(out))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OutageRequest {
    provider: ProviderName,
    kind: OutageKind,
    seconds: u64,
    /// The answer of `status_error` and `refuse`.
    status: Option<u16>,
}

/// `POST /admin/outages {"provider", "kind", "seconds", "status"?}`: the
/// provider misbehaves from now for that long (0 ends an outage). Kinds:
/// `down`, `hang`, `throttle`, `hang_after_apply`, `error_after_apply`,
/// `status_error` and `refuse` (these two answer `status`, a 4xx), `refuse_undo`.
async fn start_outage(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    let req: OutageRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let default = if req.kind == OutageKind::StatusError { StatusCode::CONFLICT } else { StatusCode::FORBIDDEN };
    let status = match req.status.map(StatusCode::from_u16) {
        None => default,
        Some(Ok(s)) if s.is_client_error() && s != StatusCode::TOO_MANY_REQUESTS => s,
        Some(_) => {
            let reason = format!("status {} is not a 4xx other than 429", req.status.unwrap_or_default());
            return error(StatusCode::BAD_REQUEST, "bad_request", Some(reason));
        }
    };
    let until = Instant::now() + Duration::from_secs(req.seconds);
    *lock(&sim.state(req.provider).outage) = Some(Outage { kind: req.kind, status, until });
    ok(json!({ "provider": req.provider, "kind": req.kind, "seconds": req.seconds, "status": status.as_u16() }))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ForgetRequest {
    provider: ProviderName,
    idempotency_key: String,
}

/// `POST /admin/forget {"provider", "idempotency_key"}`: the provider loses its
/// record of an applied operation (status queries answer 404 from now on),
/// as a provider's own bookkeeping may; `GET /operations` still lists it.
async fn forget(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    let req: ForgetRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match lock(&sim.state(req.provider).applied).remove(&req.idempotency_key) {
        Some(_) => ok(json!({ "provider": req.provider, "idempotency_key": req.idempotency_key, "forgotten": true })),
        None => error(StatusCode::NOT_FOUND, "not_found", Some(format!("no operation with key {}", req.idempotency_key))),
    }
}

fn refused(status: StatusCode) -> Response {
    error(status, status.canonical_reason().unwrap_or("refused").to_ascii_lowercase().replace(' ', "_").as_str(), None)
}

/// The currency asked for: the `currency` query parameter, default EUR.
fn currency(query: Option<&str>) -> Result<String, Response> {
    let asked = query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "currency")
        .map(|(_, v)| v);
    match asked {
        None | Some("") => Ok("EUR".to_string()),
        Some(v) if v.len() == 3 && v.bytes().all(|b| b.is_ascii_alphabetic()) => {
            Ok(v.to_ascii_uppercase())
        }
        Some(v) => Err(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            Some(format!("currency `{v}` is not an ISO 4217 code")),
        )),
    }
}

async fn lookup(
    State(sim): State<Arc<Sim>>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Response {
    let Ok(Path((authority, ticket_id))) = path else {
        return error(StatusCode::BAD_REQUEST, "bad_request", Some("malformed path".into()));
    };
    let ps = sim.state(ProviderName::Authority);
    let _admitted = match ps.admit(sim.started) {
        Ok(a) => a,
        Err(r) => return r,
    };
    ps.latency().await;
    let currency = match currency(query.as_deref()) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match ps.draw_fault(Asks::Answer) {
        Fault::None => {}
        Fault::Error(s) => return transient(s),
        Fault::ErrorAfterApply => return transient(StatusCode::INTERNAL_SERVER_ERROR),
        Fault::Refused(s) => return refused(s),
        Fault::Timeout { .. } => return ps.hang().await,
    }
    let outcome = outcome_for(&sim.scenario, &ticket_id);
    if outcome.unknown {
        return error(StatusCode::NOT_FOUND, "unknown_ticket", None);
    }
    let status = if outcome.nothing_due { DueStatus::NothingDue } else { DueStatus::Due };
    ok(LookupResponse {
        ticket_id,
        authority,
        status,
        amount_due: WireMoney { minor: outcome.amount_minor, currency },
    })
}

/// The keyed operations of a provider: (forward, compensation), as the pipeline names them.
fn operations(p: ProviderName) -> Option<(&'static str, Option<&'static str>)> {
    if p == ProviderName::Notifier {
        return Some((Operation::Notify.name(), None));
    }
    PayStep::ALL.into_iter().find(|s| s.provider() == p).map(|s| (s.operation(), Some(s.compensation())))
}

fn reject_reason(p: ProviderName) -> &'static str {
    match p {
        ProviderName::Registry => "vehicle is not registered to this client",
        ProviderName::Fraud => "fraud score above threshold",
        ProviderName::Sanctions => "client matches a sanctions list",
        _ => "rejected",
    }
}

fn decline_reason(p: ProviderName) -> String {
    match p {
        ProviderName::Gateway => format!("card {CARD_ON_FILE} declined by issuer"),
        ProviderName::Settlement => "authority refused the settlement".into(),
        ProviderName::Ledger => "ledger account is closed".into(),
        ProviderName::Receipt => "fiscal service refused the receipt".into(),
        _ => "declined".into(),
    }
}

/// The card the simulated gateway charges (a well-known test number). Like a
/// careless real gateway, it names it in full in its answers and refusals,
/// with the card's token: what ticketpay records must not.
pub const CARD_ON_FILE: &str = "4111 1111 1111 1111";
pub const CARD_TOKEN: &str = "tok_card_8c41f0e2b7d9a356";
/// The card network's reference for a charge: its digits pass the Luhn check
/// like a card number's, but it is an identifier, which ticketpay keeps intact.
pub const NETWORK_REFERENCE: &str = "9900001234567899";

/// An operation's answer; the gateway's also carries the card it charged.
fn operation_answer(p: ProviderName, response: &OperationResponse) -> Response {
    let mut body = serde_json::to_value(response).unwrap_or_default();
    if p == ProviderName::Gateway {
        body["payment_method"] = json!({ "type": "card", "card_number": CARD_ON_FILE.replace(' ', ""), "token": CARD_TOKEN });
        body["network_reference"] = json!(NETWORK_REFERENCE);
        body["statement"] = json!(format!("{} of {} {} on card {}", response.operation, response.amount.minor, response.amount.currency, CARD_ON_FILE.replace(' ', "-")));
    }
    ok(body)
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| {
        error(StatusCode::BAD_REQUEST, "bad_request", Some(format!("malformed body: {e}")))
    })
}

async fn operate(
    State(sim): State<Arc<Sim>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(Path((provider, operation))) = path else {
        return error(StatusCode::BAD_REQUEST, "bad_request", Some("malformed path".into()));
    };
    let Ok(p) = provider.parse::<ProviderName>() else {
        return error(StatusCode::NOT_FOUND, "unknown_provider", Some(provider));
    };
    if ProviderName::VALIDATORS.contains(&p) && operation == "checks" {
        return check(&sim, p, &body).await;
    }
    let Some((forward, compensation)) = operations(p) else {
        return error(StatusCode::NOT_FOUND, "unknown_operation", Some(format!("{p}/{operation}")));
    };
    let is_forward = operation == forward;
    if !is_forward && compensation != Some(operation.as_str()) {
        return error(StatusCode::NOT_FOUND, "unknown_operation", Some(format!("{p}/{operation}")));
    }

    let ps = sim.state(p);
    let _admitted = match ps.admit(sim.started) {
        Ok(a) => a,
        Err(r) => return r,
    };
    ps.latency().await;

    let key = match headers.get(IDEMPOTENCY_KEY).map(|v| v.to_str()) {
        Some(Ok(k)) if !k.is_empty() && k.len() <= 255 => k.to_string(),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_idempotency_key",
                Some("Idempotency-Key must be 1-255 visible ASCII characters".into()),
            );
        }
        None => return error(StatusCode::BAD_REQUEST, "missing_idempotency_key", None),
    };
    let req: OperationRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };

    if !is_forward && ps.outage().is_some_and(|o| o.kind == OutageKind::RefuseUndo) {
        ps.counters.declined.fetch_add(1, Relaxed);
        return error(StatusCode::UNPROCESSABLE_ENTITY, "declined", Some(format!("{p} refuses to {operation} this operation")));
    }
    let declined = is_forward && outcome_for(&sim.scenario, &req.ticket_id).fails_at == Some(p);
    match ps.draw_fault(Asks::Operation) {
        Fault::None => {}
        Fault::Error(s) => return transient(s),
        Fault::Refused(s) => return refused(s),
        Fault::Timeout { apply_first } => {
            if apply_first && !declined {
                let _ = apply(&sim, ps, &operation, is_forward, &key, &req);
            }
            return ps.hang().await;
        }
        Fault::ErrorAfterApply => {
            if !declined {
                let _ = apply(&sim, ps, &operation, is_forward, &key, &req);
            }
            return transient(StatusCode::INTERNAL_SERVER_ERROR);
        }
    }
    if declined {
        ps.counters.declined.fetch_add(1, Relaxed);
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "declined",
            Some(decline_reason(p)),
        );
    }
    apply(&sim, ps, &operation, is_forward, &key, &req)
}

/// Applies an operation under its idempotency key, or answers with what was
/// stored for that key (counting the repeat).
fn apply(
    sim: &Sim,
    ps: &ProviderState,
    operation: &str,
    is_forward: bool,
    key: &str,
    req: &OperationRequest,
) -> Response {
    let c = &ps.counters;
    let charge = is_forward && ps.name.takes_money();
    let mut applied = lock(&ps.applied);
    match applied.entry(key.to_string()) {
        Entry::Occupied(e) => {
            c.duplicates.fetch_add(1, Relaxed);
            let a = e.get();
            if a.operation != operation || a.ticket_id != req.ticket_id || a.amount != req.amount {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    Some(format!(
                        "key was applied to {} of ticket {} for {} {}",
                        a.operation, a.ticket_id, a.amount.minor, a.amount.currency
                    )),
                );
            }
            if charge {
                c.duplicate_charges.fetch_add(1, Relaxed);
            }
            operation_answer(ps.name, &a.response)
        }
        Entry::Vacant(e) => {
            let seq = c.sequence.fetch_add(1, Relaxed) + 1;
            let response = OperationResponse {
                id: format!("{}-{:08x}-{:08}", ps.name, sim.run_tag, seq),
                operation: operation.to_string(),
                idempotency_key: key.to_string(),
                amount: req.amount.clone(),
            };
            c.applied.fetch_add(1, Relaxed);
            if charge {
                c.charges.fetch_add(1, Relaxed);
            }
            lock(&sim.applied).push(AppliedOperation {
                provider: ps.name,
                operation: operation.to_string(),
                idempotency_key: key.to_string(),
                ticket_id: req.ticket_id.clone(),
                batch_id: req.batch_id.clone(),
                amount: req.amount.clone(),
            });
            let body = operation_answer(ps.name, &response);
            e.insert(Applied {
                operation: operation.to_string(),
                ticket_id: req.ticket_id.clone(),
                amount: req.amount.clone(),
                response,
            });
            body
        }
    }
}

async fn check(sim: &Sim, p: ProviderName, body: &[u8]) -> Response {
    let ps = sim.state(p);
    let _admitted = match ps.admit(sim.started) {
        Ok(a) => a,
        Err(r) => return r,
    };
    ps.latency().await;
    let req: CheckRequest = match parse_json(body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match ps.draw_fault(Asks::Answer) {
        Fault::None => {}
        Fault::Error(s) => return transient(s),
        Fault::ErrorAfterApply => return transient(StatusCode::INTERNAL_SERVER_ERROR),
        Fault::Refused(s) => return refused(s),
        Fault::Timeout { .. } => return ps.hang().await,
    }
    if outcome_for(&sim.scenario, &req.ticket_id).rejected_by == Some(p) {
        ok(CheckResponse { decision: Decision::Reject, reason: Some(reject_reason(p).into()) })
    } else {
        ok(CheckResponse { decision: Decision::Approve, reason: None })
    }
}

async fn status(
    State(sim): State<Arc<Sim>>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let Ok(Path((provider, key))) = path else {
        return error(StatusCode::BAD_REQUEST, "bad_request", Some("malformed path".into()));
    };
    let p = match provider.parse::<ProviderName>() {
        Ok(p) if operations(p).is_some() => p,
        _ => return error(StatusCode::NOT_FOUND, "unknown_provider", Some(provider)),
    };
    let ps = sim.state(p);
    let _admitted = match ps.admit(sim.started) {
        Ok(a) => a,
        Err(r) => return r,
    };
    ps.latency().await;
    match ps.draw_fault(Asks::Status) {
        Fault::None => {}
        Fault::Error(s) => return transient(s),
        Fault::ErrorAfterApply => return transient(StatusCode::INTERNAL_SERVER_ERROR),
        Fault::Refused(s) => return refused(s),
        Fault::Timeout { .. } => return ps.hang().await,
    }
    let found = lock(&ps.applied).get(&key).map(|a| a.response.clone());
    match found {
        Some(r) => operation_answer(p, &r),
        None => error(StatusCode::NOT_FOUND, "not_found", Some(format!("no operation with key {key}"))),
    }
}
