//! Lookup: ask the issuing authority how much is due, one ticket per request.

use chrono::Utc;

use super::{Pipeline, StageError};
use crate::domain::{Stage, Status, Ticket};
use crate::providers::client::{CallError, Caller};
use crate::providers::wire::DueStatus;
use crate::store::Versioned;

pub(super) async fn run(p: &Pipeline, current: Versioned<Ticket>) -> Result<Versioned<Ticket>, StageError> {
    let mut ticket = current.value.clone();
    let caller = Caller::of(&current.value, Stage::Lookup);
    let call = p.providers.lookup(ticket.authority.as_str(), ticket.currency.code(), &caller).await;
    let exchanges = vec![p.exchange_event(&ticket, Stage::Lookup, call.exchange)];
    let now = Utc::now();
    match call.result {
        Ok(answer) if answer.status == DueStatus::NothingDue || answer.amount_due.minor == 0 => {
            ticket.amount_due = Some(0);
            ticket.end(Status::NotPayable, Some("the authority says nothing is due".into()), now);
        }
        Ok(answer) if answer.amount_due.currency != ticket.currency.code() => {
            let reason = format!("the authority asks for {}, the batch pays in {}", answer.amount_due.currency, ticket.currency);
            ticket.end(Status::NotPayable, Some(reason), now);
        }
        Ok(answer) if answer.amount_due.minor < 0 => {
            ticket.end(Status::NotPayable, Some(format!("the authority answered a negative amount ({})", answer.amount_due.minor)), now);
        }
        Ok(answer) => {
            ticket.amount_due = Some(answer.amount_due.minor);
            ticket.move_to(Status::Validate, now);
        }
        Err(CallError::Permanent { status: 404, .. }) => {
            ticket.end(Status::NotPayable, Some("the authority does not know this ticket".into()), now);
        }
        Err(CallError::Permanent { error, .. }) => {
            ticket.parked_stage = Some(Stage::Lookup);
            ticket.end(Status::Parked, Some(format!("lookup refused: {error}")), now);
        }
        Err(e) => return p.retry_later(&current, ticket, e.to_string(), e.retry_after(), exchanges).await,
    }
    p.commit(&current, ticket, None, exchanges, Vec::new()).await
}
