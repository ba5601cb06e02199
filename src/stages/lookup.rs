//! Lookup: ask the issuing authority how much is due, one ticket per request.

use chrono::Utc;

use super::{Pipeline, StageError};
use crate::domain::{Due, Stage, State, Ticket};
use crate::providers::client::{CallError, Caller};
use crate::store::Versioned;

pub(super) async fn run(p: &Pipeline, current: Versioned<Ticket>) -> Result<Versioned<Ticket>, StageError> {
    let mut ticket = current.value.clone();
    let caller = Caller::of(&current.value, Stage::Lookup);
    let call = p.providers.lookup(ticket.authority.as_str(), ticket.currency, &caller).await;
    let exchanges = vec![p.exchange_event(&ticket, Stage::Lookup, call.exchange)];
    let now = Utc::now();
    match call.result {
        Ok(Due::Owed(amount)) => {
            ticket.owes(amount)?;
            ticket.move_to(State::waiting_for(Stage::Validate), now);
        }
        Ok(Due::Nothing) => {
            ticket.owes(ticket.money(0))?;
            ticket.move_to(State::NotPayable { reason: "the authority says nothing is due".into() }, now);
        }
        Ok(Due::Unpayable(reason)) => ticket.move_to(State::NotPayable { reason }, now),
        Err(CallError::Permanent { status: 404, .. }) => {
            ticket.move_to(State::NotPayable { reason: "the authority does not know this ticket".into() }, now);
        }
        Err(CallError::Permanent { error, .. }) => {
            ticket.park(Stage::Lookup, format!("lookup refused: {error}"), now);
        }
        Err(e) => return p.retry_later(&current, ticket, e.to_string(), e.retry_after(), exchanges).await,
    }
    p.commit(&current, ticket, None, exchanges, Vec::new()).await
}
