//! Sweep: no ticket waits silently. A timer runs it (`functions/sweep`); it
//! finds tickets whose awaited message is overdue (dead-lettered, dropped by
//! duplicate detection, never sent) and sends that message again under a
//! fresh MessageId, or, after [`SweepPolicy::max_resends`] resends without
//! progress, parks the ticket with the reason (an end state that was never
//! told gives up its notification instead). An upload cut short before every
//! ticket was queued is queued whole. It also records the completion of every
//! batch whose last ticket has ended and been told.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Pipeline, StageError, message_for};
use crate::domain::ticket::Overdue;
use crate::domain::{BatchId, EventKind, Ticket};
use crate::store::Versioned;

/// Tickets looked at per run, oldest first: a backlog is worked off over several runs
/// rather than flooding the queues at once.
const TICKETS_PER_RUN: usize = 500;
/// Batches whose completion is checked per run.
const BATCHES_PER_RUN: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepPolicy {
    /// How long past its due time a ticket's message may be missing before it is sent again.
    pub overdue_after: Duration,
    /// Resends without progress before the ticket is parked.
    pub max_resends: u32,
}

impl Default for SweepPolicy {
    fn default() -> Self {
        SweepPolicy { overdue_after: Duration::from_secs(60), max_resends: 5 }
    }
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Swept {
    /// Tickets whose message was sent again.
    pub resent: u32,
    /// Tickets parked (or whose notification was given up) after too many resends.
    pub gave_up: u32,
    /// Batches whose completion was recorded.
    pub completed: u32,
    /// Uploads stored but cut short before every ticket was queued, queued now.
    pub requeued_uploads: u32,
}

/// Where an overdue ticket's upload stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upload {
    /// Never committed: the ticket is a leftover of a failed write.
    Unknown,
    /// Every ticket was queued: an overdue ticket lost its own message.
    Queued,
    /// Cut short before every ticket was queued; queued again by this run.
    Requeued,
}

impl Pipeline {
    pub async fn sweep(&self, now: DateTime<Utc>) -> Result<Swept, StageError> {
        let mut swept = Swept::default();
        let before = now - chrono::Duration::from_std(self.sweep.overdue_after).unwrap_or_default();
        let mut batches: HashMap<BatchId, Upload> = HashMap::new();
        for current in self.store.overdue_tickets(before, TICKETS_PER_RUN).await? {
            let batch_id = current.value.batch_id.clone();
            let upload = match batches.get(&batch_id) {
                Some(u) => *u,
                None => {
                    let upload = self.upload_of(&batch_id).await?;
                    if upload == Upload::Requeued {
                        swept.requeued_uploads += 1;
                    }
                    *batches.entry(batch_id).or_insert(upload)
                }
            };
            // An upload that never committed is no one's to move; one queued again
            // just now sent this ticket's first message.
            if upload != Upload::Queued {
                continue;
            }
            match self.resend_overdue(current, now).await {
                Ok(Overdue::Resend) => swept.resent += 1,
                Ok(Overdue::GiveUp) => swept.gave_up += 1,
                // Moved on meanwhile, or the store or bus failed: the next run looks again.
                Err(e) => tracing::debug!(error = %e, "an overdue ticket was left for the next sweep"),
            }
        }
        for batch in self.store.incomplete_batches(BATCHES_PER_RUN).await? {
            if !self.store.has_open_tickets(&batch.batch_id).await? && self.store.mark_completed(&batch.batch_id, now).await? {
                swept.completed += 1;
            }
        }
        Ok(swept)
    }

    async fn upload_of(&self, batch_id: &BatchId) -> Result<Upload, StageError> {
        Ok(match self.store.batch(batch_id).await? {
            None => Upload::Unknown,
            Some(batch) if batch.enqueued => Upload::Queued,
            Some(batch) => {
                self.enqueue_upload(&batch).await?;
                Upload::Requeued
            }
        })
    }

    async fn resend_overdue(&self, current: Versioned<Ticket>, now: DateTime<Utc>) -> Result<Overdue, StageError> {
        let mut ticket = current.value.clone();
        let Some(pending) = ticket.pending() else { return Ok(Overdue::Resend) };
        let verdict = ticket.overdue(self.sweep.max_resends, now);
        let mut events = Vec::new();
        if verdict == Overdue::GiveUp && ticket.notified {
            let outcome = ticket.notification.clone().unwrap_or_default();
            events.push(self.event(&ticket, pending.stage, EventKind::Notified { outcome }));
        }
        let after = self.commit(&current, ticket, None, Vec::new(), events).await?;
        match verdict {
            Overdue::Resend => {
                let mut message = message_for(&after.value, pending.stage, pending.attempt, None);
                message.message_id = format!("{}:swept:{}", message.message_id, after.value.resends);
                self.bus.send(&message).await?;
            }
            Overdue::GiveUp => {
                self.send_pending(&after.value).await?;
                if after.value.pending().is_none() {
                    self.complete_if_done(&after.value.batch_id).await?;
                }
            }
        }
        Ok(verdict)
    }
}
