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

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::config::Cardinality;
use super::invoke::{self, InvokeError};
use super::queue::{Message, Received, Settled, Settlement, QueueStore, Take, now_ms};
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

/// Drains `spec`'s queue into instance `instance`, up to the function's
/// concurrency (each instance has its own host, hence its own limit).
async fn run_queue(
    shared: Arc<Shared>,
    spec: Arc<QueueSpec>,
    instance: usize,
    settler: Settler,
    mut stop: watch::Receiver<bool>,
) {
    let mut worker = shared.instances[instance].state.clone();
    let mut worker_alive = true;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Option<String>>();
    let mut in_flight = 0usize;
    let mut busy: HashSet<String> = HashSet::new();
    let sessions = spec.trigger.sessions;
    let limit = if sessions {
        shared.config.max_concurrent_calls.min(shared.config.max_concurrent_sessions)
    } else {
        shared.config.max_concurrent_calls
    };
    let run_for = delivery_limit(&shared, &spec);
    // The recorded lock outlives the delivery limit a little: the delivery
    // task always settles or gives up before it.
    let lock_for = run_for + Duration::from_secs(5);
    let queue = spec.trigger.queue.clone();

    let mut receiving = Receiving { spec: &spec, counted: false };
    loop {
        if *stop.borrow() {
            break;
        }
        let mut sleep_for = None;
        receiving.set(shared.instances[instance].ready() && in_flight < limit);
        if receiving.counted {
            let store = shared.store.clone();
            let q = queue.clone();
            let take = Take { max: limit - in_flight, among: spec.receiving.load(Relaxed) };
            let busy_now = sessions.then(|| busy.clone());
            let received = tokio::task::spawn_blocking(move || store.receive(&q, take, busy_now.as_ref(), lock_for, now_ms())).await;
            match received_from(&queue, received) {
                Some(r) => {
                    sleep_for = look_again_in(r.next_due, r.left, None);
                    for m in r.messages {
                        in_flight += 1;
                        if let Some(s) = &m.session_id {
                            busy.insert(s.clone());
                        }
                        tokio::spawn(deliver(
                            shared.clone(),
                            spec.clone(),
                            instance,
                            settler.clone(),
                            m,
                            run_for,
                            done_tx.clone(),
                        ));
                    }
                }
                None => sleep_for = Some(RECEIVE_AGAIN),
            }
        }
        tokio::select! {
            _ = spec.wakes[instance].notified() => {}
            Some(session) = done_rx.recv() => {
                in_flight -= 1;
                if let Some(s) = session { busy.remove(&s); }
                while let Ok(session) = done_rx.try_recv() {
                    in_flight -= 1;
                    if let Some(s) = session { busy.remove(&s); }
                }
            }
            _ = nap(sleep_for) => {}
            r = worker.changed(), if worker_alive => { if r.is_err() { worker_alive = false; } }
            r = stop.changed() => { if r.is_err() { break; } }
        }
    }
    receiving.set(false);
    while in_flight > 0 {
        if done_rx.recv().await.is_none() {
            break;
        }
        in_flight -= 1;
    }
}

async fn deliver(
    shared: Arc<Shared>,
    spec: Arc<QueueSpec>,
    instance: usize,
    settler: Settler,
    m: Message,
    run_for: Duration,
    done: mpsc::UnboundedSender<Option<String>>,
) {
    let body = invoke::payload(&spec, &m, chrono::Utc::now());
    let how = invoke_once(&shared, &spec, instance, &body, run_for).await;
    if let Settlement::Abandon { reason, .. } = &how {
        tracing::warn!(function = %spec.function, message_id = %m.message_id, delivery_count = m.delivery_count, "invocation failed: {reason}");
    }
    settle_all(&settler, &spec, std::slice::from_ref(&m), how).await;
    // Release the slot only once the settlement is written, so a session's
    // next message cannot overtake an abandoned one.
    let _ = done.send(m.session_id);
}

/// Invokes the handler with `body` (twice at once under duplicate-delivery
/// faults) within `run_for`, and says how the delivered messages are settled.
async fn invoke_once(shared: &Shared, spec: &QueueSpec, instance: usize, body: &serde_json::Value, run_for: Duration) -> Settlement {
    let target = &shared.instances[instance];
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

/// The batch loop of a `"cardinality": "many"` function on one instance: one
/// invocation at a time, each with what could be received up to
/// maxMessageBatchSize. Below minMessageBatchSize, what was received waits
/// (locked) for more, at most maxBatchWaitTime, then goes as a partial batch.
/// A session queue's batch holds one session's messages, and the session just
/// served is taken again while it has any.
async fn run_batches(shared: Arc<Shared>, spec: Arc<QueueSpec>, instance: usize, settler: Settler, mut stop: watch::Receiver<bool>) {
    let mut worker = shared.instances[instance].state.clone();
    let mut worker_alive = true;
    let options = shared.config.batches;
    let sessions = spec.trigger.sessions;
    // Batches get no lock renewal: the whole batch must finish within one lock.
    let lock = spec.trigger.settings.lock_duration;
    let run_for = shared.config.function_timeout.map_or(lock, |t| t.min(lock));
    let lock_for = run_for + Duration::from_secs(5);
    let queue = spec.trigger.queue.clone();
    let mut held: Vec<Message> = Vec::new();
    let mut held_since: Option<tokio::time::Instant> = None;
    let mut session: Option<String> = None;
    let mut receiving = Receiving { spec: &spec, counted: false };
    loop {
        if *stop.borrow() {
            break;
        }
        let mut sleep_for = None;
        receiving.set(shared.instances[instance].ready());
        if receiving.counted {
            let store = shared.store.clone();
            let q = queue.clone();
            let room = options.max_size - held.len();
            let among = spec.receiving.load(Relaxed);
            let only = held.first().and_then(|m| m.session_id.clone());
            let prefer = only.clone().or_else(|| session.clone());
            let received = tokio::task::spawn_blocking(move || {
                if sessions {
                    store.receive_session_batch(&q, room, prefer.as_deref(), only.is_none(), lock_for, now_ms())
                } else {
                    store.receive(&q, Take { max: room, among }, None, lock_for, now_ms())
                }
            })
            .await;
            match received_from(&queue, received) {
                Some(r) => {
                    let (next_due, left) = (r.next_due, r.left);
                    held.extend(r.messages);
                    let waited = held_since.is_some_and(|t| t.elapsed() >= options.max_wait);
                    if !held.is_empty() && (held.len() >= options.min_size || waited) {
                        receiving.set(false);
                        session = held[0].session_id.clone();
                        held_since = None;
                        let batch = std::mem::take(&mut held);
                        deliver_batch(&shared, &spec, instance, &settler, batch, run_for).await;
                        continue;
                    }
                    let wait_for_more = (!held.is_empty()).then(|| {
                        let since = *held_since.get_or_insert_with(tokio::time::Instant::now);
                        options.max_wait.saturating_sub(since.elapsed())
                    });
                    sleep_for = look_again_in(next_due, left, wait_for_more);
                }
                None => sleep_for = Some(RECEIVE_AGAIN),
            }
        }
        tokio::select! {
            _ = spec.wakes[instance].notified() => {}
            _ = nap(sleep_for) => {}
            r = worker.changed(), if worker_alive => { if r.is_err() { worker_alive = false; } }
            r = stop.changed() => { if r.is_err() { break; } }
        }
    }
    receiving.set(false);
    // Held back for a fuller batch and never delivered: let them go uncounted.
    settle_all(&settler, &spec, &held, Settlement::Release).await;
}

/// One batch invocation, then every message settled as it went.
async fn deliver_batch(shared: &Shared, spec: &QueueSpec, instance: usize, settler: &Settler, batch: Vec<Message>, run_for: Duration) {
    let body = invoke::batch_payload(spec, &batch, chrono::Utc::now());
    let how = invoke_once(shared, spec, instance, &body, run_for).await;
    if let Settlement::Abandon { reason, .. } = &how {
        tracing::warn!(function = %spec.function, messages = batch.len(), "batch invocation failed, every message abandoned: {reason}");
    }
    settle_all(settler, spec, &batch, how).await;
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

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

    #[tokio::test]
    async fn nothing_is_delivered_while_the_handler_is_down() {
        let app = app(&[("lookup", "ticket-lookup", false, 2)]);
        let (handler, calls) = fake_handler(|_, _| ok_json()).await;
        let (core, state) = core(app.path(), &app.path().join("data"), &handler, WorkerState::Starting).await;
        send(&core.url, "ticket-lookup", r#"{"MessageId":"x"}"#, "x").await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(calls.lock().unwrap().is_empty());
        state.send(WorkerState::Ready).unwrap();
        eventually("delivered once ready", || calls.lock().unwrap().len() == 1).await;
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
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        state.send(WorkerState::Down("exited".into())).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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
