//! A batch: one client's upload of tickets, paid within one budget.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ids::{BatchId, ClientId};
use super::money::{Currency, Money, WrongCurrency};
use super::upload::BatchRequest;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub batch_id: BatchId,
    pub client_id: ClientId,
    pub currency: Currency,
    /// The most this batch may pay, and what is reserved or paid so far (never
    /// above it): minor units of `currency`, as the stores keep them. Everything
    /// else reads them as [`Money`] ([`Batch::budget`], [`Batch::budget_state`]).
    pub(crate) budget: i64,
    pub(crate) committed: i64,
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

    pub fn budget(&self) -> Money {
        Money::new(self.budget, self.currency)
    }

    /// Reserved or paid so far.
    pub fn committed(&self) -> Money {
        Money::new(self.committed, self.currency)
    }

    pub fn remaining(&self) -> Money {
        Money::new(self.budget - self.committed, self.currency)
    }

    /// Its budget as it stands.
    pub fn budget_state(&self) -> Budget {
        Budget { total: self.budget(), committed: self.committed() }
    }

    /// Takes what `budget` has committed, once moved by its rules.
    pub fn commit(&mut self, budget: Budget) -> Result<(), WrongCurrency> {
        if budget.committed.currency != self.currency {
            return Err(WrongCurrency { expected: self.currency, found: budget.committed.currency });
        }
        self.committed = budget.committed.minor;
        Ok(())
    }
}

/// A batch's budget at one moment: what it may pay, and how much of that is
/// reserved or paid, in the batch's currency. Both stores move it by these
/// rules and no others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub total: Money,
    pub committed: Money,
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
    pub fn reserve(self, amount: Money) -> Result<Budget, BudgetError> {
        let minor = self.minor_of(amount)?;
        if minor < 0 {
            return Err(BudgetError::Invalid(format!("a reservation of {amount}")));
        }
        match self.committed.minor.checked_add(minor) {
            Some(committed) if committed <= self.total.minor => Ok(self.committing(committed)),
            _ => Err(BudgetError::Insufficient),
        }
    }

    /// Gives back what a ticket holds (`held`, as recorded for it), all of it and
    /// named as `amount`. A ticket holding nothing gave it back before: no change.
    pub fn release(self, held: Money, amount: Money) -> Result<Budget, BudgetError> {
        let (held_minor, minor) = (self.minor_of(held)?, self.minor_of(amount)?);
        if held_minor == 0 {
            return Ok(self);
        }
        if minor != held_minor {
            return Err(BudgetError::Invalid(format!("releasing {amount} of a ticket holding {held}")));
        }
        if minor < 0 || minor > self.committed.minor {
            return Err(BudgetError::Invalid(format!("releasing {amount} of {} committed", self.committed)));
        }
        Ok(self.committing(self.committed.minor - minor))
    }

    fn committing(self, minor: i64) -> Budget {
        Budget { committed: Money::new(minor, self.total.currency), ..self }
    }

    fn minor_of(self, amount: Money) -> Result<i64, BudgetError> {
        if amount.currency == self.total.currency {
            Ok(amount.minor)
        } else {
            Err(BudgetError::Invalid(WrongCurrency { expected: self.total.currency, found: amount.currency }.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur(minor: i64) -> Money {
        Money::new(minor, Currency::parse("EUR").unwrap())
    }

    fn budget(total: i64, committed: i64) -> Budget {
        Budget { total: eur(total), committed: eur(committed) }
    }

    #[test]
    fn a_reservation_fits_what_is_left_or_is_refused() {
        let b = budget(1_000, 600);
        assert_eq!(b.reserve(eur(400)), Ok(budget(1_000, 1_000)));
        assert_eq!(b.reserve(eur(401)), Err(BudgetError::Insufficient));
        assert_eq!(budget(i64::MAX, i64::MAX - 1).reserve(eur(2)), Err(BudgetError::Insufficient));
        assert!(matches!(b.reserve(eur(-1)), Err(BudgetError::Invalid(_))));
        let usd = Money::new(1, Currency::parse("USD").unwrap());
        assert!(matches!(b.reserve(usd), Err(BudgetError::Invalid(e)) if e.contains("USD")), "another currency is no reservation");
    }

    #[test]
    fn a_release_gives_back_exactly_what_its_ticket_holds() {
        let b = budget(1_000, 600);
        assert_eq!(b.release(eur(250), eur(250)), Ok(budget(1_000, 350)));
        assert_eq!(b.release(eur(0), eur(250)), Ok(b), "given back before");
        assert!(matches!(b.release(eur(250), eur(300)), Err(BudgetError::Invalid(_))), "more than the ticket holds");
        assert!(matches!(b.release(eur(700), eur(700)), Err(BudgetError::Invalid(_))), "more than is committed");
        assert!(matches!(b.release(eur(-5), eur(-5)), Err(BudgetError::Invalid(_))));
    }
}
