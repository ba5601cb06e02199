//! Delivery: one dispatcher task per queue-triggered function and instance
//! takes visible messages under a peek-lock, invokes the handler, and settles
//! each delivery. Settlements are written in batches.
//!
//! - One message per invocation: up to maxConcurrentCalls at once (for session
//!   queues one message per session, and maxConcurrentSessions), each lock
//!   renewed up to maxAutoLockRenewalDuration.
//! - A batch per invocation (`"cardinality": "many"`), as the Service Bus
//!   extension's batch loop does: one batch at a time, up to
//!   maxMessageBatchSize messages (held back below minMessageBatchSize for at
//!   most maxBatchWaitTime), one session's messages only, no lock renewal;
//!   every message completed on success and abandoned on failure.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::config::{BatchOptions, Cardinality};
use super::invoke::{self, InvokeError};
use super::queue::{Message, Received, Settled, Settlement, QueueStore, Take, now_ms};
use super::worker::WorkerState;
use super::{QueueSpec, Shared};

/// The running dispatchers.
pub struct Dispatch {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    settler: JoinHandle<()>,
}

impl Dispatch {
    pub(crate) fn start(shared: Arc<Shared>) -> Dispatch {
        let (stop, stop_rx) = watch::channel(false);
        let (settler, settler_task) = Settler::start(shared.store.clone());
        let tasks = shared
            .queues
            .values()
            .flat_map(|spec| (0..shared.instances.len()).map(move |i| (spec.clone(), i)))
            .map(|(spec, i)| match spec.trigger.cardinality {
                Cardinality::One => tokio::spawn(run_queue(shared.clone(), spec, i, settler.clone(), stop_rx.clone())),
                Cardinality::Many => tokio::spawn(run_batches(shared.clone(), spec, i, settler.clone(), stop_rx.clone())),
            })
            .collect();
        Dispatch { stop, tasks, settler: settler_task }
    }

    /// Nothing running (after a stop).
    pub(crate) fn idle() -> Dispatch {
        Dispatch { stop: watch::channel(true).0, tasks: Vec::new(), settler: tokio::spawn(async {}) }
    }

    /// Stops taking messages and waits (at most `bound`) for in-flight
    /// invocations to finish and be settled. Whatever is still running after
    /// that keeps its lock and is redelivered at the next start.
    pub async fn stop(self, bound: Duration) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + bound;
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                tracing::warn!("in-flight invocations did not finish within {bound:?}; they will be redelivered");
                abort.abort();
            }
        }
        self.settler.abort();
    }
}

type SettleOp = (i64, String, Settlement, oneshot::Sender<Settled>);

/// Groups settlements arriving together into one transaction.
#[derive(Clone)]
struct Settler {
    tx: mpsc::UnboundedSender<SettleOp>,
}

impl Settler {
    fn start(store: QueueStore) -> (Settler, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<SettleOp>();
        let task = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < 512 {
                    match rx.try_recv() {
                        Ok(op) => batch.push(op),
                        Err(_) => break,
                    }
                }
                let (ops, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|(s, t, h, r)| ((s, t, h), r)).unzip();
                let store = store.clone();
                let res = tokio::task::spawn_blocking(move || store.settle(&ops, now_ms())).await;
                match res {
                    Ok(Ok(results)) => {
                        for (r, reply) in results.into_iter().zip(replies) {
                            let _ = reply.send(r);
                        }
                    }
                    Ok(Err(e)) => tracing::error!("cannot settle messages (they stay locked until the next start): {e:#}"),
                    Err(e) => tracing::error!("settlement task failed: {e}"),
                }
            }
        });
        (Settler { tx }, task)
    }

    async fn settle(&self, seq: i64, token: String, how: Settlement) -> Option<Settled> {
        let (reply, rx) = oneshot::channel();
        self.tx.send((seq, token, how, reply)).ok()?;
        rx.await.ok()
    }
}

/// How long one delivery may run: the lock is renewed up to
/// maxAutoLockRenewalDuration (never shorter than one lockDuration), and the
/// invocation is cut at functionTimeout, whichever comes first.
fn delivery_limit(shared: &Shared, spec: &QueueSpec) -> Duration {
    let lock = spec.trigger.settings.lock_duration.max(shared.config.max_auto_lock_renewal);
    match shared.config.function_timeout {
        Some(t) => t.min(lock),
        None => lock,
    }
}

/// How long messages left for a queue's other receivers wait for them.
const LEFT_FOR_OTHERS: Duration = Duration::from_millis(5);

/// How long a receiver waits after a failed receive before trying again.
const RECEIVE_AGAIN: Duration = Duration::from_secs(1);

/// A receive's messages, with what went wrong logged; `None` if it failed.
fn received_from(queue: &str, received: Result<anyhow::Result<Received>, tokio::task::JoinError>) -> Option<Received> {
    match received {
        Ok(Ok(r)) => {
            if r.expired > 0 {
                tracing::warn!(queue = %queue, "{} expired message(s) moved to the dead-letter queue", r.expired);
            }
            Some(r)
        }
        Ok(Err(e)) => {
            tracing::error!(queue = %queue, "cannot receive: {e:#}");
            None
        }
        Err(e) => {
            tracing::error!(queue = %queue, "receive task failed: {e}");
            None
        }
    }
}

/// When to look at the queue again, unless woken first: when its next
/// scheduled message is due or after `also`, whichever comes first; soon if
/// messages were left for other receivers (taken here if they do not come).
fn look_again_in(next_due: Option<i64>, left: bool, also: Option<Duration>) -> Option<Duration> {
    let due = next_due.map(|t| Duration::from_millis((t - now_ms()).max(0) as u64));
    let at = match (also, due) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if left { Some(at.map_or(LEFT_FOR_OTHERS, |d| d.min(LEFT_FOR_OTHERS))) } else { at }
}

/// Sleeps for `d`, or for ever.
async fn nap(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Counts an instance among its queue's receivers while it is free to take messages.
struct Receiving<'a> {
    spec: &'a QueueSpec,
    counted: bool,
}

impl Receiving<'_> {
    fn set(&mut self, on: bool) {
        if on != self.counted {
            if on {
                self.spec.receiving.fetch_add(1, Relaxed);
            } else {
                self.spec.receiving.fetch_sub(1, Relaxed);
            }
            self.counted = on;
        }
    }
}

impl Drop for Receiving<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// The recorded lock outlives the delivery limit a little: the delivery task
/// always settles or gives up before it.
const LOCK_MARGIN: Duration = Duration::from_secs(5);

/// What one dispatcher delivers: a queue function's messages to one instance.
#[derive(Clone)]
struct Route {
    shared: Arc<Shared>,
    spec: Arc<QueueSpec>,
    instance: usize,
    settler: Settler,
    /// How long one invocation may run.
    run_for: Duration,
}

impl Route {
    fn handler_ready(&self) -> bool {
        self.shared.instances[self.instance].ready()
    }

    /// Receives from the queue as `take` says, with locks that outlast an invocation.
    async fn receive<F>(&self, take: F) -> Option<Received>
    where
        F: FnOnce(&QueueStore, &str, Duration) -> anyhow::Result<Received> + Send + 'static,
    {
        let store = self.shared.store.clone();
        let queue = self.spec.trigger.queue.clone();
        let lock_for = self.run_for + LOCK_MARGIN;
        let received = tokio::task::spawn_blocking(move || take(&store, &queue, lock_for)).await;
        received_from(&self.spec.trigger.queue, received)
    }
}

/// Why a dispatcher stopped waiting.
enum Woke {
    /// To look at the queue again.
    ToLook,
    /// A delivery finished (its session, if any).
    Finished(Option<String>),
    /// The stop signal is gone.
    ToStop,
}

/// What wakes a dispatcher besides its own deliveries: the handler's state and the stop signal.
struct Wakers {
    worker: watch::Receiver<WorkerState>,
    worker_alive: bool,
    stop: watch::Receiver<bool>,
}

impl Wakers {
    fn new(route: &Route, stop: watch::Receiver<bool>) -> Wakers {
        Wakers { worker: route.shared.instances[route.instance].state.clone(), worker_alive: true, stop }
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Waits until a message `arrived`, a delivery `finished`, `sleep_for`
    /// passed, the handler's state changed or the stop signal did.
    async fn wait(
        &mut self,
        arrived: &Notify,
        sleep_for: Option<Duration>,
        finished: impl Future<Output = Option<Option<String>>>,
    ) -> Woke {
        tokio::select! {
            _ = arrived.notified() => Woke::ToLook,
            Some(session) = finished => Woke::Finished(session),
            _ = nap(sleep_for) => Woke::ToLook,
            r = self.worker.changed(), if self.worker_alive => {
                self.worker_alive = r.is_ok();
                Woke::ToLook
            }
            r = self.stop.changed() => if r.is_err() { Woke::ToStop } else { Woke::ToLook },
        }
    }
}

/// A dispatcher's deliveries still running, and the sessions they hold.
struct InFlight {
    count: usize,
    sessions: HashSet<String>,
    done_tx: mpsc::UnboundedSender<Option<String>>,
    done: mpsc::UnboundedReceiver<Option<String>>,
}

impl InFlight {
    fn new() -> InFlight {
        let (done_tx, done) = mpsc::unbounded_channel();
        InFlight { count: 0, sessions: HashSet::new(), done_tx, done }
    }

    /// Counts in the delivery of `m`, which reports on the returned sender when done.
    fn start(&mut self, m: &Message) -> mpsc::UnboundedSender<Option<String>> {
        self.count += 1;
        if let Some(s) = &m.session_id {
            self.sessions.insert(s.clone());
        }
        self.done_tx.clone()
    }

    /// Counts out a finished delivery, and any other that finished meanwhile.
    fn finished(&mut self, session: Option<String>) {
        self.count_out(session);
        while let Ok(session) = self.done.try_recv() {
            self.count_out(session);
        }
    }

    fn count_out(&mut self, session: Option<String>) {
        self.count -= 1;
        if let Some(s) = session {
            self.sessions.remove(&s);
        }
    }

    async fn wait_all(&mut self) {
        while self.count > 0 {
            if self.done.recv().await.is_none() {
                break;
            }
            self.count -= 1;
        }
    }
}

/// How many invocations of the function one instance runs at once:
/// maxConcurrentCalls, and for session queues (one message per session at a
/// time) at most maxConcurrentSessions.
fn concurrency(shared: &Shared, spec: &QueueSpec) -> usize {
    if spec.trigger.sessions {
        shared.config.max_concurrent_calls.min(shared.config.max_concurrent_sessions)
    } else {
        shared.config.max_concurrent_calls
    }
}

/// Drains `spec`'s queue into instance `instance`, up to the function's
/// concurrency (each instance has its own host, hence its own limit).
async fn run_queue(shared: Arc<Shared>, spec: Arc<QueueSpec>, instance: usize, settler: Settler, stop: watch::Receiver<bool>) {
    let limit = concurrency(&shared, &spec);
    let run_for = delivery_limit(&shared, &spec);
    let route = Route { shared, spec: spec.clone(), instance, settler, run_for };
    let mut wakers = Wakers::new(&route, stop);
    let mut in_flight = InFlight::new();
    let mut receiving = Receiving { spec: &spec, counted: false };
    while !wakers.stopping() {
        receiving.set(route.handler_ready() && in_flight.count < limit);
        let sleep_for = if receiving.counted { receive_and_deliver(&route, limit, &mut in_flight).await } else { None };
        let woke = wakers.wait(&spec.wakes[instance], sleep_for, in_flight.done.recv()).await;
        match woke {
            Woke::ToLook => {}
            Woke::Finished(session) => in_flight.finished(session),
            Woke::ToStop => break,
        }
    }
    receiving.set(false);
    in_flight.wait_all().await;
}

/// Takes as many messages as there is room for and starts delivering each;
/// says when to look at the queue again unless woken first.
async fn receive_and_deliver(route: &Route, limit: usize, in_flight: &mut InFlight) -> Option<Duration> {
    let take = Take { max: limit - in_flight.count, among: route.spec.receiving.load(Relaxed) };
    let busy = route.spec.trigger.sessions.then(|| in_flight.sessions.clone());
    let received = route.receive(move |store, queue, lock_for| store.receive(queue, take, busy.as_ref(), lock_for, now_ms()));
    let Some(r) = received.await else { return Some(RECEIVE_AGAIN) };
    let look_again = look_again_in(r.next_due, r.left, None);
    for m in r.messages {
        let done = in_flight.start(&m);
        tokio::spawn(deliver(route.clone(), m, done));
    }
    look_again
}

async fn deliver(route: Route, m: Message, done: mpsc::UnboundedSender<Option<String>>) {
    let body = invoke::payload(&route.spec, &m, chrono::Utc::now());
    let how = invoke_once(&route, &body).await;
    if let Settlement::Abandon { reason, .. } = &how {
        tracing::warn!(function = %route.spec.function, message_id = %m.message_id, delivery_count = m.delivery_count, "invocation failed: {reason}");
    }
    settle_all(&route.settler, &route.spec, std::slice::from_ref(&m), how).await;
    // Release the slot only once the settlement is written, so a session's
    // next message cannot overtake an abandoned one.
    let _ = done.send(m.session_id);
}

/// Invokes the handler with `body` (twice at once under duplicate-delivery
/// faults) within the route's limit, and says how the delivered messages are settled.
async fn invoke_once(route: &Route, body: &serde_json::Value) -> Settlement {
    let (shared, spec, run_for) = (&route.shared, &route.spec, route.run_for);
    let target = &shared.instances[route.instance];
    let once = || invoke::invoke(&shared.client, target.counted(), spec, body);
    let result = if shared.config.duplicate_deliveries {
        tokio::time::timeout(run_for, async {
            let (a, b) = tokio::join!(once(), once());
            a.and(b)
        })
        .await
    } else {
        tokio::time::timeout(run_for, once()).await
    };
    let max_delivery_count = spec.trigger.settings.max_delivery_count;
    match result {
        Ok(Ok(())) => Settlement::Complete,
        Ok(Err(InvokeError::NotDelivered(e))) => {
            tracing::debug!(function = %spec.function, "handler not reachable ({e}); messages released");
            Settlement::Release
        }
        Ok(Err(InvokeError::Failed(e))) => Settlement::Abandon { max_delivery_count, reason: e },
        Err(_) => Settlement::Abandon { max_delivery_count, reason: format!("invocation timed out after {run_for:?}") },
    }
}

/// Settles every message of one invocation the same way (one transaction when they arrive together).
async fn settle_all(settler: &Settler, spec: &QueueSpec, ms: &[Message], how: Settlement) {
    let settled = futures::future::join_all(ms.iter().map(|m| settler.settle(m.sequence_number, m.lock_token.clone(), how.clone()))).await;
    for (m, s) in ms.iter().zip(settled) {
        match s {
            Some(Settled::DeadLettered) => tracing::warn!(
                function = %spec.function, queue = %spec.trigger.queue, message_id = %m.message_id,
                "message moved to the dead-letter queue after {} deliveries", m.delivery_count
            ),
            Some(Settled::LockLost) => {
                tracing::warn!(function = %spec.function, message_id = %m.message_id, "lock lost before settlement")
            }
            _ => {}
        }
    }
}

/// How long one batch invocation may run: batches get no lock renewal, so the
/// whole batch must finish within one lock.
fn batch_limit(shared: &Shared, spec: &QueueSpec) -> Duration {
    let lock = spec.trigger.settings.lock_duration;
    shared.config.function_timeout.map_or(lock, |t| t.min(lock))
}

/// The batch being gathered: what was received and held back below
/// minMessageBatchSize, since when, and the session of the batch before.
#[derive(Default)]
struct NextBatch {
    held: Vec<Message>,
    since: Option<tokio::time::Instant>,
    last_session: Option<String>,
}

impl NextBatch {
    /// Enough messages, or held long enough.
    fn is_due(&self, options: &BatchOptions) -> bool {
        let waited = self.since.is_some_and(|t| t.elapsed() >= options.max_wait);
        !self.held.is_empty() && (self.held.len() >= options.min_size || waited)
    }

    fn take(&mut self) -> Vec<Message> {
        self.last_session = self.held[0].session_id.clone();
        self.since = None;
        std::mem::take(&mut self.held)
    }

    /// How much longer what is held waits for more, if anything is held.
    fn wait_for_more(&mut self, options: &BatchOptions) -> Option<Duration> {
        (!self.held.is_empty()).then(|| {
            let since = *self.since.get_or_insert_with(tokio::time::Instant::now);
            options.max_wait.saturating_sub(since.elapsed())
        })
    }
}

/// What a batch dispatcher does after a receive.
enum BatchStep {
    Deliver(Vec<Message>),
    Wait(Option<Duration>),
}

/// The batch loop of a `"cardinality": "many"` function on one instance: one
/// invocation at a time, each with what could be received up to
/// maxMessageBatchSize. Below minMessageBatchSize, what was received waits
/// (locked) for more, at most maxBatchWaitTime, then goes as a partial batch.
/// A session queue's batch holds one session's messages, and the session just
/// served is taken again while it has any.
async fn run_batches(shared: Arc<Shared>, spec: Arc<QueueSpec>, instance: usize, settler: Settler, stop: watch::Receiver<bool>) {
    let options = shared.config.batches;
    let run_for = batch_limit(&shared, &spec);
    let route = Route { shared, spec: spec.clone(), instance, settler, run_for };
    let mut wakers = Wakers::new(&route, stop);
    let mut next = NextBatch::default();
    let mut receiving = Receiving { spec: &spec, counted: false };
    while !wakers.stopping() {
        receiving.set(route.handler_ready());
        let step = if receiving.counted { gather(&route, &mut next, &options).await } else { BatchStep::Wait(None) };
        match step {
            BatchStep::Deliver(batch) => {
                receiving.set(false);
                deliver_batch(&route, batch).await;
            }
            BatchStep::Wait(sleep_for) => {
                if let Woke::ToStop = wakers.wait(&spec.wakes[instance], sleep_for, std::future::pending()).await {
                    break;
                }
            }
        }
    }
    receiving.set(false);
    // Held back for a fuller batch and never delivered: let them go uncounted.
    settle_all(&route.settler, &route.spec, &next.held, Settlement::Release).await;
}

/// Receives toward the next batch: the batch if it is due now, else how long
/// to wait before looking again.
async fn gather(route: &Route, next: &mut NextBatch, options: &BatchOptions) -> BatchStep {
    let Some(r) = receive_for_batch(route, next, options.max_size - next.held.len()).await else {
        return BatchStep::Wait(Some(RECEIVE_AGAIN));
    };
    next.held.extend(r.messages);
    if next.is_due(options) {
        return BatchStep::Deliver(next.take());
    }
    BatchStep::Wait(look_again_in(r.next_due, r.left, next.wait_for_more(options)))
}

/// Up to `room` messages: on a session queue, of the session already held,
/// else preferably of the one served last.
async fn receive_for_batch(route: &Route, next: &NextBatch, room: usize) -> Option<Received> {
    let sessions = route.spec.trigger.sessions;
    let among = route.spec.receiving.load(Relaxed);
    let only = next.held.first().and_then(|m| m.session_id.clone());
    let prefer = only.clone().or_else(|| next.last_session.clone());
    route
        .receive(move |store, queue, lock_for| {
            if sessions {
                store.receive_session_batch(queue, room, prefer.as_deref(), only.is_none(), lock_for, now_ms())
            } else {
                store.receive(queue, Take { max: room, among }, None, lock_for, now_ms())
            }
        })
        .await
}

/// One batch invocation, then every message settled as it went.
async fn deliver_batch(route: &Route, batch: Vec<Message>) {
    let body = invoke::batch_payload(&route.spec, &batch, chrono::Utc::now());
    let how = invoke_once(route, &body).await;
    if let Settlement::Abandon { reason, .. } = &how {
        tracing::warn!(function = %route.spec.function, messages = batch.len(), "batch invocation failed, every message abandoned: {reason}");
    }
    settle_all(&route.settler, &route.spec, &batch, how).await;
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use axum::response::IntoResponse;
    use base64::Engine;
    use serde_json::{Value, json};

    use super::super::testkit::*;
    use super::super::worker::WorkerState;

    async fn send(url: &str, queue: &str, broker: &str, body: &str) {
        let r = reqwest::Client::new()
            .post(format!("{url}/{queue}/messages"))
            .bearer_auth(BUS_TOKEN)
            .header("BrokerProperties", broker)
            .header("tenant", "\"acme\"")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }

    #[tokio::test]
    async fn invocation_payload_is_the_custom_handler_contract() {
        let app = app(&[("lookup", "ticket-lookup", false, 10)]);
        let (handler, calls) = fake_handler(|_, _| ok_json()).await;
        let (core, _s) = core(app.path(), &app.path().join("data"), &handler, WorkerState::Ready).await;
        send(&core.url, "ticket-lookup", r#"{"MessageId":"m-1","CorrelationId":"corr","Label":"lbl"}"#, r#"{"ticket":"t1"}"#).await;
        eventually("one invocation", || calls.lock().unwrap().len() == 1).await;
        eventually("completion", || core.shared.store.counts(0).unwrap().is_empty()).await;

        let call = calls.lock().unwrap()[0].clone();
        assert_eq!((call.method.as_str(), call.path_and_query.as_str()), ("POST", "/lookup"));
        assert_eq!(call.headers["content-type"], "application/json; charset=utf-8");
        assert!(call.headers["user-agent"].to_str().unwrap().starts_with("Azure-Functions-Host/4."));
        assert!(call.headers.contains_key("x-azure-functions-hostversion"));
        uuid::Uuid::parse_str(call.headers["x-azure-functions-invocationid"].to_str().unwrap()).unwrap();

        let v = call.json();
        let data = v["Data"]["message"].as_str().unwrap();
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(data).unwrap(), br#"{"ticket":"t1"}"#);
        let md = &v["Metadata"];
        assert_eq!(md["DeliveryCount"], "1");
        assert_eq!(md["MessageId"], "\"m-1\"");
        assert_eq!(md["CorrelationId"], "\"corr\"");
        assert_eq!(md["Subject"], "\"lbl\"");
        assert_eq!(md["Label"], "\"lbl\"");
        assert!(md["SequenceNumber"].as_str().unwrap().parse::<i64>().is_ok());
        let token = md["LockToken"].as_str().unwrap();
        assert!(token.starts_with('"') && token.ends_with('"'));
        let enq = md["EnqueuedTimeUtc"].as_str().unwrap();
        chrono::NaiveDateTime::parse_from_str(enq, "%Y-%m-%dT%H:%M:%S").unwrap();
        assert_eq!(md["EnqueuedTime"].as_str().unwrap(), format!("{enq}+00:00"));
        assert_eq!(md["ExpiresAtUtc"], "9999-12-31T23:59:59");
        assert_eq!(md["ApplicationProperties"], json!({"tenant": "acme"}));
        assert_eq!(md["UserProperties"], json!({"tenant": "acme"}));
        assert!(md.get("SessionId").is_none() && md.get("ContentType").is_none(), "null properties are left out");
        assert_eq!(md["sys"]["MethodName"], "lookup");
        assert!(md["sys"]["UtcNow"].as_str().unwrap().ends_with('Z'));
        core.stop().await;
    }

    #[tokio::test]
    async fn failures_count_deliveries_then_dead_letter() {
        let app = app(&[("pay", "ticket-pay", false, 3), ("notify", "ticket-notify", false, 10)]);
        // pay: fails twice (non-2xx, then 200 text/plain), then succeeds. notify: always fails.
        let (handler, calls) = fake_handler(|_, call| {
            let v = call.json();
            let dc = v["Metadata"]["DeliveryCount"].as_str().unwrap().to_string();
            match (call.path_and_query.as_str(), dc.as_str()) {
                ("/pay", "1") => fail(),
                ("/pay", "2") => "ok but not json".into_response(),
                ("/pay", _) => ok_json(),
                _ => fail(),
            }
        })
        .await;
        let (core, _s) = core(app.path(), &app.path().join("data"), &handler, WorkerState::Ready).await;
        send(&core.url, "ticket-pay", r#"{"MessageId":"p"}"#, "pay me").await;
        send(&core.url, "ticket-notify", r#"{"MessageId":"n"}"#, "tell them").await;
        eventually("settled", || {
            let c = core.shared.store.counts(0).unwrap();
            !c.contains_key("ticket-pay") && c.get("ticket-notify").is_some_and(|n| n.dead_lettered == 1 && n.locked == 0)
        })
        .await;
        let seen = |path: &str| -> Vec<String> {
            calls.lock().unwrap().iter().filter(|c| c.path_and_query == path)
                .map(|c| c.json()["Metadata"]["DeliveryCount"].as_str().unwrap().to_string()).collect()
        };
        assert_eq!(seen("/pay"), ["1", "2", "3"]);
        assert_eq!(seen("/notify").len(), 10);
        assert_eq!(seen("/notify").last().unwrap(), "10");
        let dl = core.shared.store.dead_letters("ticket-notify", 10).unwrap();
        assert_eq!(dl[0].reason, "MaxDeliveryCountExceeded");
        assert!(dl[0].description.as_deref().unwrap().contains("500"), "{:?}", dl[0].description);
        let q = admin(&core.url).await;
        assert_eq!(q["ticket-notify"]["dead_lettered"], 1);
        core.stop().await;
    }

    // The fake handler blocks its thread while "working": give it threads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn sessions_are_processed_one_message_at_a_time() {
        let app = app(&[("reserve", "ticket-reserve", true, 10)]);
        let active: std::sync::Arc<Mutex<Vec<String>>> = Default::default();
        let peak_sessions = std::sync::Arc::new(AtomicUsize::new(0));
        let order: std::sync::Arc<Mutex<Vec<(String, String)>>> = Default::default();
        let (a, p, o) = (active.clone(), peak_sessions.clone(), order.clone());
        let (handler, _calls) = fake_handler(move |_, call| {
            let v = call.json();
            let sid: String = serde_json::from_str(v["Metadata"]["SessionId"].as_str().unwrap()).unwrap();
            let body = base64::engine::general_purpose::STANDARD.decode(v["Data"]["message"].as_str().unwrap()).unwrap();
            {
                let mut act = a.lock().unwrap();
                assert!(!act.contains(&sid), "two deliveries of session {sid} at once");
                act.push(sid.clone());
                p.fetch_max(act.len(), Ordering::SeqCst);
            }
            o.lock().unwrap().push((sid.clone(), String::from_utf8(body).unwrap()));
            std::thread::sleep(std::time::Duration::from_millis(20));
            a.lock().unwrap().retain(|s| s != &sid);
            ok_json()
        })
        .await;
        let (core, _s) = core(app.path(), &app.path().join("data"), &handler, WorkerState::Ready).await;
        let mut batch = Vec::new();
        for i in 0..5 {
            for s in ["A", "B", "C", "D"] {
                batch.push(json!({"Body": format!("{s}{i}"), "BrokerProperties": {"SessionId": s, "MessageId": format!("{s}{i}")}}));
            }
        }
        let r = reqwest::Client::new()
            .post(format!("{}/ticket-reserve/messages", core.url))
            .bearer_auth(BUS_TOKEN)
            .header("content-type", super::super::servicebus::BATCH_CONTENT_TYPE)
            .body(Value::Array(batch).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        eventually("all delivered", || order.lock().unwrap().len() == 20).await;
        let peak = peak_sessions.load(Ordering::SeqCst);
        assert!((2..=3).contains(&peak), "sessions in parallel, at most maxConcurrentSessions=3: {peak}");
        for s in ["A", "B", "C", "D"] {
            let got: Vec<_> = order.lock().unwrap().iter().filter(|(x, _)| x == s).map(|(_, b)| b.clone()).collect();
            assert_eq!(got, (0..5).map(|i| format!("{s}{i}")).collect::<Vec<_>>(), "FIFO within session {s}");
        }
        core.stop().await;
    }

    /// How many of the host's instances receive from `queue` now.
    fn receivers(core: &super::super::Core, queue: &str) -> usize {
        core.shared.queue(queue).unwrap().receiving.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn nothing_is_delivered_while_the_handler_is_down() {
        let app = app(&[("lookup", "ticket-lookup", false, 2)]);
        let up = std::sync::Arc::new(AtomicBool::new(true));
        let while_down = std::sync::Arc::new(AtomicUsize::new(0));
        let (u, d) = (up.clone(), while_down.clone());
        let (handler, calls) = fake_handler(move |_, _| {
            if !u.load(Ordering::SeqCst) {
                d.fetch_add(1, Ordering::SeqCst);
            }
            ok_json()
        })
        .await;
        let (core, state) = core(app.path(), &app.path().join("data"), &handler, WorkerState::Ready).await;
        eventually("the dispatcher receiving", || receivers(&core, "ticket-lookup") == 1).await;
        up.store(false, Ordering::SeqCst);
        state.send(WorkerState::Down("exited".into())).unwrap();
        eventually("the dispatcher to stop receiving", || receivers(&core, "ticket-lookup") == 0).await;
        send(&core.url, "ticket-lookup", r#"{"MessageId":"x"}"#, "x").await;
        up.store(true, Ordering::SeqCst);
        state.send(WorkerState::Ready).unwrap();
        eventually("delivered once ready", || calls.lock().unwrap().len() == 1).await;
        eventually("completion", || core.shared.store.counts(0).unwrap().is_empty()).await;
        assert_eq!(while_down.load(Ordering::SeqCst), 0, "delivered while the handler was down");
        assert_eq!(calls.lock().unwrap().len(), 1);
        assert_eq!(calls.lock().unwrap()[0].json()["Metadata"]["DeliveryCount"], "1");
        core.stop().await;
    }

    #[tokio::test]
    async fn an_unreachable_handler_does_not_burn_deliveries() {
        let app = app(&[("lookup", "ticket-lookup", false, 2)]);
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // Ready, but nobody listens: connection refused.
        let (core, state) = core(app.path(), &app.path().join("data"), &format!("http://127.0.0.1:{port}"), WorkerState::Ready).await;
        send(&core.url, "ticket-lookup", r#"{"MessageId":"x"}"#, "x").await;
        // More attempts than maxDeliveryCount (2) would allow, were they counted.
        let attempts = || core.shared.instances[0].invocations.load(Ordering::SeqCst);
        eventually("three refused deliveries", || attempts() >= 3).await;
        state.send(WorkerState::Down("exited".into())).unwrap();
        let unlocked = || core.shared.store.counts(0).unwrap().get("ticket-lookup").is_some_and(|c| c.locked == 0);
        eventually("the dispatcher to stop and let the message go", || receivers(&core, "ticket-lookup") == 0 && unlocked()).await;
        let c = core.shared.store.counts(0).unwrap()["ticket-lookup"];
        assert_eq!((c.dead_lettered, c.locked), (0, 0));
        let m = core.shared.store.receive("ticket-lookup", super::Take::up_to(1), None, std::time::Duration::from_secs(1), super::now_ms()).unwrap();
        assert_eq!(m.messages[0].delivery_count, 1, "refused connections were not counted");
        core.stop().await;
    }

    /// A batch invocation's JSON-string array, parsed.
    fn column(md: &Value, key: &str) -> Vec<Value> {
        serde_json::from_str(md[key].as_str().unwrap_or_else(|| panic!("{key} is a JSON string: {md}"))).unwrap()
    }

    fn bodies(call: &super::super::testkit::Call) -> Vec<String> {
        let v = call.json();
        let data: Vec<String> = serde_json::from_str(v["Data"]["message"].as_str().unwrap()).unwrap();
        data.iter().map(|b| String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap()).unwrap()).collect()
    }

    async fn send_many(url: &str, queue: &str, messages: Vec<Value>) {
        let r = reqwest::Client::new()
            .post(format!("{url}/{queue}/messages"))
            .bearer_auth(BUS_TOKEN)
            .header("content-type", super::super::servicebus::BATCH_CONTENT_TYPE)
            .body(Value::Array(messages).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }

    fn numbered(prefix: &str, n: usize, session: Option<&str>) -> Vec<Value> {
        (0..n)
            .map(|i| {
                let mut broker = json!({"MessageId": format!("{prefix}{i}"), "CorrelationId": format!("c{i}")});
                if let Some(s) = session {
                    broker["SessionId"] = json!(s);
                }
                json!({"Body": format!("{prefix}{i}"), "BrokerProperties": broker, "UserProperties": {"n": i.to_string()}})
            })
            .collect()
    }

    #[tokio::test]
    async fn a_batch_invocation_carries_bodies_and_metadata_as_arrays_in_json_strings() {
        let app = batch_app(&[("lookup", "ticket-lookup", false, 10)], json!({"maxMessageBatchSize": 10}));
        let (handler, calls) = fake_handler(|_, _| ok_json()).await;
        let (core, state) = core(app.path(), &app.path().join("data"), &handler, WorkerState::Starting).await;
        send_many(&core.url, "ticket-lookup", numbered("m", 3, None)).await;
        state.send(WorkerState::Ready).unwrap();
        eventually("completion", || core.shared.store.counts(0).unwrap().is_empty()).await;

        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 1, "three visible messages, one invocation");
        let call = &calls[0];
        assert_eq!((call.method.as_str(), call.path_and_query.as_str()), ("POST", "/lookup"));
        assert_eq!(bodies(call), ["m0", "m1", "m2"]);
        let md = &call.json()["Metadata"];
        assert_eq!(column(md, "MessageIdArray"), [json!("m0"), json!("m1"), json!("m2")]);
        assert_eq!(column(md, "DeliveryCountArray"), [json!(1), json!(1), json!(1)]);
        assert_eq!(column(md, "CorrelationIdArray")[2], "c2");
        assert_eq!(column(md, "SessionIdArray"), [Value::Null, Value::Null, Value::Null]);
        assert_eq!(column(md, "ApplicationPropertiesArray")[1], json!({"n": "1"}));
        assert_eq!(column(md, "UserPropertiesArray"), column(md, "ApplicationPropertiesArray"));
        assert_eq!(column(md, "LockTokenArray").len(), 3);
        let seq = column(md, "SequenceNumberArray");
        assert!(seq.windows(2).all(|w| w[0].as_i64() < w[1].as_i64()), "in queue order: {seq:?}");
        let enq = column(md, "EnqueuedTimeUtcArray");
        chrono::NaiveDateTime::parse_from_str(enq[0].as_str().unwrap(), "%Y-%m-%dT%H:%M:%S%.3f").unwrap();
        for single in ["DeliveryCount", "MessageId", "LockToken", "SequenceNumber", "ApplicationProperties"] {
            assert!(md.get(single).is_none(), "no single-message {single} in a batch");
        }
        assert_eq!(md["MessageActions"], json!({}));
        assert_eq!(md["sys"]["MethodName"], "lookup");
        core.stop().await;
    }

    #[tokio::test]
    async fn a_failed_batch_is_abandoned_whole_and_every_delivery_counts() {
        let app = batch_app(&[("lookup", "ticket-lookup", false, 3)], json!({"maxMessageBatchSize": 10}));
        let (handler, calls) = fake_handler(|n, _| if n == 1 { fail() } else { ok_json() }).await;
        let (core, state) = core(app.path(), &app.path().join("data"), &handler, WorkerState::Starting).await;
        send_many(&core.url, "ticket-lookup", numbered("m", 4, None)).await;
        state.send(WorkerState::Ready).unwrap();
        eventually("completion", || core.shared.store.counts(0).unwrap().is_empty()).await;
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 2);
        assert_eq!(bodies(&calls[1]), ["m0", "m1", "m2", "m3"], "the same batch again, in order");
        assert_eq!(column(&calls[1].json()["Metadata"], "DeliveryCountArray"), [json!(2), json!(2), json!(2), json!(2)]);
        core.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_batch_at_a_time_never_more_than_the_max_size() {
        let app = batch_app(&[("lookup", "ticket-lookup", false, 10)], json!({"maxMessageBatchSize": 4}));
        let active = std::sync::Arc::new(AtomicUsize::new(0));
        let peak = std::sync::Arc::new(AtomicUsize::new(0));
        let (a, p) = (active.clone(), peak.clone());
        let (handler, calls) = fake_handler(move |_, _| {
            p.fetch_max(a.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(30));
            a.fetch_sub(1, Ordering::SeqCst);
            ok_json()
        })
        .await;
        let (core, _s) = core(app.path(), &app.path().join("data"), &handler, WorkerState::Ready).await;
        send_many(&core.url, "ticket-lookup", numbered("m", 10, None)).await;
        eventually("completion", || core.shared.store.counts(0).unwrap().is_empty()).await;
        let sizes: Vec<usize> = calls.lock().unwrap().iter().map(|c| bodies(c).len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 10);
        assert!(sizes.iter().all(|&n| n <= 4), "{sizes:?}");
        assert_eq!(peak.load(Ordering::SeqCst), 1, "one invocation at a time per function and instance");
        core.stop().await;
    }

    #[tokio::test]
    async fn a_session_batch_holds_one_session_in_order() {
        let app = batch_app(&[("reserve", "ticket-reserve", true, 10)], json!({"maxMessageBatchSize": 100}));
        let (handler, calls) = fake_handler(|_, _| ok_json()).await;
        let (core, state) = core(app.path(), &app.path().join("data"), &handler, WorkerState::Starting).await;
        let mut all = Vec::new();
        for s in ["A", "B", "C"] {
            all.extend(numbered(s, 5, Some(s)));
        }
        send_many(&core.url, "ticket-reserve", all).await;
        state.send(WorkerState::Ready).unwrap();
        eventually("completion", || core.shared.store.counts(0).unwrap().is_empty()).await;
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 3, "one batch per session");
        for call in &calls {
            let sessions = column(&call.json()["Metadata"], "SessionIdArray");
            let s = sessions[0].as_str().unwrap().to_owned();
            assert!(sessions.iter().all(|x| x == &json!(s)), "one session per batch: {sessions:?}");
            assert_eq!(bodies(call), (0..5).map(|i| format!("{s}{i}")).collect::<Vec<_>>(), "in order");
        }
        core.stop().await;
    }

    #[tokio::test]
    async fn below_the_min_size_a_batch_waits_then_goes_partial() {
        let app = batch_app(
            &[("lookup", "ticket-lookup", false, 10)],
            json!({"maxMessageBatchSize": 10, "minMessageBatchSize": 3, "maxBatchWaitTime": "00:00:01"}),
        );
        let (handler, calls) = fake_handler(|_, _| ok_json()).await;
        let (core, _s) = core(app.path(), &app.path().join("data"), &handler, WorkerState::Ready).await;
        send_many(&core.url, "ticket-lookup", numbered("a", 2, None)).await;
        let sent = std::time::Instant::now();
        eventually("the partial batch", || calls.lock().unwrap().len() == 1).await;
        let waited = sent.elapsed();
        assert!(waited >= std::time::Duration::from_millis(900), "two of three waited for more: {waited:?}");
        assert_eq!(bodies(&calls.lock().unwrap()[0]), ["a0", "a1"]);
        send_many(&core.url, "ticket-lookup", numbered("b", 3, None)).await;
        eventually("the full batch", || calls.lock().unwrap().len() == 2).await;
        assert_eq!(bodies(&calls.lock().unwrap()[1]), ["b0", "b1", "b2"]);
        core.stop().await;
    }
}
