//! Pay: post to the four payment providers in order (capture, settle, post,
//! issue), each once, with an idempotency key per step. A step declined for
//! good undoes the steps already done, in reverse order (refund, cancel,
//! reverse, void), and gives the reservation back to the budget.
//!
//! Before an operation is sent, the ticket records it as in flight. If we then
//! lose the answer (timeout, crash, 5xx), the next attempt first asks the
//! provider whether that key was applied, and only sends it again if it was not.

use chrono::Utc;

use super::{Pipeline, StageError};
use crate::domain::money::format_minor;
use crate::domain::{EventKind, Stage, Status, Ticket};
use crate::providers::client::CallError;
use crate::providers::wire::{OperationRequest, WireMoney};
use crate::store::{BudgetChange, Versioned};

pub(super) async fn run(p: &Pipeline, mut current: Versioned<Ticket>) -> Result<Versioned<Ticket>, StageError> {
    // Whether the in-flight operation was claimed by this invocation (so it is known not to be sent yet).
    let mut claimed_here = false;
    loop {
        let ticket = current.value.clone();
        let Some((step, operation)) = ticket.pay.next_operation() else {
            return finish(p, &current).await;
        };
        let provider = step.provider();
        let key = format!("{}:{}:{operation}", ticket.batch_id, ticket.ticket_id);
        let mut exchanges = Vec::new();

        if ticket.pay.in_flight.as_deref() != Some(operation) {
            let mut claimed = ticket.clone();
            claimed.pay.in_flight = Some(operation.to_owned());
            current = p.commit(&current, claimed, None, Vec::new(), Vec::new()).await?;
        } else if !claimed_here {
            let status = p.providers.operation_status(provider, &key, ticket.attempt).await;
            exchanges.push(p.exchange_event(&ticket, Stage::Pay, status.exchange));
            match status.result {
                Ok(Some(_)) => {
                    let mut done = ticket.clone();
                    done.pay.applied();
                    current = p.commit(&current, done, None, exchanges, Vec::new()).await?;
                    claimed_here = true;
                    continue;
                }
                Ok(None) => {}
                Err(e) => return p.retry_later(&current, ticket, e.to_string(), e.retry_after(), exchanges).await,
            }
        }

        let request = operation_request(&current.value);
        let call = p.providers.operate(provider, operation, &key, &request, current.value.attempt).await;
        exchanges.push(p.exchange_event(&current.value, Stage::Pay, call.exchange));
        let mut next = current.value.clone();
        match call.result {
            Ok(_) => next.pay.applied(),
            Err(CallError::Permanent { error, .. }) if next.pay.failure.is_none() => {
                next.pay.declined(format!("{provider} declined {operation}: {error}"));
            }
            Err(CallError::Permanent { error, .. }) => {
                let reason = format!(
                    "{provider} refused {operation} while undoing a declined payment ({}): {error}; needs an operator",
                    next.pay.failure.as_deref().unwrap_or_default()
                );
                next.pay.in_flight = None;
                next.parked_stage = Some(Stage::Pay);
                next.end(Status::Parked, Some(reason), Utc::now());
                return p.commit(&current, next, None, exchanges, Vec::new()).await;
            }
            Err(e) => return p.retry_later(&current, next, e.to_string(), e.retry_after(), exchanges).await,
        }
        current = p.commit(&current, next, None, exchanges, Vec::new()).await?;
        claimed_here = true;
    }
}

/// Every step done: paid. Every done step undone after a decline: failed, and the reservation goes back.
async fn finish(p: &Pipeline, current: &Versioned<Ticket>) -> Result<Versioned<Ticket>, StageError> {
    let mut ticket = current.value.clone();
    let amount = ticket.reserved;
    let money = format_minor(amount, ticket.currency);
    let now = Utc::now();
    ticket.reserved = 0;
    match ticket.pay.failure.clone() {
        None => {
            ticket.paid = amount;
            ticket.end(Status::Paid, None, now);
            let paid = p.event(&ticket, Stage::Pay, EventKind::Paid { amount: money });
            p.commit(current, ticket, None, Vec::new(), vec![paid]).await
        }
        Some(reason) => {
            ticket.end(Status::Failed, Some(reason), now);
            let released = p.event(&ticket, Stage::Pay, EventKind::BudgetReleased { amount: money });
            p.commit(current, ticket, Some(BudgetChange::Release(amount)), Vec::new(), vec![released]).await
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
