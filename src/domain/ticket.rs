//! A ticket's journey: where it is, what it owes, and the rules for moving it on.
//! Pure: no I/O, no clock, no randomness (callers pass `now` and the jitter in).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ids::{AuthorityCode, BatchId, ClientId, Reference, TicketId};
use super::money::{Currency, Money, WrongCurrency};
use super::ProviderName;

/// A pipeline stage: one queue and one function each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Lookup,
    Validate,
    Reserve,
    Pay,
    Notify,
}

impl Stage {
    pub const ALL: [Stage; 5] = [Self::Lookup, Self::Validate, Self::Reserve, Self::Pay, Self::Notify];

    /// The function name, which is also the folder under `functions/`.
    pub fn function(self) -> &'static str {
        match self {
            Self::Lookup => "lookup",
            Self::Validate => "validate",
            Self::Reserve => "reserve",
            Self::Pay => "pay",
            Self::Notify => "notify",
        }
    }

    /// The queue that triggers this stage's function.
    pub fn queue(self) -> String {
        format!("ticket-{}", self.function())
    }

    pub fn from_function(name: &str) -> Option<Stage> {
        Self::ALL.into_iter().find(|s| s.function() == name)
    }

    /// Whether this stage's messages are grouped in sessions (one in flight per batch).
    /// Reservations of one batch run one at a time, so the budget is never contended.
    pub fn uses_sessions(self) -> bool {
        matches!(self, Self::Reserve)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.function())
    }
}

/// Where a ticket is: waiting for a stage, or at one of its end states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Lookup,
    Validate,
    Reserve,
    Pay,
    Paid,
    NotPayable,
    Rejected,
    OverBudget,
    Failed,
    /// The same authority and ticket id is paid, or being paid, in another batch.
    Duplicate,
    Parked,
}

impl Status {
    pub const ALL: [Status; 11] = [
        Self::Lookup,
        Self::Validate,
        Self::Reserve,
        Self::Pay,
        Self::Paid,
        Self::NotPayable,
        Self::Rejected,
        Self::OverBudget,
        Self::Failed,
        Self::Duplicate,
        Self::Parked,
    ];

    /// The end states' names, in the order people read them: every list of end
    /// states (CLI, bench report, tests) is this one.
    pub const END_NAMES: [&'static str; 7] = {
        let mut names = [""; 7];
        let (mut i, mut n) = (0, 0);
        while i < Self::ALL.len() {
            if Self::ALL[i].is_end() {
                names[n] = Self::ALL[i].as_str();
                n += 1;
            }
            i += 1;
        }
        assert!(n == names.len(), "END_NAMES lists every end state");
        names
    };

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Lookup => "lookup",
            Self::Validate => "validate",
            Self::Reserve => "reserve",
            Self::Pay => "pay",
            Self::Paid => "paid",
            Self::NotPayable => "not_payable",
            Self::Rejected => "rejected",
            Self::OverBudget => "over_budget",
            Self::Failed => "failed",
            Self::Duplicate => "duplicate",
            Self::Parked => "parked",
        }
    }

    pub const fn is_end(self) -> bool {
        !matches!(self, Self::Lookup | Self::Validate | Self::Reserve | Self::Pay)
    }

    /// The stage that acts next on a ticket in this status (end states go to notify).
    pub fn stage(self) -> Stage {
        match self {
            Self::Lookup => Stage::Lookup,
            Self::Validate => Stage::Validate,
            Self::Reserve => Stage::Reserve,
            Self::Pay => Stage::Pay,
            _ => Stage::Notify,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown status `{s}`"))
    }
}

/// The four payment postings, in the order they are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayStep {
    Capture,
    Settle,
    Post,
    Issue,
}

impl PayStep {
    pub const ALL: [PayStep; 4] = [Self::Capture, Self::Settle, Self::Post, Self::Issue];

    pub fn provider(self) -> ProviderName {
        match self {
            Self::Capture => ProviderName::Gateway,
            Self::Settle => ProviderName::Settlement,
            Self::Post => ProviderName::Ledger,
            Self::Issue => ProviderName::Receipt,
        }
    }

    pub fn operation(self) -> &'static str {
        match self {
            Self::Capture => "capture",
            Self::Settle => "settle",
            Self::Post => "post",
            Self::Issue => "issue",
        }
    }

    /// The operation that undoes this step.
    pub fn compensation(self) -> &'static str {
        match self {
            Self::Capture => "refund",
            Self::Settle => "cancel",
            Self::Post => "reverse",
            Self::Issue => "void",
        }
    }
}

/// An operation sent at most once: a payment step, the undoing of one, or the
/// notification. Stored, sent and keyed under its name (`capture`, `refund`,
/// `notify`...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Step(PayStep),
    Undo(PayStep),
    Notify,
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Self::Step(step) => step.operation(),
            Self::Undo(step) => step.compensation(),
            Self::Notify => "notify",
        }
    }

    /// The provider it is sent to.
    pub fn provider(self) -> ProviderName {
        match self {
            Self::Step(step) | Self::Undo(step) => step.provider(),
            Self::Notify => ProviderName::Notifier,
        }
    }

    pub fn parse(name: &str) -> Option<Operation> {
        if name == Self::Notify.name() {
            return Some(Self::Notify);
        }
        PayStep::ALL.into_iter().find_map(|step| match name {
            n if n == step.operation() => Some(Self::Step(step)),
            n if n == step.compensation() => Some(Self::Undo(step)),
            _ => None,
        })
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Operation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Operation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Operation::parse(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown operation `{name}`")))
    }
}

/// One operation that must be applied at most once, recorded before it is
/// sent. Until its answer is recorded its outcome is unknown (timeout, crash,
/// 5xx), so the provider is asked by idempotency key before it is sent again.
/// The payment and the notification each have their own: a notification never
/// touches what is known of a payment step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationSlot {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<Operation>,
    /// When a live invocation claimed the in-flight operation. Cleared when that
    /// invocation gives up (its answer was lost): then anyone may resolve it.
    /// A claim older than the lease belongs to an invocation that died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_at: Option<DateTime<Utc>>,
    /// The next operation may have gone out though nothing is in flight: a
    /// claim covers the operations after the one it names, and a person
    /// settled only that one. The provider is asked before it is sent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ask_first: bool,
}

impl OperationSlot {
    pub fn is_empty(&self) -> bool {
        self.in_flight.is_none() && self.claimed_at.is_none() && !self.ask_first
    }

    /// Records `operation` as about to be sent by the caller.
    pub fn claim(&mut self, operation: Operation, now: DateTime<Utc>) {
        self.in_flight = Some(operation);
        self.claimed_at = Some(now);
        self.ask_first = false;
    }

    /// The claimant lost the answer and stops: the outcome stays unknown, for anyone to resolve.
    pub fn release_claim(&mut self) {
        self.claimed_at = None;
    }

    /// The operation's answer is recorded: nothing is in flight.
    pub fn clear_claim(&mut self) {
        self.in_flight = None;
        self.claimed_at = None;
        self.ask_first = false;
    }

    /// Whether an operation was sent and its answer never recorded.
    pub fn is_unknown(&self) -> bool {
        self.in_flight.is_some() && self.claimed_at.is_none()
    }

    /// Who may act on `operation` now.
    pub fn claim_on(&self, operation: Operation, now: DateTime<Utc>, lease: Duration) -> Claim {
        if self.ask_first {
            return Claim::Unknown;
        }
        if self.in_flight != Some(operation) {
            return Claim::Free;
        }
        let lease = chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        match self.claimed_at {
            Some(at) if now < at + lease => Claim::Held { until: at + lease },
            _ => Claim::Unknown,
        }
    }
}

/// How far the payment has gone. Steps are done in order; compensation undoes
/// the done steps in reverse order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayProgress {
    /// Steps completed, from the first.
    pub done: u8,
    /// The payment step (or compensation) in flight.
    #[serde(flatten)]
    pub slot: OperationSlot,
    /// Set once a step failed permanently: from then on we only undo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Compensations completed, counted back from the last done step.
    pub undone: u8,
}

impl PayProgress {
    pub fn next_step(&self) -> Option<PayStep> {
        PayStep::ALL.get(usize::from(self.done)).copied()
    }

    /// What to send next: a step forward, or (after a failure) a step to undo.
    pub fn next_operation(&self) -> Option<Operation> {
        match &self.failure {
            None => self.next_step().map(Operation::Step),
            Some(_) => self.next_compensation().map(Operation::Undo),
        }
    }

    /// What may follow `from` in its direction: a claim on it covers these too.
    pub fn operations_from(&self, from: Operation) -> Vec<Operation> {
        let mut left = self.clone();
        let mut out = Vec::new();
        while let Some(op) = left.next_operation() {
            if op == from || !out.is_empty() {
                out.push(op);
            }
            match left.failure {
                None => left.done += 1,
                Some(_) => left.undone += 1,
            }
        }
        out
    }

    /// The operation in flight was applied: count it and claim the next one.
    pub fn applied(&mut self, now: DateTime<Utc>) {
        match self.failure {
            None => self.done += 1,
            Some(_) => self.undone += 1,
        }
        self.claim_next(now);
    }

    /// A step was declined for good: from now on, undo what was done.
    pub fn declined(&mut self, reason: String, now: DateTime<Utc>) {
        self.failure = Some(reason);
        self.claim_next(now);
    }

    fn claim_next(&mut self, now: DateTime<Utc>) {
        match self.next_operation() {
            Some(op) => self.slot.claim(op, now),
            None => self.slot.clear_claim(),
        }
    }

    /// The next done step to undo, once compensating.
    pub fn next_compensation(&self) -> Option<PayStep> {
        self.failure.as_ref()?;
        let remaining = self.done.checked_sub(self.undone)?;
        remaining.checked_sub(1).map(|i| PayStep::ALL[usize::from(i)])
    }
}

/// One ticket of a batch, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub batch_id: BatchId,
    pub ticket_id: TicketId,
    pub client_id: ClientId,
    pub authority: AuthorityCode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Reference>,
    pub currency: Currency,
    /// Where it is, with what being there takes (stored flat: `status`, `reason`, ...).
    #[serde(flatten)]
    pub state: State,
    /// What the authority says is owed, once asked. The amounts are minor
    /// units of `currency`, read and changed as [`Money`] through the methods
    /// below, so none can be taken for another currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    amount_due: Option<i64>,
    /// Held from the batch budget for this ticket and not yet paid or released.
    reserved: i64,
    paid: i64,
    /// Attempt of the current stage, from 0: each retry's message has its own.
    pub attempt: u32,
    /// Transient failures in a row since the ticket last got anywhere: what
    /// the retry policy counts, so a provider that answers now and then moves a
    /// payment of several steps on instead of parking it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failures: u32,
    /// When the current attempt's message becomes deliverable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default)]
    pub pay: PayProgress,
    /// The notification in flight, apart from the payment's.
    #[serde(default, skip_serializing_if = "OperationSlot::is_empty")]
    pub notice: OperationSlot,
    pub notified: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification: Option<String>,
    /// How many times an operator sent this ticket back into the pipeline.
    #[serde(default)]
    pub redrives: u32,
    /// How many times the sweep sent this ticket's overdue message again since it last moved.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resends: u32,
    /// The last decision a person took on it (`domain::resolution`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<super::resolution::Resolution>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The batch paying a ticket that also came in another batch, and whose it is:
/// only its own client (and operators) may learn its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaidElsewhere {
    pub batch_id: BatchId,
    pub client_id: ClientId,
}

/// Where a ticket is, with what being there takes: each end but `paid` says
/// why, a duplicate names the batch that pays it, a parked ticket knows the
/// stage it stopped at (where a redrive sends it back), and a ticket in
/// validation knows which validators have approved it (a retry asks the rest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StateShape", into = "StateShape")]
pub enum State {
    Lookup,
    Validate { approved_by: Vec<ProviderName> },
    Reserve,
    Pay,
    Paid,
    NotPayable { reason: String },
    Rejected { reason: String },
    OverBudget { reason: String },
    Failed { reason: String },
    Duplicate { of: PaidElsewhere, reason: String },
    Parked { stage: Stage, reason: String },
}

impl State {
    /// Waiting for `stage`'s function (a waiting state has no `notify`: end states wait for it).
    pub fn waiting_for(stage: Stage) -> State {
        match stage {
            Stage::Lookup => State::Lookup,
            Stage::Validate => State::Validate { approved_by: Vec::new() },
            Stage::Reserve => State::Reserve,
            Stage::Pay => State::Pay,
            Stage::Notify => unreachable!("notify acts on end states; no ticket waits in it"),
        }
    }

    pub fn status(&self) -> Status {
        match self {
            State::Lookup => Status::Lookup,
            State::Validate { .. } => Status::Validate,
            State::Reserve => Status::Reserve,
            State::Pay => Status::Pay,
            State::Paid => Status::Paid,
            State::NotPayable { .. } => Status::NotPayable,
            State::Rejected { .. } => Status::Rejected,
            State::OverBudget { .. } => Status::OverBudget,
            State::Failed { .. } => Status::Failed,
            State::Duplicate { .. } => Status::Duplicate,
            State::Parked { .. } => Status::Parked,
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            State::NotPayable { reason }
            | State::Rejected { reason }
            | State::OverBudget { reason }
            | State::Failed { reason }
            | State::Duplicate { reason, .. }
            | State::Parked { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// How a [`State`] is stored: the status by name, beside the fields some states carry.
#[derive(Serialize, Deserialize)]
struct StateShape {
    status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parked_stage: Option<Stage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    duplicate_of: Option<PaidElsewhere>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    approved_by: Vec<ProviderName>,
}

impl TryFrom<StateShape> for State {
    type Error = String;
    fn try_from(shape: StateShape) -> Result<State, String> {
        let StateShape { status, reason, parked_stage, duplicate_of, approved_by } = shape;
        let reason = || reason.ok_or_else(|| format!("a {status} ticket without its reason"));
        Ok(match status {
            Status::Lookup => State::Lookup,
            Status::Validate => State::Validate { approved_by },
            Status::Reserve => State::Reserve,
            Status::Pay => State::Pay,
            Status::Paid => State::Paid,
            Status::NotPayable => State::NotPayable { reason: reason()? },
            Status::Rejected => State::Rejected { reason: reason()? },
            Status::OverBudget => State::OverBudget { reason: reason()? },
            Status::Failed => State::Failed { reason: reason()? },
            Status::Duplicate => {
                let of = duplicate_of.ok_or("a duplicate ticket without the batch that pays it")?;
                State::Duplicate { of, reason: reason()? }
            }
            Status::Parked => {
                let stage = parked_stage.ok_or("a parked ticket without the stage it stopped at")?;
                State::Parked { stage, reason: reason()? }
            }
        })
    }
}

impl From<State> for StateShape {
    fn from(state: State) -> StateShape {
        let status = state.status();
        let mut shape = StateShape { status, reason: None, parked_stage: None, duplicate_of: None, approved_by: Vec::new() };
        match state {
            State::Validate { approved_by } => shape.approved_by = approved_by,
            State::Duplicate { of, reason } => (shape.reason, shape.duplicate_of) = (Some(reason), Some(of)),
            State::Parked { stage, reason } => (shape.reason, shape.parked_stage) = (Some(reason), Some(stage)),
            State::NotPayable { reason } | State::Rejected { reason } | State::OverBudget { reason } | State::Failed { reason } => {
                shape.reason = Some(reason)
            }
            State::Lookup | State::Reserve | State::Pay | State::Paid => {}
        }
        shape
    }
}

/// The state of an at-most-once operation, seen by an invocation about to send it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nobody has claimed it: claim it, then send it.
    Free,
    /// A live invocation is sending it: leave it alone until then.
    Held { until: DateTime<Utc> },
    /// It was sent and the answer lost: ask the provider before sending again.
    Unknown,
}

/// The message a ticket in its current state is waiting for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub stage: Stage,
    pub attempt: u32,
    pub not_before: Option<DateTime<Utc>>,
}

/// What the sweep does with a ticket whose message is overdue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overdue {
    Resend,
    GiveUp,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What to do after a transient failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterFailure {
    RetryAt(DateTime<Utc>),
    Parked,
}

/// Exponential backoff with jitter, up to a number of failed attempts in a row
/// (without progress) per stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 8, base: Duration::from_millis(500), cap: Duration::from_secs(60) }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt` (1-based retry count). `jitter` in [0, 1]
    /// spreads retries over the upper half of the exponential window, so a burst
    /// of failures does not come back as a burst.
    pub fn delay(&self, attempt: u32, jitter: f64, at_least: Duration) -> Duration {
        let exp = self.base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let window = exp.min(self.cap);
        let jittered = window.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        jittered.max(at_least)
    }
}

impl Ticket {
    /// A ticket just accepted into `batch`, waiting for its lookup.
    pub fn accepted(batch: &super::Batch, line: super::upload::TicketLine, now: DateTime<Utc>) -> Ticket {
        Ticket {
            batch_id: batch.batch_id.clone(),
            ticket_id: line.ticket_id,
            client_id: batch.client_id.clone(),
            authority: line.authority,
            reference: line.reference,
            currency: batch.currency,
            state: State::Lookup,
            amount_due: None,
            reserved: 0,
            paid: 0,
            attempt: 0,
            failures: 0,
            retry_at: None,
            last_error: None,
            pay: PayProgress::default(),
            notice: OperationSlot::default(),
            notified: false,
            notification: None,
            redrives: 0,
            resends: 0,
            resolution: None,
            created_at: now,
            updated_at: now,
        }
    }

    pub fn status(&self) -> Status {
        self.state.status()
    }

    /// `minor` units of this ticket's currency.
    pub fn money(&self, minor: i64) -> Money {
        Money::new(minor, self.currency)
    }

    /// What the authority says is owed, once asked.
    pub fn amount_due(&self) -> Option<Money> {
        self.amount_due.map(|minor| self.money(minor))
    }

    /// Held from the batch budget and not yet paid or released.
    pub fn reserved(&self) -> Money {
        self.money(self.reserved)
    }

    pub fn paid(&self) -> Money {
        self.money(self.paid)
    }

    /// Records what the authority says is owed.
    pub fn owes(&mut self, due: Money) -> Result<(), WrongCurrency> {
        self.amount_due = Some(self.minor_of(due)?);
        Ok(())
    }

    /// Holds `amount` of the batch budget for this ticket.
    pub fn hold(&mut self, amount: Money) -> Result<(), WrongCurrency> {
        self.reserved = self.minor_of(amount)?;
        Ok(())
    }

    /// The reservation was paid: it becomes what the ticket paid. Returns it.
    pub fn pay_reservation(&mut self) -> Money {
        let paid = self.release_reservation();
        self.paid = paid.minor;
        paid
    }

    /// The reservation goes back to the budget. Returns what it held.
    pub fn release_reservation(&mut self) -> Money {
        let held = std::mem::take(&mut self.reserved);
        self.money(held)
    }

    fn minor_of(&self, amount: Money) -> Result<i64, WrongCurrency> {
        if amount.currency == self.currency {
            Ok(amount.minor)
        } else {
            Err(WrongCurrency { expected: self.currency, found: amount.currency })
        }
    }

    /// Why it ended where it did (a rejection's reason, a park's, ...).
    pub fn reason(&self) -> Option<&str> {
        self.state.reason()
    }

    /// For a parked ticket: the stage it stopped at.
    pub fn parked_stage(&self) -> Option<Stage> {
        match self.state {
            State::Parked { stage, .. } => Some(stage),
            _ => None,
        }
    }

    /// In validation: the validators that have approved it so far.
    pub fn approved_by(&self) -> &[ProviderName] {
        match &self.state {
            State::Validate { approved_by } => approved_by,
            _ => &[],
        }
    }

    /// For a duplicate: the batch that pays it.
    pub fn duplicate_of(&self) -> Option<&PaidElsewhere> {
        match &self.state {
            State::Duplicate { of, .. } => Some(of),
            _ => None,
        }
    }

    /// The idempotency key of an operation on this ticket. A payment step keeps
    /// its key for good, so a redriven payment never repeats a step; a
    /// notification after a redrive is news, so it gets a key of its own.
    pub fn operation_key(&self, operation: Operation) -> String {
        match (operation, self.redrives) {
            (Operation::Notify, n) if n > 0 => format!("{}:{}:{operation}:r{n}", self.batch_id, self.ticket_id),
            _ => format!("{}:{}:{operation}", self.batch_id, self.ticket_id),
        }
    }

    /// Puts a parked ticket back at the stage where it stopped; its client will
    /// be told again how it ends. An operation whose answer was lost stays
    /// unknown, so the provider is asked about it before anything is re-sent.
    pub fn redrive(&mut self, now: DateTime<Utc>) -> Result<Stage, String> {
        let State::Parked { stage, .. } = self.state else {
            return Err(format!("ticket {} is {}; only parked tickets are redriven", self.ticket_id, self.status()));
        };
        if stage == Stage::Notify {
            return Err(format!("ticket {} cannot re-enter notify", self.ticket_id));
        }
        self.redrives += 1;
        self.move_to(State::waiting_for(stage), now);
        self.notified = false;
        self.notification = None;
        self.pay.slot.release_claim();
        self.notice.clear_claim();
        Ok(stage)
    }

    /// The at-most-once operation slot a stage sends through.
    pub fn slot_mut(&mut self, stage: Stage) -> &mut OperationSlot {
        match stage {
            Stage::Notify => &mut self.notice,
            _ => &mut self.pay.slot,
        }
    }

    pub fn slot(&self, stage: Stage) -> &OperationSlot {
        match stage {
            Stage::Notify => &self.notice,
            _ => &self.pay.slot,
        }
    }

    /// The message this ticket is waiting for, if any.
    pub fn pending(&self) -> Option<Pending> {
        if self.status().is_end() && self.notified {
            return None;
        }
        Some(Pending { stage: self.status().stage(), attempt: self.attempt, not_before: self.retry_at })
    }

    /// When the message this ticket waits for was due: the stage should have
    /// taken it by then (its retry time, or when the ticket last changed).
    pub fn due_at(&self) -> DateTime<Utc> {
        self.retry_at.map_or(self.updated_at, |at| at.max(self.updated_at))
    }

    /// The sweep found this ticket's message overdue: send it again, or after
    /// `max_resends` resends without progress stop trying and say so. A ticket
    /// on its way is parked where it stalled, for an operator (an unknown
    /// payment outcome stays unknown); an end state gives up its notification.
    pub fn overdue(&mut self, max_resends: u32, now: DateTime<Utc>) -> Overdue {
        self.updated_at = now;
        if self.resends < max_resends {
            self.resends += 1;
            return Overdue::Resend;
        }
        let lost = format!("its message was lost {} times", self.resends + 1);
        if self.status().is_end() {
            self.notified = true;
            self.notification = Some(format!("not sent: {lost}"));
        } else {
            let stage = self.status().stage();
            self.slot_mut(stage).release_claim();
            self.park(stage, format!("{stage}: stalled, {lost}"), now);
        }
        Overdue::GiveUp
    }

    /// Moves on to `state` with a fresh attempt count.
    pub fn move_to(&mut self, state: State, now: DateTime<Utc>) {
        self.state = state;
        self.resends = 0;
        self.attempt = 0;
        self.failures = 0;
        self.retry_at = None;
        self.last_error = None;
        self.updated_at = now;
    }

    /// A provider answered and the ticket got further within its stage (a
    /// validator approved, a payment step was applied or declined): the
    /// failures before it no longer count against the next ones.
    pub fn progressed(&mut self) {
        self.failures = 0;
    }

    /// Parks the ticket for an operator: where it stopped (where a redrive sends
    /// it back) and why.
    pub fn park(&mut self, stage: Stage, reason: String, now: DateTime<Utc>) {
        self.move_to(State::Parked { stage, reason }, now);
    }

    /// Records a transient failure of the current stage and decides: retry later, or park.
    pub fn fail_transiently(
        &mut self,
        error: String,
        policy: &RetryPolicy,
        delay: Duration,
        now: DateTime<Utc>,
    ) -> AfterFailure {
        let failures = self.failures + 1;
        self.updated_at = now;
        if failures >= policy.max_attempts {
            if self.status().is_end() {
                // Notification gave up: the ticket keeps its outcome.
                self.notified = true;
                self.notification = Some(format!("failed after {failures} attempts: {error}"));
                self.attempt += 1;
                self.failures = failures;
                self.retry_at = None;
                self.last_error = Some(error);
                return AfterFailure::Parked;
            }
            let stage = self.status().stage();
            self.park(stage, format!("{stage}: {error} (after {failures} attempts)"), now);
            self.last_error = Some(error);
            return AfterFailure::Parked;
        }
        let at = now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero());
        self.attempt += 1;
        self.failures = failures;
        self.retry_at = Some(at);
        self.last_error = Some(error);
        AfterFailure::RetryAt(at)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn op(name: &str) -> Operation {
        Operation::parse(name).unwrap_or_else(|| panic!("no operation `{name}`"))
    }

    #[test]
    fn operations_keep_their_names_on_the_wire_and_in_store() {
        for name in ["capture", "settle", "post", "issue", "refund", "cancel", "reverse", "void", "notify"] {
            let operation = op(name);
            assert_eq!(operation.name(), name);
            assert_eq!(serde_json::to_string(&operation).unwrap(), format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<Operation>(&format!("\"{name}\"")).unwrap(), operation);
        }
        assert_eq!(op("refund"), Operation::Undo(PayStep::Capture));
        assert_eq!(op("void").provider(), ProviderName::Receipt);
        assert!(serde_json::from_str::<Operation>("\"pay\"").is_err());
    }

    #[test]
    fn a_claim_covers_the_operations_after_it_in_its_direction() {
        let mut pay = PayProgress { done: 1, ..PayProgress::default() };
        assert_eq!(pay.operations_from(op("settle")), [op("settle"), op("post"), op("issue")]);
        pay.failure = Some("ledger declined post".into());
        pay.done = 2;
        assert_eq!(pay.operations_from(op("cancel")), [op("cancel"), op("refund")]);
        assert_eq!(pay.operations_from(op("capture")), [], "not in this direction");
    }

    /// A queued batch of `client` paying in EUR within `budget`, and its one
    /// ticket's line (`t1` at CITY-PARKING).
    pub(crate) fn batch_of_one(batch_id: BatchId, client: &str, budget: i64, now: DateTime<Utc>) -> (super::super::Batch, super::super::upload::TicketLine) {
        let batch = super::super::Batch {
            batch_id,
            client_id: ClientId::parse(client).unwrap(),
            currency: Currency::parse("EUR").unwrap(),
            budget,
            committed: 0,
            tickets: 1,
            idempotency_key: None,
            request_digest: String::new(),
            enqueued: true,
            completed_at: None,
            created_at: now,
        };
        let line = super::super::upload::TicketLine {
            ticket_id: TicketId::parse("t1").unwrap(),
            authority: AuthorityCode::parse("CITY-PARKING").unwrap(),
            reference: None,
        };
        (batch, line)
    }

    pub(crate) fn ticket(status: Status) -> Ticket {
        let now = Utc::now();
        let (batch, line) = batch_of_one(BatchId::parse("b1").unwrap(), "c1", 10_000, now);
        Ticket { state: in_status(status), ..Ticket::accepted(&batch, line, now) }
    }

    /// A state of `status`, with made-up data where it carries some (a parked one stopped at pay).
    pub(crate) fn in_status(status: Status) -> State {
        let reason = format!("{status} for a test");
        match status {
            Status::Lookup => State::Lookup,
            Status::Validate => State::waiting_for(Stage::Validate),
            Status::Reserve => State::Reserve,
            Status::Pay => State::Pay,
            Status::Paid => State::Paid,
            Status::NotPayable => State::NotPayable { reason },
            Status::Rejected => State::Rejected { reason },
            Status::OverBudget => State::OverBudget { reason },
            Status::Failed => State::Failed { reason },
            Status::Duplicate => {
                let of = PaidElsewhere { batch_id: BatchId::parse("b0").unwrap(), client_id: ClientId::parse("c1").unwrap() };
                State::Duplicate { of, reason }
            }
            Status::Parked => State::Parked { stage: Stage::Pay, reason },
        }
    }

    #[test]
    fn every_status_waits_for_exactly_one_stage_until_notified() {
        for status in Status::ALL {
            let mut t = ticket(status);
            let pending = t.pending().unwrap();
            assert_eq!(pending.stage, status.stage());
            t.notified = true;
            assert_eq!(t.pending().is_none(), status.is_end(), "{status}");
        }
    }

    #[test]
    fn a_state_is_stored_flat_and_read_back_only_with_the_data_it_needs() {
        for status in Status::ALL {
            let t = ticket(status);
            let stored = serde_json::to_value(&t).unwrap();
            assert_eq!(stored["status"], status.as_str());
            assert_eq!(stored.get("reason").is_some(), status.is_end() && status != Status::Paid, "{stored}");
            assert_eq!(serde_json::from_value::<Ticket>(stored).unwrap(), t);
        }
        let mut validating = ticket(Status::Validate);
        validating.state = State::Validate { approved_by: vec![ProviderName::Registry, ProviderName::Sanctions] };
        let stored = serde_json::to_value(&validating).unwrap();
        assert_eq!(stored["approved_by"], serde_json::json!(["registry", "sanctions"]));
        assert_eq!(serde_json::from_value::<Ticket>(stored).unwrap(), validating);
        let parked = serde_json::to_value(ticket(Status::Parked)).unwrap();
        assert_eq!((parked["parked_stage"].as_str(), parked["reason"].as_str()), (Some("pay"), Some("parked for a test")));
        let without = |status: Status, field: &str| {
            let mut stored = serde_json::to_value(ticket(status)).unwrap();
            stored.as_object_mut().unwrap().remove(field);
            serde_json::from_value::<Ticket>(stored).unwrap_err().to_string()
        };
        assert!(without(Status::Parked, "parked_stage").contains("without the stage it stopped at"));
        assert!(without(Status::Duplicate, "duplicate_of").contains("without the batch that pays it"));
        assert!(without(Status::Rejected, "reason").contains("rejected ticket without its reason"));
    }

    #[test]
    fn end_states_are_the_seven_of_the_design() {
        let ends: Vec<_> = Status::ALL.into_iter().filter(|s| s.is_end()).map(Status::as_str).collect();
        assert_eq!(ends, ["paid", "not_payable", "rejected", "over_budget", "failed", "duplicate", "parked"]);
        assert_eq!(Status::END_NAMES, ends.as_slice());
    }

    #[test]
    fn transient_failures_back_off_then_park_with_the_reason() {
        let policy = RetryPolicy { max_attempts: 3, ..RetryPolicy::default() };
        let mut t = ticket(Status::Validate);
        let now = Utc::now();
        let d = policy.delay(1, 0.5, Duration::ZERO);
        assert!(matches!(t.fail_transiently("503".into(), &policy, d, now), AfterFailure::RetryAt(_)));
        assert_eq!(t.attempt, 1);
        assert_eq!(t.pending().unwrap().attempt, 1);
        assert!(t.pending().unwrap().not_before.unwrap() > now);
        assert!(matches!(t.fail_transiently("503".into(), &policy, d, now), AfterFailure::RetryAt(_)));
        assert_eq!(t.fail_transiently("timeout".into(), &policy, d, now), AfterFailure::Parked);
        assert_eq!(t.status(), Status::Parked);
        assert_eq!(t.parked_stage(), Some(Stage::Validate));
        assert!(t.reason().unwrap().contains("timeout"));
        assert_eq!(t.pending().unwrap().stage, Stage::Notify, "a parked ticket is still notified");
    }

    #[test]
    fn a_tickets_amounts_stay_in_its_currency_and_a_reservation_is_paid_or_released_once() {
        let mut t = ticket(Status::Reserve);
        let usd = Money::new(900, Currency::parse("USD").unwrap());
        assert_eq!(t.owes(usd), Err(WrongCurrency { expected: t.currency, found: usd.currency }));
        assert_eq!(t.hold(usd).unwrap_err().to_string(), "an amount in USD where amounts are in EUR");
        assert_eq!((t.amount_due(), t.reserved()), (None, t.money(0)), "nothing taken from a refused amount");
        t.owes(t.money(900)).unwrap();
        t.hold(t.money(900)).unwrap();
        assert_eq!(t.pay_reservation(), t.money(900));
        assert_eq!((t.paid(), t.reserved(), t.release_reservation()), (t.money(900), t.money(0), t.money(0)));
        let stored = serde_json::to_value(&t).unwrap();
        assert_eq!((stored["amount_due"].as_i64(), stored["reserved"].as_i64(), stored["paid"].as_i64()), (Some(900), Some(0), Some(900)), "stored as minor units");
    }

    #[test]
    fn only_failures_in_a_row_count_towards_parking_and_each_retry_has_its_own_attempt() {
        let policy = RetryPolicy { max_attempts: 2, ..RetryPolicy::default() };
        let mut t = ticket(Status::Pay);
        let now = Utc::now();
        for _ in 0..3 {
            assert!(matches!(t.fail_transiently("503".into(), &policy, Duration::ZERO, now), AfterFailure::RetryAt(_)));
            t.progressed();
        }
        assert_eq!((t.status(), t.attempt, t.failures), (Status::Pay, 3, 0));
        t.fail_transiently("503".into(), &policy, Duration::ZERO, now);
        assert_eq!(t.fail_transiently("503".into(), &policy, Duration::ZERO, now), AfterFailure::Parked);
        assert!(t.reason().unwrap().contains("after 2 attempts"), "{:?}", t.reason());
    }

    #[test]
    fn a_parked_ticket_is_redriven_to_the_stage_where_it_stopped() {
        let policy = RetryPolicy { max_attempts: 1, ..RetryPolicy::default() };
        let mut t = ticket(Status::Pay);
        t.hold(t.money(900)).unwrap();
        t.pay.slot.claim(op("settle"), Utc::now());
        t.fail_transiently("settlement down".into(), &policy, Duration::ZERO, Utc::now());
        t.pay.slot.release_claim();
        t.notified = true;
        assert_eq!(t.status(), Status::Parked);
        assert_eq!(t.redrive(Utc::now()), Ok(Stage::Pay));
        assert_eq!((t.status(), t.attempt, t.redrives, t.notified), (Status::Pay, 0, 1, false));
        assert_eq!(t.operation_key(op("capture")), format!("{}:{}:capture", t.batch_id, t.ticket_id), "a payment step keeps its key");
        assert!(t.operation_key(op("notify")).ends_with(":notify:r1"), "the next notification is news");
        assert_eq!(t.reserved(), t.money(900), "the reservation is still held");
        assert_eq!(t.pay.slot.claim_on(op("settle"), Utc::now(), Duration::from_secs(60)), Claim::Unknown, "the lost answer is asked for first");
        assert!(t.redrive(Utc::now()).unwrap_err().contains("only parked"));
    }

    #[test]
    fn an_unknown_payment_outcome_survives_the_notification_and_the_redrive() {
        let policy = RetryPolicy { max_attempts: 1, ..RetryPolicy::default() };
        let lease = Duration::from_secs(60);
        let mut t = ticket(Status::Pay);
        t.hold(t.money(900)).unwrap();
        t.pay.slot.claim(op("capture"), Utc::now());
        t.pay.slot.release_claim();
        t.fail_transiently("timed out".into(), &policy, Duration::ZERO, Utc::now());
        assert_eq!(t.status(), Status::Parked);
        // The parked ticket's client is told, through the notification's own slot.
        t.slot_mut(Stage::Notify).claim(op("notify"), Utc::now());
        t.slot_mut(Stage::Notify).clear_claim();
        t.notified = true;
        assert!(t.pay.slot.is_unknown(), "notifying never forgets the capture in flight");
        t.redrive(Utc::now()).unwrap();
        assert_eq!(t.slot(Stage::Pay).claim_on(op("capture"), Utc::now(), lease), Claim::Unknown, "the gateway is asked before any capture");
        assert_eq!(t.slot(Stage::Notify).claim_on(op("notify"), Utc::now(), lease), Claim::Free, "the next notification is news");
    }

    #[test]
    fn an_overdue_ticket_is_resent_then_parked_where_it_stalled() {
        let now = Utc::now();
        let mut t = ticket(Status::Validate);
        t.retry_at = Some(now + chrono::Duration::seconds(30));
        assert_eq!(t.due_at(), now + chrono::Duration::seconds(30), "a scheduled retry is due when it is scheduled");
        assert_eq!(t.overdue(2, now), Overdue::Resend);
        assert_eq!(t.overdue(2, now), Overdue::Resend);
        assert_eq!(t.overdue(2, now), Overdue::GiveUp);
        assert_eq!((t.status(), t.parked_stage()), (Status::Parked, Some(Stage::Validate)));
        assert!(t.reason().unwrap().contains("lost 3 times"), "{:?}", t.reason());

        let mut moving = ticket(Status::Lookup);
        moving.overdue(2, now);
        moving.move_to(State::waiting_for(Stage::Validate), now);
        assert_eq!(moving.resends, 0, "progress starts the count again");

        let mut told = ticket(Status::Paid);
        told.hold(told.money(700)).unwrap();
        told.pay_reservation();
        assert_eq!(told.overdue(0, now), Overdue::GiveUp);
        assert_eq!((told.status(), told.paid(), told.notified), (Status::Paid, told.money(700), true), "an end state keeps its outcome");
        assert!(told.pending().is_none());
    }

    #[test]
    fn a_notification_that_gives_up_keeps_the_payment() {
        let policy = RetryPolicy { max_attempts: 1, ..RetryPolicy::default() };
        let mut t = ticket(Status::Paid);
        t.hold(t.money(500)).unwrap();
        t.pay_reservation();
        assert_eq!(t.fail_transiently("down".into(), &policy, Duration::ZERO, Utc::now()), AfterFailure::Parked);
        assert_eq!(t.status(), Status::Paid);
        assert_eq!((t.paid(), t.reserved()), (t.money(500), t.money(0)));
        assert!(t.notified && t.pending().is_none());
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let p = RetryPolicy { max_attempts: 10, base: Duration::from_millis(100), cap: Duration::from_secs(2) };
        assert_eq!(p.delay(1, 1.0, Duration::ZERO), Duration::from_millis(100));
        assert_eq!(p.delay(3, 1.0, Duration::ZERO), Duration::from_millis(400));
        assert_eq!(p.delay(3, 0.0, Duration::ZERO), Duration::from_millis(200));
        assert_eq!(p.delay(30, 1.0, Duration::ZERO), Duration::from_secs(2));
        assert_eq!(p.delay(1, 0.0, Duration::from_secs(5)), Duration::from_secs(5));
    }

    #[test]
    fn payment_steps_run_forward_and_compensate_backwards() {
        let mut pay = PayProgress::default();
        assert_eq!(pay.next_step(), Some(PayStep::Capture));
        pay.done = 3;
        assert_eq!(pay.next_step(), Some(PayStep::Issue));
        assert_eq!(pay.next_compensation(), None, "nothing to undo before a failure");
        pay.failure = Some("declined".into());
        assert_eq!(pay.next_compensation(), Some(PayStep::Post));
        pay.undone = 2;
        assert_eq!(pay.next_compensation(), Some(PayStep::Capture));
        pay.undone = 3;
        assert_eq!(pay.next_compensation(), None);
        pay.done = 4;
        assert_eq!(pay.next_step(), None);
    }

    #[test]
    fn each_applied_operation_claims_the_next_one() {
        let now = Utc::now();
        let mut pay = PayProgress::default();
        assert_eq!(pay.next_operation(), Some(Operation::Step(PayStep::Capture)));
        pay.applied(now);
        assert_eq!((pay.done, pay.slot.in_flight.map(Operation::name)), (1, Some("settle")));
        pay.applied(now);
        pay.declined("ledger down for good".into(), now);
        assert_eq!(pay.slot.in_flight.map(Operation::name), Some("cancel"), "undo starts with the last done step");
        pay.applied(now);
        assert_eq!(pay.slot.in_flight.map(Operation::name), Some("refund"));
        pay.applied(now);
        assert_eq!((pay.undone, pay.slot.in_flight.map(Operation::name), pay.slot.claimed_at), (2, None, None));
        assert_eq!(pay.next_operation(), None);
    }

    #[test]
    fn a_claim_is_held_for_its_lease_then_its_outcome_is_unknown() {
        let now = Utc::now();
        let lease = Duration::from_secs(60);
        let mut slot = OperationSlot::default();
        assert_eq!(slot.claim_on(op("capture"), now, lease), Claim::Free);
        slot.claim(op("capture"), now);
        assert_eq!(slot.claim_on(op("capture"), now, lease), Claim::Held { until: now + chrono::Duration::seconds(60) });
        assert_eq!(slot.claim_on(op("settle"), now, lease), Claim::Free);
        assert_eq!(slot.claim_on(op("capture"), now + chrono::Duration::seconds(61), lease), Claim::Unknown, "the claimant died");
        slot.release_claim();
        assert_eq!(slot.claim_on(op("capture"), now, lease), Claim::Unknown, "the claimant gave up");
    }
}
