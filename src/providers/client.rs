//! The one HTTP client for every provider: limited, timed, and recorded.
//! Every request it makes comes back with an [`Exchange`] for the audit trail,
//! whatever happened to it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::capacity::Capacity;
use super::limits::{ClientConfig, Limiter, slices};
use super::redact::Redactor;
use super::wire::{self, CheckRequest, CheckResponse, DueStatus, LookupResponse, OperationRequest, OperationResponse};
use super::ProviderName;
use crate::domain::event::{Exchange, HttpRequestRecord, HttpResponseRecord};
use crate::domain::{Currency, Due, Stage, Ticket};
use tracing::Instrument;
use tracing::field::Empty;

/// Who is calling: every provider call's span carries it.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub batch_id: &'a str,
    pub ticket_id: &'a str,
    pub client_id: &'a str,
    pub stage: Stage,
    pub attempt: u32,
}

impl<'a> Caller<'a> {
    pub fn of(ticket: &'a Ticket, stage: Stage) -> Caller<'a> {
        Caller {
            batch_id: ticket.batch_id.as_str(),
            ticket_id: ticket.ticket_id.as_str(),
            client_id: ticket.client_id.as_str(),
            stage,
            attempt: ticket.attempt,
        }
    }
}

/// The longest a call waits for its turn under the provider's limits before
/// giving up with a transient error (so every call ends in bounded time).
pub const MAX_SLOT_WAIT: Duration = Duration::from_secs(10);

/// Why a provider call did not give an answer we can use.
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    /// The provider said no, for good: do not retry.
    Permanent { status: u16, error: String },
    /// The provider asked us to slow down; nothing was applied.
    Throttled { retry_after: Duration },
    /// Try again later. For an operation the outcome is unknown: it may have been applied.
    Transient { error: String },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Permanent { status, error } => write!(f, "refused ({status}): {error}"),
            Self::Throttled { retry_after } => write!(f, "throttled (retry after {}s)", retry_after.as_secs()),
            Self::Transient { error } => f.write_str(error),
        }
    }
}

impl CallError {
    pub fn retry_after(&self) -> Duration {
        match self {
            Self::Throttled { retry_after } => *retry_after,
            _ => Duration::ZERO,
        }
    }

    /// The same error with its text redacted: it may echo what a provider said.
    fn redacted(self, redactor: &Redactor) -> CallError {
        match self {
            Self::Permanent { status, error } => Self::Permanent { status, error: redactor.text(&error).into_owned() },
            Self::Transient { error } => Self::Transient { error: redactor.text(&error).into_owned() },
            throttled => throttled,
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            Self::Permanent { .. } => "refused",
            Self::Throttled { .. } => "throttled",
            Self::Transient { error } if error.starts_with("timed out") => "timeout",
            Self::Transient { .. } => "transient",
        }
    }
}

/// A provider call's result and the record of what was said.
pub struct Call<T> {
    pub result: Result<T, CallError>,
    pub exchange: Exchange,
}

struct Endpoint {
    base: String,
    api_key: Option<String>,
    limiter: Arc<Limiter>,
}

pub struct ProviderClient {
    http: reqwest::Client,
    endpoints: HashMap<ProviderName, Endpoint>,
    timeout: Duration,
    redactor: Redactor,
    journal: Option<Arc<dyn RequestJournal>>,
    capacity: Option<Arc<Capacity>>,
    /// Idempotency keys whose last request from this process may still reach
    /// its provider (a caller that timed out leaves it running, see [`exchange`]).
    unsettled: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// A key in [`ProviderClient::unsettled`] for as long as its request runs.
struct Unsettled {
    keys: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    key: String,
}

impl Unsettled {
    /// `None` while an earlier request with this key may still reach the provider.
    fn take(keys: &Arc<std::sync::Mutex<std::collections::HashSet<String>>>, key: &str) -> Option<Unsettled> {
        let fresh = keys.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_owned());
        fresh.then(|| Unsettled { keys: keys.clone(), key: key.to_owned() })
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

/// Told of each request just before it goes out, as it will be recorded: a
/// process killed before the answer is recorded still leaves the request in
/// the audit trail.
pub trait RequestJournal: Send + Sync {
    fn sending(&self, caller: &Caller<'_>, exchange: Arc<Exchange>);
}

/// Where each provider is and how to authenticate to it.
pub struct ProviderEndpoints {
    pub base_urls: HashMap<ProviderName, String>,
    pub api_keys: HashMap<ProviderName, String>,
}

impl ProviderClient {
    pub fn new(endpoints: ProviderEndpoints, config: &ClientConfig, redactor: Redactor) -> ProviderClient {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .expect("the HTTP client builds with static settings");
        let endpoints = ProviderName::ALL
            .into_iter()
            .map(|name| {
                let limits = config.providers.get(&name).cloned().unwrap_or(super::limits::ProviderLimits {
                    rate_limit: 0.0,
                    concurrency_limit: 0,
                });
                let endpoint = Endpoint {
                    base: endpoints.base_urls.get(&name).cloned().unwrap_or_default().trim_end_matches('/').to_owned(),
                    api_key: endpoints.api_keys.get(&name).cloned(),
                    limiter: Arc::new(Limiter::whole(&limits, config.rate_headroom)),
                };
                (name, endpoint)
            })
            .collect();
        ProviderClient { http, endpoints, timeout: config.timeout, redactor, journal: None, capacity: None, unsettled: Default::default() }
    }

    pub fn with_journal(mut self, journal: Arc<dyn RequestJournal>) -> ProviderClient {
        self.journal = Some(journal);
        self
    }

    /// Spends only the slices of each provider's capacity that `instance`
    /// holds a lease on, shared through `leases` with every other instance.
    pub fn with_shared_capacity(mut self, config: &ClientConfig, leases: Arc<dyn crate::leases::Leases>, instance: String) -> ProviderClient {
        let mut shared = Vec::new();
        for (name, endpoint) in &mut self.endpoints {
            let Some(limits) = config.providers.get(name) else { continue };
            let cut = slices(limits);
            // A provider without limits keeps its open limiter: nothing to share.
            if !cut.is_empty() {
                endpoint.limiter = Arc::new(Limiter::empty(limits, config.rate_headroom));
            }
            shared.push((*name, cut, endpoint.limiter.clone()));
        }
        let call_bound = self.timeout;
        self.capacity = Some(Capacity::start(leases, instance, call_bound, shared));
        self
    }

    /// What this instance holds of each provider's capacity, if it is shared.
    pub fn capacity(&self) -> Option<&Arc<Capacity>> {
        self.capacity.as_ref()
    }

    async fn typed<T: DeserializeOwned>(&self, sending: Sending, caller: &Caller<'_>) -> Call<T> {
        let call = self.raw(sending, caller).await;
        Call { result: call.result.and_then(|(_, body)| self.decode(body)), exchange: call.exchange }
    }

    /// Decoding errors quote the value they choke on: redacted like the rest.
    fn decode<T: DeserializeOwned>(&self, body: Value) -> Result<T, CallError> {
        serde_json::from_value(body)
            .map_err(|e| CallError::Transient { error: format!("unreadable answer: {e}") }.redacted(&self.redactor))
    }

    /// `sending`'s `url` is the path under the provider's base.
    async fn raw(&self, mut sending: Sending, caller: &Caller<'_>) -> Call<(u16, Value)> {
        let endpoint = &self.endpoints[&sending.provider];
        sending.url.insert_str(0, &endpoint.base);
        sending.attempt = caller.attempt;
        let (provider, operation, key) = (sending.provider, sending.operation.clone(), sending.key.clone());
        let (operation, key) = (operation.as_str(), key.as_deref());
        let shown_url = self.redactor.url(&sending.url);
        let span = tracing::info_span!(
            "provider call",
            otel.name = %format!("{provider} {operation}"),
            otel.kind = "client",
            otel.status_code = Empty,
            "peer.service" = %provider,
            operation,
            "http.request.method" = %sending.method,
            "url.full" = %shown_url,
            "http.response.status_code" = Empty,
            batch_id = caller.batch_id,
            ticket_id = caller.ticket_id,
            client_id = caller.client_id,
            stage = %caller.stage,
            attempt = caller.attempt,
            outcome = Empty,
            idempotency_key = key.unwrap_or_default(),
        );
        let mut call = self.send(endpoint, sending, caller).instrument(span.clone()).await;
        call.exchange.trace_id = crate::telemetry::trace_id(&span);
        let e = &call.exchange;
        let status = e.response.as_ref().map(|r| r.status);
        if let Some(status) = status {
            span.record("http.response.status_code", status);
        }
        span.record("outcome", e.outcome.as_str());
        span.record("otel.status_code", if call.result.is_ok() { "ok" } else { "error" });
        let request = serde_json::to_string(&e.request).unwrap_or_default();
        let response = e.response.as_ref().map(|r| serde_json::to_string(r).unwrap_or_default()).unwrap_or_default();
        tracing::info!(
            target: "ticketpay::audit",
            parent: &span,
            batch_id = caller.batch_id,
            ticket_id = caller.ticket_id,
            client_id = caller.client_id,
            stage = %caller.stage,
            provider = %provider,
            operation,
            attempt = caller.attempt,
            idempotency_key = key.unwrap_or_default(),
            status = status.map(|s| s.to_string()).unwrap_or_default(),
            outcome = %e.outcome,
            latency_ms = e.latency_ms,
            request,
            response,
            "provider exchange"
        );
        call
    }

    async fn send(&self, endpoint: &Endpoint, mut sending: Sending, caller: &Caller<'_>) -> Call<(u16, Value)> {
        let provider = sending.provider;
        sending.headers.push((wire::REQUEST_ID.into(), uuid::Uuid::new_v4().to_string()));
        if let Some(key) = &sending.key {
            sending.headers.push((wire::IDEMPOTENCY_KEY.into(), key.clone()));
        }
        if let Some(api_key) = &endpoint.api_key {
            sending.headers.push(("Authorization".into(), format!("Bearer {api_key}")));
        }
        if sending.body.is_some() {
            sending.headers.push(("Content-Type".into(), "application/json".into()));
        }
        let key = sending.key.clone();
        let Ok(permit) = tokio::time::timeout(MAX_SLOT_WAIT, endpoint.limiter.acquire()).await else {
            let error = format!("no free slot at {provider} within {}s; not sent", MAX_SLOT_WAIT.as_secs());
            let result = Err(CallError::Transient { error });
            return Call { exchange: self.record(sending, None, result.as_ref().map(drop), 0), result };
        };
        // Neither sent again nor asked about while an earlier request under the same key
        // may still arrive: "never applied" would be no answer then, and a resend a second charge.
        let unsettled = match key.as_deref().map(|k| Unsettled::take(&self.unsettled, k)) {
            Some(None) => {
                let error = format!("an earlier request with this key may still reach {provider}; not sent");
                let result = Err(CallError::Transient { error });
                return Call { exchange: self.record(sending, None, result.as_ref().map(drop), 0), result };
            }
            Some(Some(u)) => Some(u),
            None => None,
        };
        let mut request = self.http.request(sending.method.clone(), &sending.url);
        for (k, v) in &sending.headers {
            request = request.header(k, v);
        }
        if let Some(b) = &sending.body {
            request = request.body(b.to_string());
        }
        let url = sending.url.clone();
        let unanswered = CallError::Transient { error: "sent; no answer recorded".into() };
        // The request is redacted once: as noted before it goes, and as recorded with its answer.
        let sent = Arc::new(self.record(sending, None, Err(&unanswered), 0));
        if let Some(journal) = &self.journal {
            journal.sending(caller, sent.clone());
        }
        let started = Instant::now();
        let (result, response) = match tokio::time::timeout(self.timeout, exchange(request, (permit, unsettled), self.timeout.max(ABANDONED_HOLD))).await {
            Ok(Ok(raw)) => {
                let (result, response) = self.answer(endpoint, provider, raw);
                (result.map_err(|e| e.redacted(&self.redactor)), response)
            }
            Ok(Err(e)) => {
                // The error quotes our URL, whose ticket id may look like a card number: kept as the URL rule says.
                let error = self.redactor.text_quoting_url(&error_chain(&e), &url);
                (Err(CallError::Transient { error: format!("connection failed: {error}") }), None)
            }
            Err(_) => {
                (Err(CallError::Transient { error: format!("timed out after {} ms", self.timeout.as_millis()) }), None)
            }
        };
        let latency_ms = started.elapsed().as_millis() as u64;
        let sent = Arc::try_unwrap(sent).unwrap_or_else(|shared| (*shared).clone());
        let (outcome, error) = outcome_of(result.as_ref().map(drop));
        Call { exchange: Exchange { response, outcome, error, latency_ms, ..sent }, result }
    }

    /// Reads an answer: what it means for the call, and the record of it.
    fn answer(&self, endpoint: &Endpoint, provider: ProviderName, raw: RawAnswer) -> (Result<(u16, Value), CallError>, Option<HttpResponseRecord>) {
        let status = raw.status;
        let headers = self.redactor.headers(raw.headers.iter().filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))));
        let retry_after = raw
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body: Value = serde_json::from_str(&raw.text).unwrap_or(Value::String(raw.text));
        let result = classify(status, retry_after, &body);
        let pause = match &result {
            Err(CallError::Throttled { retry_after }) => Some(*retry_after),
            Err(_) if status == StatusCode::SERVICE_UNAVAILABLE => retry_after,
            _ => None,
        };
        if let Some(for_) = pause {
            endpoint.limiter.pause(for_);
            if let Some(capacity) = &self.capacity {
                capacity.pause(provider, for_);
            }
        }
        let record = HttpResponseRecord { status: status.as_u16(), headers, body: self.redactor.body(body.clone()) };
        (result.map(|()| (status.as_u16(), body)), Some(record))
    }

    fn record(&self, s: Sending, response: Option<HttpResponseRecord>, result: Result<(), &CallError>, latency_ms: u64) -> Exchange {
        let (outcome, error) = outcome_of(result);
        Exchange {
            provider: s.provider,
            operation: s.operation,
            attempt: s.attempt,
            idempotency_key: s.key,
            request: HttpRequestRecord {
                method: s.method.to_string(),
                url: self.redactor.url(&s.url),
                headers: self.redactor.headers(s.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
                body: s.body.map(|b| self.redactor.body(b)).unwrap_or(Value::Null),
            },
            response,
            outcome,
            error,
            latency_ms,
            trace_id: None,
        }
    }
}

/// A call's outcome as its exchange records it, and its error if it failed.
fn outcome_of(result: Result<(), &CallError>) -> (String, Option<String>) {
    (result.map_or_else(|e| e.outcome().to_owned(), |()| "ok".to_owned()), result.err().map(ToString::to_string))
}

/// The calls the stages make to providers: [`ProviderClient`] wherever the
/// pipeline runs; the stages' own tests answer them from a script.
#[async_trait::async_trait]
pub trait Providers: Send + Sync {
    /// What the authority says the ticket owes, read for a batch paying in `currency`.
    async fn lookup(&self, authority: &str, currency: Currency, caller: &Caller<'_>) -> Call<Due>;
    async fn check(&self, provider: ProviderName, request: &CheckRequest, caller: &Caller<'_>) -> Call<CheckResponse>;
    /// Applies an operation once, under its idempotency key.
    async fn operate(&self, provider: ProviderName, operation: &str, key: &str, request: &OperationRequest, caller: &Caller<'_>) -> Call<OperationResponse>;
    /// Whether an operation with this key was applied: `Ok(None)` if the provider says it never was.
    async fn operation_status(&self, provider: ProviderName, key: &str, caller: &Caller<'_>) -> Call<Option<OperationResponse>>;
}

#[async_trait::async_trait]
impl Providers for ProviderClient {
    async fn lookup(&self, authority: &str, currency: Currency, caller: &Caller<'_>) -> Call<Due> {
        let path = format!("/{}/tickets/{}?currency={}", segment(authority), segment(caller.ticket_id), segment(currency.code()));
        let call: Call<LookupResponse> = self.typed(Sending::to(ProviderName::Authority, "lookup", Method::GET, path), caller).await;
        let result = call.result.map(|a| Due::read(a.status == DueStatus::NothingDue, a.amount_due.minor, &a.amount_due.currency, currency));
        Call { result, exchange: call.exchange }
    }

    async fn check(&self, provider: ProviderName, request: &CheckRequest, caller: &Caller<'_>) -> Call<CheckResponse> {
        let sending = Sending::to(provider, "check", Method::POST, "/checks".into()).with_body(serde_json::to_value(request).ok());
        let mut call: Call<CheckResponse> = self.typed(sending, caller).await;
        // A rejection's reason is kept on the ticket: it is free text from the provider.
        if let Ok(answer) = &mut call.result {
            answer.reason = answer.reason.take().map(|r| self.redactor.text(&r).into_owned());
        }
        call
    }

    /// Applies an operation once: the idempotency key lets the provider (and us) recognise a repeat.
    /// Only the provider's documented decline (422 with its error body) is permanent: any
    /// other failure leaves the outcome unknown (`Transient`), to be asked about before
    /// anything is sent again.
    async fn operate(
        &self,
        provider: ProviderName,
        operation: &str,
        key: &str,
        request: &OperationRequest,
        caller: &Caller<'_>,
    ) -> Call<OperationResponse> {
        let sending = Sending::to(provider, operation, Method::POST, format!("/{}", segment(operation))).keyed(key).with_body(serde_json::to_value(request).ok());
        let call = self.typed(sending, caller).await;
        Call { result: call.result.map_err(keep_unknown_unless_declined), exchange: call.exchange }
    }

    /// Asks whether an operation with this key was applied: `Ok(None)` if the provider
    /// says it never applied it (404). Any other failure is no answer: the outcome stays unknown.
    async fn operation_status(&self, provider: ProviderName, key: &str, caller: &Caller<'_>) -> Call<Option<OperationResponse>> {
        let path = format!("/operations/{}", segment(key));
        let call = self.raw(Sending::to(provider, "status", Method::GET, path).keyed(key), caller).await;
        let result = match call.result {
            Ok((_, body)) => self.decode(body).map(Some),
            Err(CallError::Permanent { status: 404, .. }) => Ok(None),
            Err(CallError::Permanent { status, error }) => {
                Err(CallError::Transient { error: format!("status query refused ({status}): {error}; the outcome is still unknown") })
            }
            Err(e) => Err(e),
        };
        Call { result, exchange: call.exchange }
    }
}

/// The longest a request we stopped waiting for keeps its place in flight.
/// The provider is still working on it, and its concurrency limit counts it,
/// until it answers; one that never does is let go after this (or after the
/// client's own timeout, if longer).
pub const ABANDONED_HOLD: Duration = Duration::from_secs(60);

/// An answer as it came off the wire.
struct RawAnswer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    text: String,
}

/// Sends a request and reads its answer on a task of its own, which holds the
/// concurrency permit and the key until the provider has answered (or
/// [`ABANDONED_HOLD`] `hold` passed), even when the caller stops waiting sooner.
async fn exchange(
    request: reqwest::RequestBuilder,
    permit: (Option<super::limits::InFlight>, Option<Unsettled>),
    hold: Duration,
) -> Result<RawAnswer, reqwest::Error> {
    let exchange = async move {
        let r = request.send().await?;
        let (status, headers) = (r.status(), r.headers().clone());
        let text = r.text().await.unwrap_or_else(|e| format!("<body unreadable: {e}>"));
        Ok(RawAnswer { status, headers, text })
    };
    let held = tokio::spawn(async move {
        let answer = tokio::time::timeout(hold, exchange).await;
        drop(permit);
        answer
    });
    match held.await {
        Ok(Ok(answer)) => answer,
        // Neither comes before the caller's own timeout, which is not longer than `hold`.
        Ok(Err(_)) | Err(_) => std::future::pending().await,
    }
}

/// A request about to go out, as it will be recorded.
#[derive(Clone)]
struct Sending {
    provider: ProviderName,
    operation: String,
    attempt: u32,
    key: Option<String>,
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Option<Value>,
}

impl Sending {
    /// A request to `path` under the provider's base, as `operation`.
    fn to(provider: ProviderName, operation: &str, method: Method, path: String) -> Sending {
        Sending { provider, operation: operation.to_owned(), attempt: 0, key: None, method, url: path, headers: Vec::new(), body: None }
    }

    /// Sent under an idempotency key.
    fn keyed(mut self, key: &str) -> Sending {
        self.key = Some(key.to_owned());
        self
    }

    fn with_body(mut self, body: Option<Value>) -> Sending {
        self.body = body;
        self
    }
}

fn classify(status: StatusCode, retry_after: Option<Duration>, body: &Value) -> Result<(), CallError> {
    if status.is_success() {
        return Ok(());
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(CallError::Throttled { retry_after: retry_after.unwrap_or(Duration::from_secs(1)) });
    }
    let error = body
        .get("reason")
        .or_else(|| body.get("error"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| status.to_string());
    let documented = body.get("error").is_some_and(Value::is_string);
    if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT || (status == StatusCode::UNPROCESSABLE_ENTITY && !documented) {
        return Err(CallError::Transient { error: format!("{} {error}", status.as_u16()) });
    }
    let code = body.get("error").and_then(Value::as_str).unwrap_or(&error).to_owned();
    let error = if code != error { format!("{code}: {error}") } else { code };
    Err(CallError::Permanent { status: status.as_u16(), error })
}

/// A refusal of an operation is a decline only when it is the provider's
/// documented one: 422 with its error body. Anything else (400, 401/403 for our
/// credentials, 409 in progress, a proxy's page) says nothing of whether the
/// operation was applied.
fn keep_unknown_unless_declined(e: CallError) -> CallError {
    match e {
        CallError::Permanent { status, error } if status != 422 => {
            CallError::Transient { error: format!("refused ({status}): {error}; the outcome is unknown") }
        }
        other => other,
    }
}

/// One path segment as sent: every byte that could end or split the segment
/// (`/`, `\`, `?`, `#`, `%`, spaces, controls) is percent-encoded. A segment
/// that is only `.` or `..` is normalised away whether encoded or not, which is
/// why ticket ids never are one (see `TicketId::parse`).
fn segment(s: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'~').remove(b':').remove(b'.');
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
