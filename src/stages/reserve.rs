//! Reserve: make sure no other batch pays this ticket, then hold the amount due
//! from the batch budget, atomically with the ticket's move to payment.
//!
//! Messages of one batch arrive in order, a session's invocation at a time (a
//! session per batch), so reservations never race for the same budget; the
//! messages of one invocation are reserved together, in their order, and move
//! the budget once ([`Pipeline::handle_session`]). Different batches may hold the
//! same ticket (its authority and ticket id) and reserve at the same moment, so
//! the right to pay it is a payment claim in the store, taken by a conditional
//! write before any money is held: whoever loses ends `duplicate`.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Pipeline, StageError};
use crate::domain::ticket::PaidElsewhere;
use crate::domain::{Event, EventKind, Money, Stage, State, Status, Ticket};
use crate::store::{BudgetChange, PaymentClaim, StoreError, Versioned};

/// Takes of a claim lost to a concurrent writer before the message is retried.
const CLAIM_ATTEMPTS: u32 = 5;

pub(super) async fn run(p: &Pipeline, current: Versioned<Ticket>) -> Result<Versioned<Ticket>, StageError> {
    match plan(p, current).await? {
        Plan::Decided(ended) => Ok(*ended),
        Plan::Reserve(r) => {
            let held = p.commit(&r.current, r.ticket.clone(), Some(BudgetChange::Reserve(r.amount)), Vec::new(), r.events.clone()).await;
            settle(p, r, held).await
        }
    }
}

/// What a reservation comes to before the budget is asked.
pub(super) enum Plan {
    /// Decided without the budget: a duplicate, or to be tried again later.
    Decided(Box<Versioned<Ticket>>),
    /// This batch may pay the ticket: hold its amount, or end it over budget.
    Reserve(Box<Reservation>),
}

/// A ticket this batch may pay, moved to payment holding its amount, once the budget takes it.
pub(super) struct Reservation {
    pub current: Versioned<Ticket>,
    pub ticket: Ticket,
    pub amount: Money,
    pub events: Vec<Event>,
    claim: Versioned<PaymentClaim>,
}

/// Takes the ticket's payment claim and makes its reservation, without moving the budget yet.
pub(super) async fn plan(p: &Pipeline, current: Versioned<Ticket>) -> Result<Plan, StageError> {
    let amount = super::amount_due(&current.value, Stage::Reserve)?;
    let claim = match claim_payment(p, &current.value).await? {
        Claimed::Ours(claim) => claim,
        Claimed::Elsewhere(owner) => return end_duplicate(p, &current, &owner).await.map(|ended| Plan::Decided(Box::new(ended))),
        Claimed::Undecided(error) => {
            return p.retry_later(&current, current.value.clone(), error, Duration::ZERO, Vec::new()).await.map(|ended| Plan::Decided(Box::new(ended)));
        }
    };
    let mut ticket = current.value.clone();
    ticket.hold(amount)?;
    ticket.move_to(State::Pay, Utc::now());
    let events = vec![p.event(&ticket, Stage::Reserve, EventKind::BudgetReserved { amount })];
    Ok(Plan::Reserve(Box::new(Reservation { current, ticket, amount, events, claim })))
}

/// The reservation as the budget took it: held, or the ticket ends over budget and
/// its payment claim is given up.
pub(super) async fn settle(p: &Pipeline, r: Box<Reservation>, held: Result<Versioned<Ticket>, StageError>) -> Result<Versioned<Ticket>, StageError> {
    match held {
        Err(StageError::Store(StoreError::InsufficientBudget)) => {}
        other => return other,
    }
    let remaining = match p.store.batch(&r.current.value.batch_id).await? {
        Some(batch) => batch.remaining().to_decimal(),
        None => "unknown".into(),
    };
    let mut ticket = r.current.value.clone();
    let reason = format!("needs {}, the budget has {remaining} left", r.amount.to_decimal());
    ticket.move_to(State::OverBudget { reason }, Utc::now());
    let ended = p.commit(&r.current, ticket, None, Vec::new(), Vec::new()).await?;
    // Another batch may pay it now. Should this fail, the next taker sees
    // `over_budget` here and takes the claim over.
    if let Err(e) = p.store.release_payment_claim(&r.claim).await {
        tracing::warn!(error = %e, "could not release the payment claim of a ticket over budget");
    }
    Ok(ended)
}

enum Claimed {
    /// This batch may pay the ticket.
    Ours(Versioned<PaymentClaim>),
    /// Another batch pays it, or is paying it: its copy of the ticket.
    Elsewhere(Box<Ticket>),
    /// Another batch is still deciding whether it pays it: try again later.
    Undecided(String),
}

/// Takes the ticket's payment claim for this batch: new, already ours (a
/// redelivery), or given up by the batch that held it. Each take is conditional
/// on the version read, so of two batches taking it at once exactly one wins.
async fn claim_payment(p: &Pipeline, ticket: &Ticket) -> Result<Claimed, StageError> {
    let mine = PaymentClaim {
        authority: ticket.authority.clone(),
        ticket_id: ticket.ticket_id.clone(),
        batch_id: ticket.batch_id.clone(),
        claimed_at: Utc::now(),
    };
    let mut over: Option<String> = None;
    for _ in 0..CLAIM_ATTEMPTS {
        match p.store.take_payment_claim(&mine, over.as_deref()).await {
            Ok(claim) => return Ok(Claimed::Ours(claim)),
            Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let Some(held) = p.store.payment_claim(&mine.authority, &mine.ticket_id).await? else {
            over = None;
            continue;
        };
        if held.value.batch_id != mine.batch_id {
            let owner = p.store.ticket(&held.value.batch_id, &mine.ticket_id).await?;
            match owner.map(|o| (hold(&o.value, held.value.claimed_at), o.value)) {
                Some((Hold::Paying, owner)) => return Ok(Claimed::Elsewhere(Box::new(owner))),
                Some((Hold::Deciding, owner)) => {
                    return Ok(Claimed::Undecided(format!("{} is deciding whether it pays this ticket", batch_named(ticket, &owner))));
                }
                Some((Hold::GivenUp, _)) | None => {}
            }
        }
        over = Some(held.etag);
    }
    Err(StoreError::Conflict(format!("payment claim of {}/{} (kept changing)", mine.authority, mine.ticket_id)).into())
}

/// What the batch holding a ticket's payment claim does with it, as its copy of the ticket shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Paid it, or paying it (a parked payment may be redriven).
    Paying,
    /// Not past its own reserve yet: it may pay it, or not.
    Deciding,
    /// Ended without paying: the claim is stale and may be taken over.
    GivenUp,
}

fn hold(owner: &Ticket, claimed_at: DateTime<Utc>) -> Hold {
    match owner.status() {
        Status::Paid | Status::Pay => Hold::Paying,
        Status::Lookup | Status::Validate | Status::Reserve => Hold::Deciding,
        Status::NotPayable | Status::Rejected | Status::OverBudget | Status::Failed | Status::Duplicate => Hold::GivenUp,
        Status::Parked if owner.parked_stage() == Some(Stage::Pay) || owner.reserved().minor > 0 || owner.pay.done > 0 => Hold::Paying,
        // Parked before paying, with nothing done. A claim written after that ticket
        // state was, though, was taken again since (the ticket was redriven): what
        // was read is old news.
        Status::Parked if claimed_at > owner.updated_at => Hold::Deciding,
        Status::Parked => Hold::GivenUp,
    }
}

/// How `ticket`'s client may hear of `other`'s batch: by its id if it is its own.
fn batch_named(ticket: &Ticket, other: &Ticket) -> String {
    if other.client_id == ticket.client_id { format!("batch {}", other.batch_id) } else { "another batch".to_owned() }
}

async fn end_duplicate(p: &Pipeline, current: &Versioned<Ticket>, owner: &Ticket) -> Result<Versioned<Ticket>, StageError> {
    let mut ticket = current.value.clone();
    let how = if owner.status() == Status::Paid { "already paid" } else { "being paid" };
    let reason = format!("{how} in {}", batch_named(&ticket, owner));
    let of = PaidElsewhere { batch_id: owner.batch_id.clone(), client_id: owner.client_id.clone() };
    ticket.move_to(State::Duplicate { of, reason }, Utc::now());
    p.commit(current, ticket, None, Vec::new(), Vec::new()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ticket::tests::{batch_of_one, in_status};
    use crate::domain::{BatchId, ClientId};

    fn owner(status: Status) -> Ticket {
        let now = Utc::now() - chrono::Duration::minutes(5);
        let (batch, line) = batch_of_one(BatchId::parse("b-owner").unwrap(), "acme", 10_000, now);
        let mut t = Ticket::accepted(&batch, line, now);
        t.state = in_status(status);
        t
    }

    #[test]
    fn a_claim_is_given_up_only_by_a_ticket_that_ended_without_paying() {
        let claimed = Utc::now() - chrono::Duration::minutes(10);
        for status in Status::ALL {
            let expected = match status {
                Status::Paid | Status::Pay => Hold::Paying,
                Status::Lookup | Status::Validate | Status::Reserve => Hold::Deciding,
                _ => Hold::GivenUp,
            };
            let mut t = owner(status);
            if status == Status::Parked {
                t.park(Stage::Reserve, "reserve: store down".into(), t.updated_at);
            }
            assert_eq!(hold(&t, claimed), expected, "{status}");
        }
    }

    #[test]
    fn a_parked_payment_keeps_its_claim() {
        let claimed = Utc::now() - chrono::Duration::minutes(10);
        let parked = |f: &dyn Fn(&mut Ticket)| {
            let mut t = owner(Status::Parked);
            t.park(Stage::Reserve, "reserve: store down".into(), t.updated_at);
            f(&mut t);
            hold(&t, claimed)
        };
        assert_eq!(parked(&|t| t.park(Stage::Pay, "pay: gateway down".into(), t.updated_at)), Hold::Paying);
        assert_eq!(parked(&|t| t.hold(t.money(500)).unwrap()), Hold::Paying);
        assert_eq!(parked(&|t| t.pay.done = 1), Hold::Paying);
        assert_eq!(parked(&|_| {}), Hold::GivenUp, "parked before paying, with nothing done");
    }

    #[test]
    fn a_claim_taken_after_the_state_read_is_not_taken_over() {
        let mut t = owner(Status::Parked);
        t.park(Stage::Reserve, "reserve: store down".into(), t.updated_at);
        assert_eq!(hold(&t, t.updated_at - chrono::Duration::seconds(1)), Hold::GivenUp);
        assert_eq!(hold(&t, t.updated_at + chrono::Duration::seconds(1)), Hold::Deciding, "redriven and claimed again since");
    }

    #[test]
    fn another_clients_batch_is_not_named() {
        let own = owner(Status::Paid);
        let mut mine = owner(Status::Reserve);
        mine.batch_id = BatchId::parse("b-mine").unwrap();
        assert_eq!(batch_named(&mine, &own), "batch b-owner");
        mine.client_id = ClientId::parse("globex").unwrap();
        assert_eq!(batch_named(&mine, &own), "another batch");
    }
}
