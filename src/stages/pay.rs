//! Pay: post to the four payment providers in order (capture, settle, post,
//! issue), each once, with an idempotency key per step. A step declined for
//! good undoes the steps already done, in reverse order (refund, cancel,
//! reverse, void), and gives the reservation back to the budget.

use chrono::Utc;

use super::{Pipeline, Sent, StageError};
use crate::domain::money::format_minor;
use crate::domain::{Event, EventKind, Stage, Status, Ticket};
use crate::providers::client::CallError;
use crate::providers::wire::{OperationRequest, WireMoney};
use crate::store::{BudgetChange, Versioned};

pub(super) async fn run(p: &Pipeline, mut current: Versioned<Ticket>) -> Result<Versioned<Ticket>, StageError> {
    let mut claimed_here = false;
    while let Some((step, operation)) = current.value.pay.next_operation() {
        let provider = step.provider();
        let request = operation_request(&current.value);
        let Sent { current: sent, exchanges, result } =
            p.send_once(current, Stage::Pay, provider, operation, &request, claimed_here).await?;
        let mut next = sent.value.clone();
        let now = Utc::now();
        match result {
            Ok(()) => next.pay.applied(now),
            Err(CallError::Permanent { error, .. }) if next.pay.failure.is_none() => {
                next.pay.declined(format!("{provider} declined {operation}: {error}"), now);
            }
            Err(CallError::Permanent { error, .. }) => {
                let reason = format!(
                    "{provider} refused {operation} while undoing a declined payment ({}): {error}; needs an operator",
                    next.pay.failure.as_deref().unwrap_or_default()
                );
                next.pay.slot.clear_claim();
                next.parked_stage = Some(Stage::Pay);
                next.end(Status::Parked, Some(reason), now);
                return p.commit(&sent, next, None, exchanges, Vec::new()).await;
            }
            Err(e @ CallError::Transient { .. }) => {
                let error = format!("outcome unknown at {provider} ({operation}): {e}");
                return p.retry_later(&sent, next, error, e.retry_after(), exchanges).await;
            }
            Err(e) => return p.retry_later(&sent, next, e.to_string(), e.retry_after(), exchanges).await,
        }
        if next.pay.next_operation().is_none() {
            // The last operation answered: the ticket ends in the write that records it.
            return finish(p, &sent, next, exchanges).await;
        }
        current = p.commit(&sent, next, None, exchanges, Vec::new()).await?;
        claimed_here = true;
    }
    finish(p, &current, current.value.clone(), Vec::new()).await
}

/// Every step done: paid. Every done step undone after a decline: failed, and the reservation goes back.
/// `ticket` is `current` with the last operation's answer applied, `exchanges` what it took.
async fn finish(p: &Pipeline, current: &Versioned<Ticket>, mut ticket: Ticket, exchanges: Vec<Event>) -> Result<Versioned<Ticket>, StageError> {
    let amount = ticket.reserved;
    let money = format_minor(amount, ticket.currency);
    let now = Utc::now();
    ticket.reserved = 0;
    match ticket.pay.failure.clone() {
        None => {
            ticket.paid = amount;
            ticket.end(Status::Paid, None, now);
            let paid = p.event(&ticket, Stage::Pay, EventKind::Paid { amount: money });
            p.commit(current, ticket, None, exchanges, vec![paid]).await
        }
        Some(reason) => {
            ticket.end(Status::Failed, Some(reason), now);
            let released = p.event(&ticket, Stage::Pay, EventKind::BudgetReleased { amount: money });
            p.commit(current, ticket, Some(BudgetChange::Release(amount)), exchanges, vec![released]).await
        }
    }
}

fn operation_request(ticket: &Ticket) -> OperationRequest {
    OperationRequest {
        batch_id: ticket.batch_id.to_string(),
        ticket_id: ticket.ticket_id.to_string(),
        client_id: ticket.client_id.to_string(),
        authority: ticket.authority.to_string(),
        amount: WireMoney { minor: ticket.reserved, currency: ticket.currency.code().into() },
        message: None,
    }
}
