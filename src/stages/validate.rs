//! Validate: the validators are asked at once; any rejection is final. An
//! approval is kept, so a retry asks only those that have not approved.

use chrono::Utc;
use futures::future::join_all;

use super::{Pipeline, StageError};
use crate::domain::{Stage, State, Ticket};
use crate::providers::client::{CallError, Caller};
use crate::providers::wire::{CheckRequest, Decision, WireMoney};
use crate::providers::ProviderName;
use crate::store::Versioned;

pub(super) async fn run(p: &Pipeline, current: Versioned<Ticket>) -> Result<Versioned<Ticket>, StageError> {
    let mut ticket = current.value.clone();
    let amount = super::amount_due(&ticket, Stage::Validate)?;
    let request = CheckRequest {
        batch_id: ticket.batch_id.to_string(),
        ticket_id: ticket.ticket_id.to_string(),
        client_id: ticket.client_id.to_string(),
        authority: ticket.authority.to_string(),
        amount: WireMoney::from(amount),
    };
    let mut approved_by = ticket.approved_by().to_vec();
    let approved_before = approved_by.len();
    let asked: Vec<ProviderName> = ProviderName::VALIDATORS.into_iter().filter(|v| !approved_by.contains(v)).collect();
    let caller = Caller::of(&current.value, Stage::Validate);
    let calls = join_all(asked.iter().map(|&v| p.providers.check(v, &request, &caller))).await;

    let mut exchanges = Vec::new();
    let mut rejection = None;
    let mut refusal = None;
    let mut transient: Option<CallError> = None;
    for (validator, call) in asked.into_iter().zip(calls) {
        exchanges.push(p.exchange_event(&ticket, Stage::Validate, call.exchange));
        match call.result {
            Ok(answer) if answer.decision == Decision::Reject => {
                let reason = answer.reason.unwrap_or_else(|| "no reason given".into());
                rejection.get_or_insert(format!("{validator}: {reason}"));
            }
            Ok(_) => approved_by.push(validator),
            Err(CallError::Permanent { error, .. }) => {
                refusal.get_or_insert(format!("{validator} refused the check: {error}"));
            }
            Err(e) => {
                let slower = transient.as_ref().is_none_or(|t| e.retry_after() > t.retry_after());
                if slower {
                    transient = Some(e);
                }
            }
        }
    }
    let now = Utc::now();
    if let Some(reason) = rejection {
        ticket.move_to(State::Rejected { reason }, now);
    } else if let Some(reason) = refusal {
        ticket.park(Stage::Validate, reason, now);
    } else if let Some(e) = transient {
        if approved_by.len() > approved_before {
            ticket.progressed();
        }
        approved_by.sort();
        ticket.state = State::Validate { approved_by };
        return p.retry_later(&current, ticket, e.to_string(), e.retry_after(), exchanges).await;
    } else {
        ticket.move_to(State::Reserve, now);
    }
    p.commit(&current, ticket, None, exchanges, Vec::new()).await
}
