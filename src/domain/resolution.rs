//! What an operator may do with a ticket the machine cannot settle, and what
//! each action does to it. Pure: the API reads the ticket, applies the action
//! here, and writes the result with its audit event.
//!
//! Actions either record a fact learnt from the provider (`confirmed_applied`,
//! `confirmed_not_applied`, `undone_by_hand`, which leave the ticket parked
//! with the question settled) or decide its future (`redrive`, `give_up`), or
//! say that a person has seen it (`acknowledge`). None may make the budget lie:
//! a ticket gives up its reservation only once nothing it paid is still
//! applied at a provider, and an outcome that is unknown must be confirmed
//! before anything else is decided.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::money::Money;
use super::ticket::{Operation, Stage, State, Status, Ticket};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The provider applied the operation whose answer was lost (with its reference).
    ConfirmedApplied,
    /// The provider never applied the operation whose answer was lost.
    ConfirmedNotApplied,
    /// The compensation a provider refused was done by hand (a refund at the gateway's console...).
    UndoneByHand,
    /// Send the parked ticket back into the pipeline where it stopped.
    Redrive,
    /// End the ticket: what it paid is undone first, then it ends `failed` and releases its reservation.
    GiveUp,
    /// A person has looked (a duplicate, a disagreement settled outside): nothing changes.
    Acknowledge,
}

impl Action {
    pub const ALL: [Action; 6] = [
        Self::ConfirmedApplied,
        Self::ConfirmedNotApplied,
        Self::UndoneByHand,
        Self::Redrive,
        Self::GiveUp,
        Self::Acknowledge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConfirmedApplied => "confirmed_applied",
            Self::ConfirmedNotApplied => "confirmed_not_applied",
            Self::UndoneByHand => "undone_by_hand",
            Self::Redrive => "redrive",
            Self::GiveUp => "give_up",
            Self::Acknowledge => "acknowledge",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The last decision a person took on a ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    pub action: Action,
    /// The name of the key that took it.
    pub by: String,
    pub note: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_reference: Option<String>,
    pub at: DateTime<Utc>,
}

/// Why a ticket needs a person, if it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Concern {
    /// Parked with a payment operation sent and its answer never known.
    UnknownOutcome,
    /// Parked because a provider refused to undo a step of a declined payment.
    RefusedCompensation,
    /// Parked because its message was lost again and again.
    Stalled,
    /// Parked after its retries ran out.
    Parked,
    /// Paid, or being paid, in another batch, and nobody has looked yet.
    Duplicate,
}

impl Ticket {
    /// Why this ticket waits for a person, if it does.
    pub fn concern(&self) -> Option<Concern> {
        match self.status() {
            Status::Parked if self.pay.slot.is_unknown() => Some(Concern::UnknownOutcome),
            Status::Parked if self.pay.failure.is_some() && self.pay.next_compensation().is_some() => Some(Concern::RefusedCompensation),
            Status::Parked if self.reason().is_some_and(|r| r.contains(": stalled,")) => Some(Concern::Stalled),
            Status::Parked => Some(Concern::Parked),
            Status::Duplicate if self.resolution.is_none() => Some(Concern::Duplicate),
            _ => None,
        }
    }

    /// The actions open to this ticket; `disagreeing`: the last reconciliation
    /// found the providers' records and ours apart on it.
    pub fn open_actions(&self, disagreeing: bool) -> Vec<Action> {
        let mut actions = match self.concern() {
            Some(Concern::UnknownOutcome) => vec![Action::ConfirmedApplied, Action::ConfirmedNotApplied],
            Some(Concern::RefusedCompensation) => vec![Action::UndoneByHand, Action::Redrive],
            // What the step after a confirmed one did is learnt by going on, not by giving up.
            Some(Concern::Stalled | Concern::Parked) if self.pay.slot.ask_first => vec![Action::Redrive],
            Some(Concern::Stalled | Concern::Parked) => vec![Action::Redrive, Action::GiveUp],
            Some(Concern::Duplicate) => vec![Action::Acknowledge],
            None => Vec::new(),
        };
        if disagreeing && !actions.contains(&Action::Acknowledge) && self.status().is_end() && self.status() != Status::Parked {
            actions.push(Action::Acknowledge);
        }
        actions
    }

    /// Applies an operator's action, already checked against [`Ticket::open_actions`].
    /// Returns the minor units to give back to the budget, if any.
    pub fn resolve(&mut self, resolution: Resolution) -> Result<Resolved, String> {
        let now = resolution.at;
        let mut resolved = Resolved { release: self.money(0), redriven_to: None, parked_because: self.reason().unwrap_or_default().to_owned() };
        match resolution.action {
            Action::ConfirmedApplied => {
                let operation = self.in_flight()?;
                let provider = operation.provider();
                match self.pay.failure {
                    None => self.pay.done += 1,
                    Some(_) => self.pay.undone += 1,
                }
                self.pay.slot.clear_claim();
                self.pay.slot.ask_first = self.pay.next_operation().is_some();
                let reference = resolution.provider_reference.as_deref().unwrap_or_default();
                self.settled(format!("{operation} at {provider} confirmed applied by {} ({reference})", resolution.by), now);
            }
            Action::ConfirmedNotApplied => {
                let operation = self.in_flight()?;
                let provider = operation.provider();
                self.pay.slot.clear_claim();
                self.settled(format!("{operation} at {provider} confirmed not applied by {}", resolution.by), now);
            }
            Action::UndoneByHand => {
                let step = self.pay.next_compensation().ok_or("nothing is left to undo")?;
                self.pay.undone += 1;
                self.pay.slot.clear_claim();
                let undo = step.compensation();
                self.settled(format!("{undo} at {} done by hand, says {}", step.provider(), resolution.by), now);
            }
            Action::Redrive => resolved.redriven_to = Some(self.redrive(now)?),
            Action::GiveUp => {
                let why = format!("given up by {}: {}", resolution.by, resolution.note);
                if self.pay.failure.is_none() && self.pay.done > 0 {
                    // Steps were applied: the pipeline undoes them, then ends it `failed` and releases.
                    self.pay.failure = Some(why);
                    resolved.redriven_to = Some(self.redrive(now)?);
                } else {
                    resolved.release = self.release_reservation();
                    self.pay.slot.clear_claim();
                    self.tell_again();
                    self.move_to(State::Failed { reason: why }, now);
                }
            }
            Action::Acknowledge => {}
        }
        self.resolution = Some(resolution);
        Ok(resolved)
    }

    /// The payment operation whose outcome is unknown.
    fn in_flight(&self) -> Result<Operation, String> {
        Ok(self.pay.slot.in_flight.ok_or("no operation is in flight")?)
    }

    /// A fact is settled; the ticket stays parked for the next decision.
    fn settled(&mut self, what: String, now: DateTime<Utc>) {
        self.state = State::Parked { stage: Stage::Pay, reason: format!("{what}; redrive to go on, or give up") };
        self.updated_at = now;
    }

    /// Its client is told the new outcome as news, under a key of its own.
    fn tell_again(&mut self) {
        self.redrives += 1;
        self.notified = false;
        self.notification = None;
        self.notice.clear_claim();
    }
}

/// What the store must do besides writing the ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Given back to the batch budget.
    pub release: Money,
    /// Where the ticket re-entered the pipeline, if it did.
    pub redriven_to: Option<Stage>,
    /// Its reason before the action.
    pub parked_because: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ticket::tests::{op, ticket};
    use crate::domain::RetryPolicy;

    fn by(action: Action) -> Resolution {
        Resolution { action, by: "ops".into(), note: "called them".into(), provider_reference: Some("gw-1".into()), at: Utc::now() }
    }

    /// Parked at pay with `done` steps applied and `operation` sent, its answer lost.
    fn unknown(done: u8, operation: &str) -> Ticket {
        let operation = op(operation);
        let mut t = ticket(Status::Pay);
        t.hold(t.money(900)).unwrap();
        t.pay.done = done;
        t.pay.slot.claim(operation, Utc::now());
        t.pay.slot.release_claim();
        let policy = RetryPolicy { max_attempts: 1, ..RetryPolicy::default() };
        t.fail_transiently("outcome unknown".into(), &policy, std::time::Duration::ZERO, Utc::now());
        t.notified = true;
        t
    }

    fn refused_refund() -> Ticket {
        let mut t = ticket(Status::Parked);
        t.hold(t.money(900)).unwrap();
        t.pay.done = 1;
        t.pay.failure = Some("settlement declined".into());
        t.state = State::Parked { stage: Stage::Pay, reason: "gateway refused refund".into() };
        t
    }

    #[test]
    fn each_kind_of_ticket_offers_only_its_actions() {
        assert_eq!(unknown(0, "capture").open_actions(false), [Action::ConfirmedApplied, Action::ConfirmedNotApplied]);
        assert_eq!(refused_refund().open_actions(false), [Action::UndoneByHand, Action::Redrive]);
        let mut parked = ticket(Status::Parked);
        parked.state = State::Parked { stage: Stage::Lookup, reason: "lookup: timed out".into() };
        assert_eq!(parked.open_actions(false), [Action::Redrive, Action::GiveUp]);
        assert_eq!(ticket(Status::Duplicate).open_actions(false), [Action::Acknowledge]);
        assert!(ticket(Status::Paid).open_actions(false).is_empty());
        assert_eq!(ticket(Status::Paid).open_actions(true), [Action::Acknowledge], "a disagreement is acknowledged");
        assert!(ticket(Status::Pay).open_actions(true).is_empty(), "a ticket on its way is left to the pipeline");
    }

    #[test]
    fn a_confirmed_capture_counts_as_done_and_the_redrive_goes_on_with_settle() {
        let mut t = unknown(0, "capture");
        t.resolve(by(Action::ConfirmedApplied)).unwrap();
        assert_eq!((t.status(), t.pay.done, t.reserved()), (Status::Parked, 1, t.money(900)));
        assert!(!t.pay.slot.is_unknown());
        assert!(t.reason().unwrap().contains("capture at gateway confirmed applied by ops (gw-1)"));
        assert_eq!(t.concern(), Some(Concern::Parked));
        assert_eq!(t.open_actions(false), [Action::Redrive], "settle may have gone out after the capture: going on asks first");
        let done = t.resolve(by(Action::Redrive)).unwrap();
        assert_eq!((t.status(), done.redriven_to), (Status::Pay, Some(Stage::Pay)));
        assert_eq!(t.pay.next_operation(), Some(op("settle")));
        let lease = std::time::Duration::from_secs(60);
        assert_eq!(t.pay.slot.claim_on(op("settle"), Utc::now(), lease), crate::domain::ticket::Claim::Unknown, "the settlement provider is asked about settle first");
    }

    #[test]
    fn the_last_step_confirmed_leaves_nothing_to_ask() {
        let mut t = unknown(3, "issue");
        t.resolve(by(Action::ConfirmedApplied)).unwrap();
        assert_eq!(t.pay.next_operation(), None);
        assert!(t.pay.slot.is_empty());
        assert_eq!(t.open_actions(false), [Action::Redrive, Action::GiveUp]);
    }

    #[test]
    fn a_capture_confirmed_not_applied_is_sent_again_on_redrive_or_given_up_with_its_reservation() {
        let mut t = unknown(0, "capture");
        t.resolve(by(Action::ConfirmedNotApplied)).unwrap();
        assert_eq!((t.pay.done, t.pay.slot.in_flight), (0, None));
        let mut again = t.clone();
        again.resolve(by(Action::Redrive)).unwrap();
        assert_eq!(again.pay.next_operation(), Some(op("capture")));
        let done = t.resolve(by(Action::GiveUp)).unwrap();
        assert_eq!((t.status(), t.reserved(), done.release, t.notified), (Status::Failed, t.money(0), t.money(900), false));
        assert!(t.reason().unwrap().starts_with("given up by ops: called them"));
        assert!(t.operation_key(op("notify")).ends_with(":notify:r1"), "the client hears the new outcome as news");
    }

    #[test]
    fn giving_up_a_ticket_with_applied_steps_undoes_them_through_the_pipeline() {
        let mut t = unknown(2, "post");
        t.resolve(by(Action::ConfirmedNotApplied)).unwrap();
        let done = t.resolve(by(Action::GiveUp)).unwrap();
        assert_eq!((t.status(), done.release, t.reserved()), (Status::Pay, t.money(0), t.money(900)), "the reservation stays until the steps are undone");
        assert_eq!(t.pay.next_operation(), Some(op("cancel")));
    }

    #[test]
    fn a_refused_refund_done_by_hand_leaves_the_ticket_to_end_failed_on_redrive() {
        let mut t = refused_refund();
        t.resolve(by(Action::UndoneByHand)).unwrap();
        assert_eq!((t.pay.undone, t.pay.next_compensation()), (1, None));
        assert!(t.reason().unwrap().contains("refund at gateway done by hand"));
        assert_eq!(t.open_actions(false), [Action::Redrive, Action::GiveUp]);
        let done = t.resolve(by(Action::GiveUp)).unwrap();
        assert_eq!((t.status(), done.release), (Status::Failed, t.money(900)));
    }

    #[test]
    fn an_acknowledged_duplicate_no_longer_needs_anyone() {
        let mut t = ticket(Status::Duplicate);
        t.resolve(by(Action::Acknowledge)).unwrap();
        assert_eq!((t.status(), t.concern()), (Status::Duplicate, None));
        assert_eq!(t.resolution.as_ref().unwrap().by, "ops");
    }
}
