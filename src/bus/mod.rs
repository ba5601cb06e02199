//! The bus seam: sending the next stage's message.
//!
//! One sender speaks the Service Bus REST API: to Azure Service Bus in the
//! cloud with an Entra token, and to the same endpoints served by
//! `ticketpay local` on this machine with the bearer token that host made.
//! Receiving and settling are the host's job, never the handler's.

pub mod auth;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value};

/// A message for a queue, with the broker properties the pipeline relies on.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    pub queue: String,
    /// Deterministic, so the broker's duplicate detection drops a re-send.
    pub message_id: String,
    pub session_id: Option<String>,
    pub correlation_id: Option<String>,
    pub scheduled_at: Option<DateTime<Utc>>,
    /// Application properties (trace context travels here).
    pub properties: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    #[error("service bus unavailable: {0}")]
    Transient(String),
    #[error("service bus refused the message: {0}")]
    Permanent(String),
}

impl BusError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }
}

/// How many messages go in one batch request (the broker caps a batch's size).
const BATCH_CHUNK: usize = 200;
const ATTEMPTS: u32 = 5;

#[derive(Clone)]
pub struct BusSender {
    http: reqwest::Client,
    base: String,
    credential: Credential,
    outbox: Arc<Outbox>,
}

/// Messages sent one by one from concurrent tasks (the messages of a batch
/// invocation, concurrent invocations) leave together: while the sends in
/// flight are at their limit, new ones wait here and then go as one batch
/// request per queue and session.
struct Outbox {
    waiting: std::sync::Mutex<Vec<Waiting>>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

/// A message to send, and where its outcome goes.
type Waiting = (OutgoingMessage, tokio::sync::oneshot::Sender<Result<(), BusError>>);

/// Requests in flight at once before new messages wait to be grouped.
const SENDS_IN_FLIGHT: usize = 4;

impl Default for Outbox {
    fn default() -> Self {
        Outbox { waiting: Default::default(), in_flight: Arc::new(tokio::sync::Semaphore::new(SENDS_IN_FLIGHT)) }
    }
}

/// How a sender proves who it is.
#[derive(Clone)]
enum Credential {
    None,
    /// The local host's token, sent as it is.
    Token(Arc<str>),
    Entra(Arc<auth::BusAuth>),
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct BatchEntry<'a> {
    body: &'a str,
    broker_properties: Map<String, Value>,
    user_properties: &'a BTreeMap<String, String>,
}

fn broker_properties(m: &OutgoingMessage) -> Map<String, Value> {
    let mut p = Map::new();
    p.insert("MessageId".into(), m.message_id.clone().into());
    if let Some(s) = &m.session_id {
        p.insert("SessionId".into(), s.clone().into());
    }
    if let Some(c) = &m.correlation_id {
        p.insert("CorrelationId".into(), c.clone().into());
    }
    if let Some(at) = m.scheduled_at {
        p.insert("ScheduledEnqueueTimeUtc".into(), httpdate::fmt_http_date(at.into()).into());
    }
    p
}

/// Where the stages' messages go: [`BusSender`] wherever the pipeline runs;
/// the stages' own tests keep what was sent instead.
#[async_trait::async_trait]
pub trait Bus: Send + Sync {
    async fn send(&self, message: &OutgoingMessage) -> Result<(), BusError>;
    /// Messages of one queue, sent together.
    async fn send_batch(&self, queue: &str, messages: &[OutgoingMessage]) -> Result<(), BusError>;
}

#[async_trait::async_trait]
impl Bus for BusSender {
    async fn send(&self, message: &OutgoingMessage) -> Result<(), BusError> {
        BusSender::send(self, message).await
    }

    async fn send_batch(&self, queue: &str, messages: &[OutgoingMessage]) -> Result<(), BusError> {
        BusSender::send_batch(self, queue, messages).await
    }
}

impl BusSender {
    /// A sender to the Service Bus REST endpoints at `base` with no authentication.
    pub fn new(base: &str) -> BusSender {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build()
            .expect("the HTTP client builds with static settings");
        BusSender { http, base: base.trim_end_matches('/').to_owned(), credential: Credential::None, outbox: Default::default() }
    }

    /// A sender to the local host's endpoints (e.g. `http://127.0.0.1:7071`),
    /// with the token it gave its handler, as `Authorization: Bearer <token>`.
    pub fn with_token(base: &str, token: &str) -> BusSender {
        BusSender { credential: Credential::Token(token.into()), ..BusSender::new(base) }
    }

    /// A sender to an Azure Service Bus namespace (`https://{ns}.servicebus.windows.net`),
    /// authenticated with Entra tokens from `credential`.
    pub fn with_credential(base: &str, credential: Arc<dyn azure_core::credentials::TokenCredential>) -> BusSender {
        BusSender { credential: Credential::Entra(Arc::new(auth::BusAuth::new(credential))), ..BusSender::new(base) }
    }

    fn url(&self, queue: &str) -> String {
        format!("{}/{queue}/messages", self.base)
    }

    /// Sends one message, in a producer span whose trace context the message carries.
    pub async fn send(&self, m: &OutgoingMessage) -> Result<(), BusError> {
        let prop = |k: &str| m.properties.get(k).map(String::as_str).unwrap_or_default();
        let span = tracing::info_span!(
            "send",
            otel.name = %format!("send {}", m.queue),
            otel.kind = "producer",
            "messaging.system" = "servicebus",
            "messaging.destination.name" = %m.queue,
            "messaging.message.id" = %m.message_id,
            batch_id = prop("batch_id"),
            ticket_id = prop("ticket_id"),
            client_id = prop("client_id"),
            stage = prop("stage"),
            attempt = prop("attempt"),
            outcome = tracing::field::Empty,
        );
        let mut m = m.clone();
        m.properties.extend(crate::telemetry::context_properties(&span));
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.outbox.waiting.lock().unwrap_or_else(|p| p.into_inner()).push((m, answer));
        // The sends run in their own task: one whose caller gives up still goes out.
        tokio::spawn(self.clone().flush());
        let sent = answered.await.unwrap_or_else(|_| Err(BusError::Transient("the send was dropped".into())));
        span.record("outcome", if sent.is_ok() { "sent" } else { "failed" });
        sent
    }

    /// Once a send may start, takes everything waiting and sends it: one
    /// request for a lone message, one batch request per queue and session
    /// for the rest. A flush that finds nothing waiting (an earlier one took
    /// it) does nothing.
    async fn flush(self) {
        let Ok(_permit) = self.outbox.in_flight.clone().acquire_owned().await else { return };
        let waiting = std::mem::take(&mut *self.outbox.waiting.lock().unwrap_or_else(|p| p.into_inner()));
        if waiting.is_empty() {
            return;
        }
        let mut groups: BTreeMap<(String, Option<String>), Vec<_>> = BTreeMap::new();
        for (m, answer) in waiting {
            groups.entry((m.queue.clone(), m.session_id.clone())).or_default().push((m, answer));
        }
        let this = &self;
        let sends = groups.into_iter().map(|((queue, _), group)| async move {
            let (messages, answers): (Vec<_>, Vec<_>) = group.into_iter().unzip();
            let sent = match messages.as_slice() {
                [one] => this.send_one(one).await,
                many => this.send_batch(&queue, many).await,
            };
            for answer in answers {
                let _ = answer.send(sent.as_ref().map(|_| ()).map_err(BusError::clone));
            }
        });
        futures::future::join_all(sends).await;
    }

    async fn send_one(&self, m: &OutgoingMessage) -> Result<(), BusError> {
        let broker = Value::Object(broker_properties(m)).to_string();
        self.with_retries(|| {
            let mut req = self
                .http
                .post(self.url(&m.queue))
                .header("BrokerProperties", &broker)
                .header("Content-Type", "application/json")
                .body(m.body.clone());
            for (k, v) in &m.properties {
                req = req.header(k, Value::String(v.clone()).to_string());
            }
            req
        })
        .await
    }

    /// Sends many messages to one queue, in as few requests as the broker allows.
    pub async fn send_batch(&self, queue: &str, messages: &[OutgoingMessage]) -> Result<(), BusError> {
        for chunk in messages.chunks(BATCH_CHUNK) {
            let entries: Vec<BatchEntry<'_>> = chunk
                .iter()
                .map(|m| BatchEntry {
                    body: std::str::from_utf8(&m.body).unwrap_or_default(),
                    broker_properties: broker_properties(m),
                    user_properties: &m.properties,
                })
                .collect();
            let body = serde_json::to_vec(&entries).map_err(|e| BusError::Permanent(e.to_string()))?;
            self.with_retries(|| {
                self.http
                    .post(self.url(queue))
                    .header("Content-Type", "application/vnd.microsoft.servicebus.json")
                    .body(body.clone())
            })
            .await?;
        }
        Ok(())
    }

    /// Service Bus itself may throttle (429) or be briefly unavailable (503):
    /// back off and try again a few times before giving the error to the caller.
    async fn with_retries(&self, request: impl Fn() -> reqwest::RequestBuilder) -> Result<(), BusError> {
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=ATTEMPTS {
            let builder = match &self.credential {
                Credential::None => request(),
                Credential::Token(token) => request().bearer_auth(token),
                Credential::Entra(auth) => request().bearer_auth(auth.bearer().await?),
            };
            let outcome = builder.send().await;
            let error = match outcome {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => {
                    let status = r.status();
                    let retry_after = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = r.text().await.unwrap_or_default();
                    let error = format!("{status}: {}", text.chars().take(300).collect::<String>());
                    if status == StatusCode::UNAUTHORIZED
                        && attempt == 1
                        && let Credential::Entra(auth) = &self.credential
                    {
                        auth.forget().await;
                        continue;
                    }
                    if !retryable(status) {
                        return Err(BusError::Permanent(error));
                    }
                    delay = delay.max(retry_after.unwrap_or_default());
                    error
                }
                Err(e) => e.to_string(),
            };
            if attempt == ATTEMPTS {
                return Err(BusError::Transient(error));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        unreachable!("the loop returns on its last attempt")
    }
}

fn retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT || status.is_server_error()
}
