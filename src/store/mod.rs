//! The store seam: batches, tickets, the batch budget and the audit log.
//!
//! Shaped for a document database partitioned by batch: every operation
//! touches one batch's partition, a ticket is replaced only if its ETag still
//! matches, and a ticket's change, its budget movement and its events are
//! written together or not at all. [`sqlite::SqliteStore`] is the embedded
//! implementation used by `ticketpay local`; [`cosmos::CosmosStore`] keeps the
//! same contract in Azure Cosmos DB (see `docs/data-model.md`).

pub mod cosmos;
pub mod meter;
pub mod schema;
pub mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;

use chrono::{DateTime, Utc};

use crate::domain::reconciliation::ReconciliationRun;
use crate::domain::{AuthorityCode, Batch, BatchId, BudgetError, ClientId, Event, Money, Stage, Status, Ticket, TicketId};

/// A document with the version it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub etag: String,
}

/// A change to the batch budget made together with a ticket change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetChange {
    /// Hold this much; refused with [`StoreError::InsufficientBudget`] if it does not fit.
    Reserve(Money),
    /// Give back what was held earlier.
    Release(Money),
}

/// A conditional ticket change: applied only if the ticket is still at `etag`.
#[derive(Debug, Clone)]
pub struct TicketUpdate {
    pub ticket: Ticket,
    pub etag: String,
    pub budget: Option<BudgetChange>,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{0} was changed concurrently")]
    Conflict(String),
    #[error("the batch budget cannot cover the reservation")]
    InsufficientBudget,
    #[error("{0} not found")]
    NotFound(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store data is invalid: {0}")]
    Invalid(String),
}

impl StoreError {
    /// Worth trying again later (the pipeline redelivers the message).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Conflict(_))
    }
}

impl From<BudgetError> for StoreError {
    fn from(e: BudgetError) -> StoreError {
        match e {
            BudgetError::Insufficient => StoreError::InsufficientBudget,
            BudgetError::Invalid(why) => StoreError::Invalid(why),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The one batch that may pay a ticket, named by its authority and ticket id,
/// whatever batches the ticket was uploaded in. Taken before any money is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentClaim {
    pub authority: AuthorityCode,
    pub ticket_id: TicketId,
    pub batch_id: BatchId,
    pub claimed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    New,
    /// The client already uploaded with this idempotency key: here is that batch.
    Existing(Batch),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TicketPage {
    pub tickets: Vec<Ticket>,
    pub next_cursor: Option<String>,
}

impl TicketPage {
    /// A page from up to `limit + 1` tickets fetched in id order: the extra one
    /// only says that there is a next page, which starts after the last kept.
    pub fn from_fetched(mut tickets: Vec<Ticket>, limit: usize) -> TicketPage {
        let next_cursor = if tickets.len() > limit {
            tickets.truncate(limit);
            tickets.last().map(|t| t.ticket_id.to_string())
        } else {
            None
        };
        TicketPage { tickets, next_cursor }
    }
}

/// A batch's tickets counted by status, and its money.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchSummary {
    pub counts: BTreeMap<Status, u64>,
    /// Tickets at an end state whose client has not yet been notified.
    pub awaiting_notification: u64,
    pub paid: i64,
    pub reserved: i64,
    /// Tickets not yet told whose next message was due before the cut-off asked for.
    pub overdue: u64,
}

impl BatchSummary {
    pub fn count(&self, status: Status) -> u64 {
        self.counts.get(&status).copied().unwrap_or(0)
    }

    pub fn in_progress(&self) -> u64 {
        self.counts.iter().filter(|(s, _)| !s.is_end()).map(|(_, n)| n).sum()
    }

    /// Every ticket is at an end state and its client was told.
    pub fn is_complete(&self) -> bool {
        self.in_progress() == 0 && self.awaiting_notification == 0
    }

    /// Each stage in pipeline order: the tickets waiting at it, and those past
    /// it (waiting neither there nor earlier). Past notify means done.
    pub fn stages(&self, tickets: u64) -> [StageProgress; 5] {
        let mut waiting_so_far = 0;
        Stage::ALL.map(|stage| {
            let waiting = match stage {
                Stage::Lookup => self.count(Status::Lookup),
                Stage::Validate => self.count(Status::Validate),
                Stage::Reserve => self.count(Status::Reserve),
                Stage::Pay => self.count(Status::Pay),
                Stage::Notify => self.awaiting_notification,
            };
            waiting_so_far += waiting;
            StageProgress { stage, waiting, past: tickets.saturating_sub(waiting_so_far) }
        })
    }
}

/// How far a batch's tickets are with one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageProgress {
    pub stage: Stage,
    pub waiting: u64,
    pub past: u64,
}

/// Each change applied by [`Store::update_ticket`], in order.
pub async fn one_after_another<S: Store + ?Sized>(store: &S, updates: Vec<TicketUpdate>) -> Vec<Result<Versioned<Ticket>>> {
    let mut results = Vec::with_capacity(updates.len());
    for update in updates {
        results.push(store.update_ticket(update).await);
    }
    results
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// What this store's requests have cost so far, for a store that charges for them.
    fn charges(&self) -> Option<meter::Charges> {
        None
    }
    /// Creates the batch, its tickets and their `accepted` events at once, or
    /// nothing. If the batch's client already used its idempotency key, nothing
    /// is written and that batch is returned.
    async fn create_batch(&self, batch: &Batch, tickets: &[Ticket], events: &[Event]) -> Result<Created>;
    async fn batch(&self, batch_id: &BatchId) -> Result<Option<Batch>>;
    /// Records that every ticket's first message was sent.
    async fn mark_enqueued(&self, batch_id: &BatchId) -> Result<()>;
    /// Records completion once; returns whether this call recorded it.
    async fn mark_completed(&self, batch_id: &BatchId, at: chrono::DateTime<chrono::Utc>) -> Result<bool>;
    /// Clears a recorded completion: a ticket of the batch is on its way again (a redrive).
    async fn reopen(&self, batch_id: &BatchId) -> Result<()>;
    /// Batches, newest first, of one client or of all.
    async fn batches(&self, client: Option<&ClientId>, limit: usize) -> Result<Vec<Batch>>;
    async fn ticket(&self, batch_id: &BatchId, ticket_id: &TicketId) -> Result<Option<Versioned<Ticket>>>;
    /// Applies a conditional ticket change with its budget change and events, atomically.
    async fn update_ticket(&self, update: TicketUpdate) -> Result<Versioned<Ticket>>;
    /// Applies changes of one batch's tickets as [`Store::update_ticket`] would,
    /// one after the other in this order (a reservation that does not fit is
    /// refused on its own; a later, smaller one may still fit), each one's
    /// result at its index. A store may move the batch's budget once for all of them.
    async fn update_tickets(&self, updates: Vec<TicketUpdate>) -> Vec<Result<Versioned<Ticket>>> {
        one_after_another(self, updates).await
    }
    /// Appends to the audit log. Append-only: events are never changed.
    async fn append_events(&self, events: &[Event]) -> Result<()>;
    /// A ticket's events in the order they were appended.
    async fn events(&self, batch_id: &BatchId, ticket_id: &TicketId) -> Result<Vec<Event>>;
    /// A page of a batch's tickets ordered by ticket id, optionally of one status.
    async fn tickets(
        &self,
        batch_id: &BatchId,
        status: Option<Status>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<TicketPage>;
    /// The batch's tickets counted, with those waiting for a message due before
    /// `overdue_before` ([`Ticket::due_at`]) among them: one pass over the batch.
    async fn summary(&self, batch_id: &BatchId, overdue_before: chrono::DateTime<chrono::Utc>) -> Result<BatchSummary>;
    /// Whether any of the batch's tickets is not yet at an end state with its client told.
    /// Asked as each ticket ends: it must not cost a count of the batch.
    async fn has_open_tickets(&self, batch_id: &BatchId) -> Result<bool>;
    /// Tickets of any batch still waiting for a message that was due
    /// ([`Ticket::due_at`]) before `before`, oldest first where the store can order them.
    async fn overdue_tickets(&self, before: chrono::DateTime<chrono::Utc>, limit: usize) -> Result<Vec<Versioned<Ticket>>>;
    /// Batches whose completion is not recorded yet.
    async fn incomplete_batches(&self, limit: usize) -> Result<Vec<Batch>>;
    /// Tickets carrying this reference, across batches (support looks them up
    /// this way), of one client or of all.
    async fn find_by_reference(&self, reference: &str, client: Option<&ClientId>, limit: usize) -> Result<Vec<Ticket>>;
    /// The payment claim on a ticket, whichever batch holds it.
    async fn payment_claim(&self, authority: &AuthorityCode, ticket_id: &TicketId) -> Result<Option<Versioned<PaymentClaim>>>;
    /// Takes the payment claim for `claim.batch_id`, atomically: with `over` as
    /// `None` only if nobody holds it, otherwise only if it is still the version
    /// read as `over`. [`StoreError::Conflict`] when someone else got there first.
    async fn take_payment_claim(&self, claim: &PaymentClaim, over: Option<&str>) -> Result<Versioned<PaymentClaim>>;
    /// Records a reconciliation run of a batch. Runs are never changed.
    async fn record_reconciliation(&self, run: &ReconciliationRun) -> Result<()>;
    /// A batch's recorded reconciliation runs, newest first.
    async fn reconciliations(&self, batch_id: &BatchId, limit: usize) -> Result<Vec<ReconciliationRun>>;
    /// Gives the claim up if it is still as it was taken; `false` when it has
    /// changed hands since (or is gone), and then nothing is changed.
    async fn release_payment_claim(&self, claim: &Versioned<PaymentClaim>) -> Result<bool>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_counts_as_past_once_no_ticket_waits_at_it_or_before_it() {
        let summary = BatchSummary {
            counts: [(Status::Lookup, 2), (Status::Pay, 3), (Status::Paid, 4), (Status::Rejected, 1)].into(),
            awaiting_notification: 2,
            paid: 0,
            reserved: 0,
            overdue: 0,
        };
        let progress = summary.stages(10).map(|p| (p.stage, p.waiting, p.past));
        assert_eq!(
            progress,
            [
                (Stage::Lookup, 2, 8),
                (Stage::Validate, 0, 8),
                (Stage::Reserve, 0, 8),
                (Stage::Pay, 3, 5),
                (Stage::Notify, 2, 3),
            ]
        );
    }
}
