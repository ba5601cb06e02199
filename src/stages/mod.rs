//! The pipeline: one file per stage, each reading like the business step.
//!
//! Every stage follows the same rules, kept here so the stage files need not:
//! - a message names a ticket and the attempt it was sent for; a message that
//!   no longer matches the ticket (a redelivery, a duplicate) only makes sure
//!   the message the ticket is waiting for exists, and changes nothing;
//! - a ticket changes by a conditional write, and only then is the next
//!   message sent, with a deterministic MessageId so re-sends are dropped;
//! - every provider exchange is recorded, whether or not the change lands;
//! - transient failures are retried by a scheduled copy of the message with
//!   exponential backoff and jitter, then the ticket is parked with its reason.

mod journal;
mod lookup;
mod notify;
mod pay;
mod reserve;
pub mod spool;
pub mod sweep;
#[cfg(test)]
mod tests;
mod upload;
mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::bus::{Bus, BusError, OutgoingMessage};
use crate::domain::ticket::{AfterFailure, Claim, Operation};
use crate::domain::{BatchId, Event, EventKind, Exchange, Money, RetryPolicy, Stage, Ticket, TicketId, WrongCurrency};
use crate::providers::client::{CallError, Caller, Providers};
use crate::providers::wire::OperationRequest;
use crate::store::{BudgetChange, Store, StoreError, TicketUpdate, Versioned};

/// The body of every stage message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageMessage {
    pub batch_id: BatchId,
    pub ticket_id: TicketId,
    pub attempt: u32,
    /// How many times this message was put off because the store or the bus
    /// failed (not the ticket's own attempts): the backoff grows with it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub deferrals: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Why an invocation failed: the host abandons the message and redelivers it.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Another invocation is sending this ticket's operation right now.
    #[error("another invocation holds the ticket until {until}")]
    Busy { until: chrono::DateTime<Utc> },
}

/// An amount in another currency than its ticket's: the data is wrong, for good.
impl From<WrongCurrency> for StageError {
    fn from(e: WrongCurrency) -> StageError {
        StageError::Store(StoreError::Invalid(e.to_string()))
    }
}

/// One invocation's run of at-most-once operations on a ticket (a payment's
/// steps, a notification): the version last stored, the ticket as the run has
/// moved it since, and the exchanges not stored yet.
///
/// One claim covers the operations sent in a row: written before the first is
/// sent, it names the next operation to send, and says that it and those after
/// it (in the same direction: forward, or undoing) may have gone out. So the
/// run writes again only to renew an ageing claim, to turn from paying to
/// undoing, and at its end.
struct Run {
    stored: Versioned<Ticket>,
    ticket: Ticket,
    exchanges: Vec<Event>,
    /// How many of `exchanges` are noted with their answers in the journal.
    noted: usize,
    /// When the claim this run holds was stamped, once it holds one.
    claimed: Option<chrono::DateTime<Utc>>,
    /// An earlier run's answers were lost: each operation is asked for by key
    /// before it is sent, until one turns out never applied.
    asking: bool,
}

impl Run {
    fn new(stored: Versioned<Ticket>) -> Run {
        Run { ticket: stored.value.clone(), stored, exchanges: Vec::new(), noted: 0, claimed: None, asking: false }
    }

    /// Notes the answers not stored yet, before another call goes out: should
    /// the process stop first, they are recorded as they came.
    fn note_answers(&mut self, spool: &spool::AuditSpool) {
        spool.answered(&self.exchanges[self.noted..]);
        self.noted = self.exchanges.len();
    }
}

/// What an invocation did, for the host's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// The stage ran; the ticket as it now stands.
    Done(Box<Ticket>),
    /// The message was not the one the ticket waits for: nothing changed.
    Stale,
    /// Another invocation is working on the ticket; this message comes back to check on it later.
    Deferred,
    UnknownTicket,
}

pub struct Pipeline {
    pub store: Arc<dyn Store>,
    /// Audit records the store could not take yet; stored as soon as it is back.
    pub spool: Arc<spool::AuditSpool>,
    pub bus: Arc<dyn Bus>,
    pub providers: Arc<dyn Providers>,
    pub retry: RetryPolicy,
    pub sweep: sweep::SweepPolicy,
    /// How long a claim on an at-most-once operation protects its claimant.
    /// Longer than any one provider call may take, limiter wait included.
    pub claim_lease: Duration,
}

/// What lookup recorded as owed: a ticket past lookup without it is a defect,
/// never a reason to check or hold nothing.
fn amount_due(ticket: &Ticket, stage: Stage) -> Result<Money, StageError> {
    let (b, t) = (&ticket.batch_id, &ticket.ticket_id);
    ticket.amount_due().ok_or_else(|| StoreError::Invalid(format!("ticket {b}/{t} reached {stage} with no amount due")).into())
}

/// The message that moves a ticket into `stage`, for `attempt`.
pub fn message_for(ticket: &Ticket, stage: Stage, attempt: u32, not_before: Option<chrono::DateTime<Utc>>) -> OutgoingMessage {
    let body = StageMessage { batch_id: ticket.batch_id.clone(), ticket_id: ticket.ticket_id.clone(), attempt, deferrals: 0 };
    OutgoingMessage {
        queue: stage.queue(),
        message_id: match ticket.redrives {
            0 => format!("{}:{}:{}:{attempt}", ticket.batch_id, ticket.ticket_id, stage.function()),
            n => format!("{}:{}:{}:{attempt}:r{n}", ticket.batch_id, ticket.ticket_id, stage.function()),
        },
        session_id: stage.uses_sessions().then(|| ticket.batch_id.to_string()),
        correlation_id: Some(format!("{}:{}", ticket.batch_id, ticket.ticket_id)),
        scheduled_at: not_before.filter(|at| *at > Utc::now()),
        properties: BTreeMap::from([
            ("batch_id".to_owned(), ticket.batch_id.to_string()),
            ("ticket_id".to_owned(), ticket.ticket_id.to_string()),
            ("client_id".to_owned(), ticket.client_id.to_string()),
            ("stage".to_owned(), stage.function().to_owned()),
            ("attempt".to_owned(), attempt.to_string()),
        ]),
        body: serde_json::to_vec(&body).expect("a stage message serialises"),
    }
}

impl StageError {
    /// Whether trying again later can help; a permanent error is final at once.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Store(e) => e.is_transient(),
            Self::Bus(e) => e.is_transient(),
            Self::Busy { .. } => true,
        }
    }
}

/// The most a message is put off at a time while the store or the bus is down,
/// and how many times, before it is left to the broker (and then the sweep).
const MAX_DEFERRAL: Duration = Duration::from_secs(60);
const MAX_DEFERRALS: u32 = 30;
/// How soon a message put off by its batch comes back.
const PUT_OFF: Duration = Duration::from_secs(2);
/// When the copy of a message handed off by its batch comes back: past the
/// longest a stage may still take (four calls in a row, each within its slot
/// wait and timeout).
const HANDED_OFF_RECHECK: Duration = Duration::from_secs(60);

/// Reservations of one session's invocation read, planned or settled at once.
const SESSION_IN_FLIGHT: usize = 16;

/// Where a message finds its ticket.
enum Begun {
    /// Waiting for this message: the stage runs.
    Current(Box<Versioned<Ticket>>),
    /// Not waiting for it: nothing to do.
    Finished(Handled),
}

/// A message of a session's reservations on its way: the ticket as it was
/// before, and how far it got.
enum Planned {
    Finished(Handled),
    Ran(Box<Ticket>, Box<Result<Versioned<Ticket>, StageError>>),
    Reserve(Box<Ticket>, Box<reserve::Reservation>),
}

impl Handled {
    /// What the invocation came to, for its span: the ticket's new status, or
    /// `retry` / `notified`, `stale`, `deferred`, `unknown_ticket`.
    pub fn outcome(&self, stage: Stage) -> String {
        match self {
            Handled::Done(t) if t.pending().is_some_and(|p| p.stage == stage) => "retry".into(),
            Handled::Done(_) if stage == Stage::Notify => "notified".into(),
            Handled::Done(t) => t.status().to_string(),
            Handled::Stale => "stale".into(),
            Handled::Deferred => "deferred".into(),
            Handled::UnknownTicket => "unknown_ticket".into(),
        }
    }
}

impl Pipeline {
    pub async fn handle(&self, stage: Stage, message: StageMessage) -> Result<Handled, StageError> {
        let current = match self.begin(stage, &message).await? {
            Begun::Current(current) => *current,
            Begun::Finished(handled) => return Ok(handled),
        };
        let ticket = current.value.clone();
        let after = match stage {
            Stage::Lookup => lookup::run(self, current).await,
            Stage::Validate => validate::run(self, current).await,
            Stage::Reserve => reserve::run(self, current).await,
            Stage::Pay => pay::run(self, current).await,
            Stage::Notify => notify::run(self, current).await,
        };
        self.finish(stage, &message, &ticket, after).await
    }

    /// A session's messages of one invocation, in order, each in its own span, each
    /// handled as [`Self::handle`] would. Reservations are made together: their
    /// budget is moved once, in the messages' order.
    pub async fn handle_session(&self, stage: Stage, messages: &[(StageMessage, tracing::Span)]) -> Vec<Result<Handled, StageError>> {
        if stage == Stage::Reserve {
            return self.reserve_all(messages).await;
        }
        let mut handled = Vec::with_capacity(messages.len());
        for (message, span) in messages {
            handled.push(self.handle(stage, message.clone()).instrument(span.clone()).await);
        }
        handled
    }

    async fn reserve_all(&self, messages: &[(StageMessage, tracing::Span)]) -> Vec<Result<Handled, StageError>> {
        let stage = Stage::Reserve;
        let planned: Vec<Result<Planned, StageError>> = futures::stream::iter(messages.iter().cloned())
            .map(|(message, span)| {
                async move {
                    let current = match self.begin(stage, &message).await? {
                        Begun::Current(current) => *current,
                        Begun::Finished(handled) => return Ok(Planned::Finished(handled)),
                    };
                    let before = Box::new(current.value.clone());
                    Ok(match reserve::plan(self, current).await {
                        Ok(reserve::Plan::Reserve(r)) => Planned::Reserve(before, r),
                        Ok(reserve::Plan::Decided(ended)) => Planned::Ran(before, Box::new(Ok(*ended))),
                        Err(e) => Planned::Ran(before, Box::new(Err(e))),
                    })
                }
                .instrument(span)
            })
            .buffered(SESSION_IN_FLIGHT)
            .collect()
            .await;
        let updates: Vec<TicketUpdate> = planned
            .iter()
            .filter_map(|p| match p {
                Ok(Planned::Reserve(_, r)) => {
                    Some(self.ticket_update(&r.current, r.ticket.clone(), Some(BudgetChange::Reserve(r.amount)), &[], r.events.clone()))
                }
                _ => None,
            })
            .collect();
        let mut held = self.store.update_tickets(updates).await.into_iter();
        futures::stream::iter(planned.into_iter().zip(messages.iter().cloned()))
            .map(|(p, (message, span))| {
                // Taken here, in the messages' order, as the store answered them.
                let took = matches!(p, Ok(Planned::Reserve(..))).then(|| {
                    held.next().unwrap_or_else(|| Err(StoreError::Unavailable("the store answered fewer changes than it was given".into())))
                });
                async move {
                    match (p?, took) {
                        (Planned::Finished(handled), _) => Ok(handled),
                        (Planned::Ran(before, after), _) => self.finish(stage, &message, &before, *after).await,
                        (Planned::Reserve(before, r), took) => {
                            let held = took.unwrap_or_else(|| Err(StoreError::Unavailable("no answer from the store".into())));
                            let after = reserve::settle(self, r, held.map_err(StageError::from)).await;
                            self.finish(stage, &message, &before, after).await
                        }
                    }
                }
                .instrument(span)
            })
            .buffered(SESSION_IN_FLIGHT)
            .collect()
            .await
    }

    /// The ticket a message names, if the message is the one it waits for;
    /// otherwise what the message came to (the message it waits for is sent again).
    async fn begin(&self, stage: Stage, message: &StageMessage) -> Result<Begun, StageError> {
        let Some(current) = self.store.ticket(&message.batch_id, &message.ticket_id).await? else {
            return Ok(Begun::Finished(Handled::UnknownTicket));
        };
        tracing::Span::current().record("client_id", current.value.client_id.as_str());
        let waiting = current.value.pending();
        let is_current = waiting.as_ref().is_some_and(|p| p.stage == stage && message.attempt >= p.attempt);
        if !is_current {
            self.send_pending(&current.value).await?;
            return Ok(Begun::Finished(Handled::Stale));
        }
        Ok(Begun::Current(Box::new(current)))
    }

    /// After a stage ran on `ticket`: its next message sent, its batch completed if
    /// it was the last; a ticket moved on by someone else is followed.
    async fn finish(&self, stage: Stage, message: &StageMessage, ticket: &Ticket, after: Result<Versioned<Ticket>, StageError>) -> Result<Handled, StageError> {
        let after = match after {
            Err(StageError::Busy { until }) => {
                // If the claimant died, this copy resolves the operation once its claim lapses.
                // Scheduled times have whole seconds on the wire: aim past the lapse, never before it.
                let after_lapse = until + chrono::Duration::seconds(2);
                let mut recheck = message_for(ticket, stage, message.attempt, Some(after_lapse));
                recheck.message_id = format!("{}:recheck:{}", recheck.message_id, uuid::Uuid::new_v4().simple());
                self.bus.send(&recheck).await?;
                return Ok(Handled::Deferred);
            }
            Err(StageError::Store(StoreError::Conflict(_))) => {
                // Someone else moved this ticket on first; follow their state.
                match self.store.ticket(&message.batch_id, &message.ticket_id).await? {
                    Some(t) => t,
                    None => return Ok(Handled::UnknownTicket),
                }
            }
            other => other?,
        };
        self.send_pending(&after.value).await?;
        if after.value.pending().is_none() {
            self.complete_if_done(&after.value.batch_id).await?;
        }
        Ok(Handled::Done(Box::new(after.value)))
    }

    /// Records the batch's completion once its last ticket has ended and been told
    /// (however its notification ended: sent, refused, or given up).
    pub async fn complete_if_done(&self, batch_id: &BatchId) -> Result<(), StoreError> {
        if !self.store.has_open_tickets(batch_id).await? {
            self.store.mark_completed(batch_id, Utc::now()).await?;
        }
        Ok(())
    }

    /// The store or the bus failed for this message: a copy comes back later, with
    /// a backoff that grows with each deferral, instead of the broker's immediate
    /// redelivery that would spend every delivery of a short outage at once.
    /// `false` when the copy cannot be sent either (or deferrals are used up).
    pub async fn defer(&self, stage: Stage, message: &StageMessage) -> bool {
        if message.deferrals >= MAX_DEFERRALS {
            return false;
        }
        let delay = Duration::from_secs(1u64 << message.deferrals.min(6)).min(MAX_DEFERRAL);
        let copy = StageMessage { deferrals: message.deferrals + 1, ..message.clone() };
        self.send_copy(stage, copy, delay, "deferred").await
    }

    /// A message its batch had no time left for: a copy comes back shortly,
    /// unchanged, without counting as a failure of any kind.
    pub async fn put_off(&self, stage: Stage, message: &StageMessage) -> bool {
        self.send_copy(stage, message.clone(), PUT_OFF, "put-off").await
    }

    /// A message still running when its batch answered: a copy comes back
    /// once the work should be long done, to find the ticket moved on or to
    /// do the work again if this process died meanwhile.
    pub async fn hand_off(&self, stage: Stage, message: &StageMessage) -> bool {
        self.send_copy(stage, message.clone(), HANDED_OFF_RECHECK, "handed-off").await
    }

    /// Sends `copy` to `stage`'s queue about `delay` from now (with jitter), under a MessageId of its own.
    async fn send_copy(&self, stage: Stage, copy: StageMessage, delay: Duration, why: &str) -> bool {
        let jittered = delay.mul_f64(0.5 + 0.5 * rand::random::<f64>());
        let at = Utc::now() + chrono::Duration::from_std(jittered).unwrap_or_default();
        let out = OutgoingMessage {
            queue: stage.queue(),
            message_id: format!("{}:{}:{}:{why}:{}", copy.batch_id, copy.ticket_id, stage.function(), uuid::Uuid::new_v4().simple()),
            session_id: stage.uses_sessions().then(|| copy.batch_id.to_string()),
            correlation_id: Some(format!("{}:{}", copy.batch_id, copy.ticket_id)),
            scheduled_at: Some(at),
            properties: BTreeMap::from([
                ("batch_id".to_owned(), copy.batch_id.to_string()),
                ("ticket_id".to_owned(), copy.ticket_id.to_string()),
                ("stage".to_owned(), stage.function().to_owned()),
                ("attempt".to_owned(), copy.attempt.to_string()),
            ]),
            body: serde_json::to_vec(&copy).expect("a stage message serialises"),
        };
        self.bus.send(&out).await.is_ok()
    }

    /// A permanent error: the ticket is parked at once with the reason, for an
    /// operator, instead of being retried. `false` if even that cannot be written.
    pub async fn park_for_good(&self, stage: Stage, message: &StageMessage, error: &StageError) -> bool {
        let Ok(Some(current)) = self.store.ticket(&message.batch_id, &message.ticket_id).await else {
            return false;
        };
        let mut ticket = current.value.clone();
        if ticket.status().is_end() {
            return false;
        }
        let now = Utc::now();
        ticket.slot_mut(stage).release_claim();
        ticket.park(stage, format!("{stage}: {error}; needs an operator"), now);
        match self.commit(&current, ticket, None, Vec::new(), Vec::new()).await {
            Ok(after) => self.send_pending(&after.value).await.is_ok(),
            Err(_) => false,
        }
    }

    /// Sends a parked ticket back into the pipeline at the stage where it stopped,
    /// recording who asked in its audit trail.
    /// `None` if the ticket is not (or no longer) parked.
    pub async fn redrive(&self, current: Versioned<Ticket>) -> Result<Option<Stage>, StageError> {
        let mut ticket = current.value.clone();
        let parked_because = ticket.reason().unwrap_or_default().to_owned();
        let Ok(stage) = ticket.redrive(Utc::now()) else {
            return Ok(None);
        };
        let redriven = self.event(&ticket, stage, EventKind::Redriven { to_stage: stage, parked_because });
        let after = self.commit(&current, ticket, None, Vec::new(), vec![redriven]).await?;
        self.store.reopen(&after.value.batch_id).await?;
        self.send_pending(&after.value).await?;
        Ok(Some(stage))
    }

    /// Sends the message the ticket is waiting for (a no-op for the broker if it was sent before).
    pub async fn send_pending(&self, ticket: &Ticket) -> Result<(), BusError> {
        match ticket.pending() {
            Some(p) => self.bus.send(&message_for(ticket, p.stage, p.attempt, p.not_before)).await,
            None => Ok(()),
        }
    }

    /// Writes the ticket's new state with its events. When the change cannot land
    /// (a conflict, the store busy or down) the exchanges are still recorded,
    /// because they happened: now if the store takes them, else from the spool
    /// as soon as it is back.
    async fn commit(
        &self,
        current: &Versioned<Ticket>,
        ticket: Ticket,
        budget: Option<BudgetChange>,
        exchanges: Vec<Event>,
        events: Vec<Event>,
    ) -> Result<Versioned<Ticket>, StageError> {
        let update = self.ticket_update(current, ticket, budget, &exchanges, events);
        match self.store.update_ticket(update).await {
            Err(e) => {
                self.record_anyway(exchanges).await;
                Err(e.into())
            }
            Ok(after) => {
                self.spool.settle(&exchanges);
                Ok(after)
            }
        }
    }

    /// A ticket's change as the store takes it: its exchanges and events, and the
    /// status change if there is one.
    fn ticket_update(&self, current: &Versioned<Ticket>, ticket: Ticket, budget: Option<BudgetChange>, exchanges: &[Event], mut events: Vec<Event>) -> TicketUpdate {
        let from = current.value.status();
        if ticket.status() != from {
            let kind = EventKind::StatusChanged { from, to: ticket.status(), reason: ticket.reason().map(str::to_owned) };
            events.push(self.event(&ticket, from.stage(), kind));
        }
        let mut all = exchanges.to_vec();
        all.extend(events);
        TicketUpdate { ticket, etag: current.etag.clone(), budget, events: all }
    }

    async fn record_anyway(&self, exchanges: Vec<Event>) {
        if exchanges.is_empty() {
            return;
        }
        if let Err(e) = self.store.append_events(&exchanges).await {
            tracing::warn!(error = %e, "the store cannot take {} provider exchange(s) now; they wait in the spool", exchanges.len());
            self.spool.keep(exchanges.clone()).await;
        }
        self.spool.settle(&exchanges);
    }

    /// A transient failure: schedule the next attempt, or park the ticket with the reason.
    async fn retry_later(
        &self,
        current: &Versioned<Ticket>,
        mut ticket: Ticket,
        error: String,
        at_least: Duration,
        exchanges: Vec<Event>,
    ) -> Result<Versioned<Ticket>, StageError> {
        let now = Utc::now();
        let delay = self.retry.delay(ticket.failures + 1, rand::random::<f64>(), at_least);
        let stage = current.value.status().stage();
        let mut events = Vec::new();
        ticket.slot_mut(stage).release_claim();
        match ticket.fail_transiently(error.clone(), &self.retry, delay, now) {
            AfterFailure::RetryAt(at) => {
                events.push(self.event(&ticket, stage, EventKind::RetryScheduled { attempt: ticket.attempt, retry_at: at, error }))
            }
            AfterFailure::Parked if ticket.status().is_end() && ticket.notified => events.push(
                self.event(&ticket, stage, EventKind::Notified { outcome: ticket.notification.clone().unwrap_or_default() }),
            ),
            AfterFailure::Parked => {}
        }
        self.commit(current, ticket, None, exchanges, events).await
    }

    /// Sends an operation of `run` that must be applied at most once. The run
    /// claims the ticket before its first request; an operation whose answer
    /// an earlier run lost is asked for by key first (answered `Ok` if it was
    /// applied, and then the next one is asked for too).
    async fn send_once(&self, run: &mut Run, stage: Stage, operation: Operation, request: &OperationRequest) -> Result<Result<(), CallError>, StageError> {
        let now = Utc::now();
        match run.claimed {
            Some(at) if now - at <= self.claim_renewal() => {}
            // Renewed once no longer young, so no call leaves near the end of the
            // lease and nobody who finds it lapsed asks while a call is on its way.
            Some(_) => self.claim(run, stage, operation).await?,
            None => match run.ticket.slot(stage).claim_on(operation, now, self.claim_lease) {
                Claim::Held { until } => return Err(StageError::Busy { until }),
                Claim::Free => self.claim(run, stage, operation).await?,
                // Claimed before asking, so two runs never ask (and then send) at once.
                Claim::Unknown => {
                    self.claim(run, stage, operation).await?;
                    run.asking = true;
                }
            },
        }
        let (key, provider) = (run.ticket.operation_key(operation), operation.provider());
        if run.asking {
            let status = self.providers.operation_status(provider, &key, &Caller::of(&run.ticket, stage)).await;
            run.exchanges.push(self.exchange_event(&run.ticket, stage, status.exchange));
            match status.result {
                Ok(Some(_)) => return Ok(Ok(())),
                Ok(None) => run.asking = false,
                Err(e) => return Ok(Err(e)),
            }
        }
        let call = self.providers.operate(provider, operation.name(), &key, request, &Caller::of(&run.ticket, stage)).await;
        run.exchanges.push(self.exchange_event(&run.ticket, stage, call.exchange));
        Ok(call.result.map(drop))
    }

    /// How old a run's claim may get before it is written again.
    fn claim_renewal(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.claim_lease / 4).unwrap_or_default()
    }

    /// Claims `operation` (and those after it) for `run`, with what the run did so far.
    async fn claim(&self, run: &mut Run, stage: Stage, operation: Operation) -> Result<(), StageError> {
        let now = Utc::now();
        run.ticket.slot_mut(stage).claim(operation, now);
        run.noted = 0;
        run.stored = self.commit(&run.stored, run.ticket.clone(), None, std::mem::take(&mut run.exchanges), Vec::new()).await?;
        // A claim is stamped before it is written. One that a slow store kept until it
        // was no longer young may lapse while its call is on the way, and whoever finds
        // it lapsed would ask, hear "never applied", and send again: nothing is sent
        // under it. It lapses on its own, and the next run asks first.
        let took = Utc::now() - now;
        if took > self.claim_renewal() {
            let error = format!("the store took {} ms to record the claim on {operation}", took.num_milliseconds());
            return Err(StoreError::Unavailable(error).into());
        }
        run.claimed = Some(now);
        Ok(())
    }

    fn event(&self, ticket: &Ticket, stage: Stage, kind: EventKind) -> Event {
        Event::new(&ticket.batch_id, &ticket.ticket_id, stage, kind, Utc::now())
    }

    fn exchange_event(&self, ticket: &Ticket, stage: Stage, exchange: Exchange) -> Event {
        Event::new(&ticket.batch_id, &ticket.ticket_id, stage, EventKind::Exchange(Arc::new(exchange)), Utc::now())
    }
}
