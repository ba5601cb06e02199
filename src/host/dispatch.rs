//! Delivery: one dispatcher task per queue-triggered function takes visible
//! messages under a peek-lock (respecting maxConcurrentCalls, and for session
//! queues one message per session and maxConcurrentSessions), invokes the
//! handler, and settles each delivery. Settlements are written in batches.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::invoke::{self, InvokeError};
use super::queue::{Message, Settled, Settlement, Store, now_ms};
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
            .map(|spec| tokio::spawn(run_queue(shared.clone(), spec.clone(), settler.clone(), stop_rx.clone())))
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
    fn start(store: Store) -> (Settler, JoinHandle<()>) {
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

async fn run_queue(shared: Arc<Shared>, spec: Arc<QueueSpec>, settler: Settler, mut stop: watch::Receiver<bool>) {
    let mut worker = shared.worker.clone();
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

    loop {
        if *stop.borrow() {
            break;
        }
        let mut sleep_for = None;
        if shared.handler_ready() && in_flight < limit {
            let store = shared.store.clone();
            let q = queue.clone();
            let max = limit - in_flight;
            let busy_now = sessions.then(|| busy.clone());
            let received = tokio::task::spawn_blocking(move || store.receive(&q, max, busy_now.as_ref(), lock_for, now_ms())).await;
            match received {
                Ok(Ok(r)) => {
                    if r.expired > 0 {
                        tracing::warn!(queue = %queue, "{} expired message(s) moved to the dead-letter queue", r.expired);
                    }
                    for m in r.messages {
                        in_flight += 1;
                        if let Some(s) = &m.session_id {
                            busy.insert(s.clone());
                        }
                        tokio::spawn(deliver(shared.clone(), spec.clone(), settler.clone(), m, run_for, done_tx.clone()));
                    }
                    sleep_for = r.next_due.map(|t| Duration::from_millis((t - now_ms()).max(0) as u64));
                }
                Ok(Err(e)) => {
                    tracing::error!(queue = %queue, "cannot receive: {e:#}");
                    sleep_for = Some(Duration::from_secs(1));
                }
                Err(e) => {
                    tracing::error!(queue = %queue, "receive task failed: {e}");
                    sleep_for = Some(Duration::from_secs(1));
                }
            }
        }
        let sleep = async {
            match sleep_for {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = spec.wake.notified() => {}
            Some(session) = done_rx.recv() => {
                in_flight -= 1;
                if let Some(s) = session { busy.remove(&s); }
                while let Ok(session) = done_rx.try_recv() {
                    in_flight -= 1;
                    if let Some(s) = session { busy.remove(&s); }
                }
            }
            _ = sleep => {}
            r = worker.changed(), if worker_alive => { if r.is_err() { worker_alive = false; } }
            r = stop.changed() => { if r.is_err() { break; } }
        }
    }
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
    settler: Settler,
    m: Message,
    run_for: Duration,
    done: mpsc::UnboundedSender<Option<String>>,
) {
    let result = tokio::time::timeout(run_for, invoke::invoke(&shared.client, &shared.handler_url, &spec, &m)).await;
    let how = match result {
        Ok(Ok(())) => Settlement::Complete,
        Ok(Err(InvokeError::NotDelivered(e))) => {
            tracing::debug!(function = %spec.function, message_id = %m.message_id, "handler not reachable ({e}); message released");
            Settlement::Release
        }
        Ok(Err(InvokeError::Failed(e))) => {
            tracing::warn!(function = %spec.function, message_id = %m.message_id, delivery_count = m.delivery_count, "invocation failed: {e}");
            Settlement::Abandon { max_delivery_count: spec.trigger.settings.max_delivery_count, reason: e }
        }
        Err(_) => {
            let e = format!("invocation timed out after {run_for:?}");
            tracing::warn!(function = %spec.function, message_id = %m.message_id, delivery_count = m.delivery_count, "{e}");
            Settlement::Abandon { max_delivery_count: spec.trigger.settings.max_delivery_count, reason: e }
        }
    };
    match settler.settle(m.sequence_number, m.lock_token.clone(), how).await {
        Some(Settled::DeadLettered) => tracing::warn!(
            function = %spec.function, queue = %spec.trigger.queue, message_id = %m.message_id,
            "message moved to the dead-letter queue after {} deliveries", m.delivery_count
        ),
        Some(Settled::LockLost) => {
            tracing::warn!(function = %spec.function, message_id = %m.message_id, "lock lost before settlement")
        }
        _ => {}
    }
    // Release the slot only once the settlement is written, so a session's
    // next message cannot overtake an abandoned one.
    let _ = done.send(m.session_id);
}
