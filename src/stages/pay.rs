//! Pay: post to the four payment providers in order (capture, settle, post,
//! issue), each once, with an idempotency key per step. A step declined for
//! good undoes the steps already done, in reverse order (refund, cancel,
//! reverse, void), and gives the reservation back to the budget.

use chrono::Utc;

use super::{Pipeline, Run, StageError};
use crate::domain::{EventKind, Stage, State, Ticket};
use crate::providers::client::CallError;
use crate::providers::wire::{OperationRequest, WireMoney};
use crate::store::{BudgetChange, Versioned};

pub(super) async fn run(p: &Pipeline, current: Versioned<Ticket>) -> Result<Versioned<Ticket>, StageError> {
    let mut run = Run::new(current);
    while let Some(operation) = run.ticket.pay.next_operation() {
        let provider = operation.provider();
        let request = operation_request(&run.ticket);
        let result = p.send_once(&mut run, Stage::Pay, operation, &request).await?;
        let now = Utc::now();
        match result {
            Ok(()) => {
                run.ticket.pay.applied(now);
                run.ticket.progressed();
            }
            Err(CallError::Permanent { error, .. }) if run.ticket.pay.failure.is_none() => {
                run.ticket.pay.declined(format!("{provider} declined {operation}: {error}"), now);
                run.ticket.progressed();
                // A claim covers one direction: undoing starts under a claim of its own.
                if let Some(undo) = run.ticket.pay.next_operation() {
                    p.claim(&mut run, Stage::Pay, undo).await?;
                }
                continue;
            }
            Err(CallError::Permanent { error, .. }) => {
                let reason = format!(
                    "{provider} refused {operation} while undoing a declined payment ({}): {error}; needs an operator",
                    run.ticket.pay.failure.as_deref().unwrap_or_default()
                );
                let Run { stored, mut ticket, exchanges, .. } = run;
                ticket.pay.slot.clear_claim();
                ticket.park(Stage::Pay, reason, now);
                return p.commit(&stored, ticket, None, exchanges, Vec::new()).await;
            }
            Err(e @ CallError::Transient { .. }) => {
                let error = format!("outcome unknown at {provider} ({operation}): {e}");
                return p.retry_later(&run.stored, run.ticket, error, e.retry_after(), run.exchanges).await;
            }
            Err(e) => return p.retry_later(&run.stored, run.ticket, e.to_string(), e.retry_after(), run.exchanges).await,
        }
        if run.ticket.pay.next_operation().is_some() {
            // The next call goes out before this answer is stored: noted meanwhile.
            run.note_answers(&p.spool);
        }
    }
    finish(p, run).await
}

/// Every step done: paid. Every done step undone after a decline: failed, and
/// the reservation goes back. The ticket ends in the write that records the
/// last operation's answer.
async fn finish(p: &Pipeline, run: Run) -> Result<Versioned<Ticket>, StageError> {
    let Run { stored, mut ticket, exchanges, .. } = run;
    let now = Utc::now();
    match ticket.pay.failure.clone() {
        None => {
            let amount = ticket.pay_reservation();
            ticket.move_to(State::Paid, now);
            let paid = p.event(&ticket, Stage::Pay, EventKind::Paid { amount });
            p.commit(&stored, ticket, None, exchanges, vec![paid]).await
        }
        Some(reason) => {
            let amount = ticket.release_reservation();
            ticket.move_to(State::Failed { reason }, now);
            let released = p.event(&ticket, Stage::Pay, EventKind::BudgetReleased { amount });
            p.commit(&stored, ticket, Some(BudgetChange::Release(amount)), exchanges, vec![released]).await
        }
    }
}

fn operation_request(ticket: &Ticket) -> OperationRequest {
    OperationRequest {
        batch_id: ticket.batch_id.to_string(),
        ticket_id: ticket.ticket_id.to_string(),
        client_id: ticket.client_id.to_string(),
        authority: ticket.authority.to_string(),
        amount: WireMoney::from(ticket.reserved()),
        message: None,
    }
}
