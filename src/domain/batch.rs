//! A batch: one client's upload of tickets, paid within one budget.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ids::{BatchId, ClientId};
use super::money::Currency;
use super::upload::BatchRequest;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub batch_id: BatchId,
    pub client_id: ClientId,
    pub currency: Currency,
    /// The most this batch may pay, in minor units.
    pub budget: i64,
    /// Reserved or paid so far; never above `budget`.
    pub committed: i64,
    pub tickets: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Digest of the upload, so a reused Idempotency-Key with another body is refused.
    pub request_digest: String,
    /// Every ticket's first message has been sent.
    pub enqueued: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

impl Batch {
    /// A batch just accepted from an upload, waiting for its tickets to be queued.
    pub fn accepted(batch_id: BatchId, request: &BatchRequest, idempotency_key: Option<String>, now: DateTime<Utc>) -> Batch {
        Batch {
            batch_id,
            client_id: request.client_id.clone(),
            currency: request.currency,
            budget: request.budget.minor,
            committed: 0,
            tickets: request.tickets.len() as u32,
            idempotency_key,
            request_digest: request.digest(),
            enqueued: false,
            completed_at: None,
            created_at: now,
        }
    }

    pub fn remaining(&self) -> i64 {
        self.budget - self.committed
    }

    /// Its budget as it stands.
    pub fn budget_state(&self) -> Budget {
        Budget { total: self.budget, committed: self.committed }
    }
}

/// A batch's budget at one moment: what it may pay, and how much of that is
/// reserved or paid. Both stores move it by these rules and no others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub total: i64,
    pub committed: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error("the batch budget cannot cover the reservation")]
    Insufficient,
    /// A movement no ticket can ask for: the caller is wrong, not the budget.
    #[error("{0}")]
    Invalid(String),
}

impl Budget {
    /// Holds `amount` more, if it fits in what is left.
    pub fn reserve(self, amount: i64) -> Result<Budget, BudgetError> {
        if amount < 0 {
            return Err(BudgetError::Invalid(format!("a reservation of {amount}")));
        }
        match self.committed.checked_add(amount) {
            Some(committed) if committed <= self.total => Ok(Budget { committed, ..self }),
            _ => Err(BudgetError::Insufficient),
        }
    }

    /// Gives back what a ticket holds (`held`, as recorded for it), all of it and
    /// named as `amount`. A ticket holding nothing gave it back before: no change.
    pub fn release(self, held: i64, amount: i64) -> Result<Budget, BudgetError> {
        if held == 0 {
            return Ok(self);
        }
        if amount != held {
            return Err(BudgetError::Invalid(format!("releasing {amount} of a ticket holding {held}")));
        }
        if amount < 0 || amount > self.committed {
            return Err(BudgetError::Invalid(format!("releasing {amount} of {} committed", self.committed)));
        }
        Ok(Budget { committed: self.committed - amount, ..self })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Budget = Budget { total: 1_000, committed: 600 };

    #[test]
    fn a_reservation_fits_what_is_left_or_is_refused() {
        assert_eq!(BUDGET.reserve(400), Ok(Budget { total: 1_000, committed: 1_000 }));
        assert_eq!(BUDGET.reserve(401), Err(BudgetError::Insufficient));
        assert_eq!(Budget { total: i64::MAX, committed: i64::MAX - 1 }.reserve(2), Err(BudgetError::Insufficient));
        assert!(matches!(BUDGET.reserve(-1), Err(BudgetError::Invalid(_))));
    }

    #[test]
    fn a_release_gives_back_exactly_what_its_ticket_holds() {
        assert_eq!(BUDGET.release(250, 250), Ok(Budget { total: 1_000, committed: 350 }));
        assert_eq!(BUDGET.release(0, 250), Ok(BUDGET), "given back before");
        assert!(matches!(BUDGET.release(250, 300), Err(BudgetError::Invalid(_))), "more than the ticket holds");
        assert!(matches!(BUDGET.release(700, 700), Err(BudgetError::Invalid(_))), "more than is committed");
        assert!(matches!(BUDGET.release(-5, -5), Err(BudgetError::Invalid(_))));
    }
}
