//! Reserve: hold the amount due from the batch budget, atomically with the
//! ticket's move to payment. Messages of one batch arrive one at a time (a
//! session per batch), so reservations never race for the same budget.

use chrono::Utc;

use super::{Pipeline, StageError};
use crate::domain::money::format_minor;
use crate::domain::{EventKind, Stage, Status, Ticket};
use crate::store::{BudgetChange, StoreError, Versioned};

pub(super) async fn run(p: &Pipeline, current: Versioned<Ticket>) -> Result<Versioned<Ticket>, StageError> {
    let mut ticket = current.value.clone();
    let amount = ticket.amount_due.unwrap_or(0);
    let now = Utc::now();
    ticket.reserved = amount;
    ticket.move_to(Status::Pay, now);
    let held = vec![p.event(&ticket, Stage::Reserve, EventKind::BudgetReserved { amount: format_minor(amount, ticket.currency) })];
    match p.commit(&current, ticket, Some(BudgetChange::Reserve(amount)), Vec::new(), held).await {
        Err(StageError::Store(StoreError::InsufficientBudget)) => {}
        other => return other,
    }
    let remaining = match p.store.batch(&current.value.batch_id).await? {
        Some(batch) => format_minor(batch.remaining(), batch.currency),
        None => "unknown".into(),
    };
    let mut ticket = current.value.clone();
    let reason = format!("needs {}, the budget has {remaining} left", format_minor(amount, ticket.currency));
    ticket.end(Status::OverBudget, Some(reason), now);
    p.commit(&current, ticket, None, Vec::new(), Vec::new()).await
}
