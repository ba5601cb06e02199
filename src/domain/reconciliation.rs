//! Reconciliation: what our records say each payment provider applied for a
//! ticket, and how that compares with what the provider says when asked by
//! idempotency key. Pure: the API asks the providers and records the run.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ids::{BatchId, TicketId};
use super::ticket::{Operation, PayStep, Ticket};
use super::ProviderName;

/// What we recorded of one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recorded {
    /// Applied (a payment step done, or a compensation that undid one).
    Applied,
    /// Declined for good by the provider: it must not have it.
    Declined,
    /// Sent, and the answer never known.
    Unknown,
}

/// One operation a ticket's records say something about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub provider: ProviderName,
    pub operation: &'static str,
    pub key: String,
    pub recorded: Recorded,
}

/// What a provider said of an operation, asked by its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ProviderView {
    Applied { reference: String, amount_minor: i64, currency: String },
    Absent,
    /// No answer we can use (down, throttled, refused the query): nothing is proven either way.
    NoAnswer { error: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Agree,
    /// The provider applied it and we did not record it as applied.
    ProviderOnly,
    /// We recorded it applied and the provider does not have it.
    OursOnly,
    AmountMismatch,
    Unanswered,
}

impl Verdict {
    pub fn disagrees(self) -> bool {
        !matches!(self, Self::Agree)
    }
}

/// One operation compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub ticket_id: TicketId,
    pub provider: ProviderName,
    pub operation: String,
    pub idempotency_key: String,
    pub ours: Recorded,
    pub amount_minor: i64,
    pub currency: String,
    pub theirs: ProviderView,
    pub verdict: Verdict,
}

/// One provider's counts in a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderCounts {
    pub agree: u64,
    pub provider_only: u64,
    pub ours_only: u64,
    pub amount_mismatch: u64,
    pub unanswered: u64,
}

impl ProviderCounts {
    fn count(&mut self, verdict: Verdict) {
        let n = match verdict {
            Verdict::Agree => &mut self.agree,
            Verdict::ProviderOnly => &mut self.provider_only,
            Verdict::OursOnly => &mut self.ours_only,
            Verdict::AmountMismatch => &mut self.amount_mismatch,
            Verdict::Unanswered => &mut self.unanswered,
        };
        *n += 1;
    }
}

/// A recorded reconciliation of a batch: who ran it, when, the counts, and every disagreement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconciliationRun {
    pub run_id: String,
    pub batch_id: BatchId,
    pub at: DateTime<Utc>,
    /// The name of the key that ran it.
    pub by: String,
    /// Only this provider was asked, if one was named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderName>,
    pub checked: u64,
    pub providers: BTreeMap<ProviderName, ProviderCounts>,
    pub disagreements: Vec<Check>,
}

impl ReconciliationRun {
    pub fn new(batch_id: BatchId, by: String, provider: Option<ProviderName>, at: DateTime<Utc>, checks: Vec<Check>) -> ReconciliationRun {
        let mut providers: BTreeMap<ProviderName, ProviderCounts> =
            PayStep::ALL.iter().map(|s| s.provider()).filter(|p| provider.is_none_or(|only| only == *p)).map(|p| (p, ProviderCounts::default())).collect();
        for c in &checks {
            providers.entry(c.provider).or_default().count(c.verdict);
        }
        let checked = checks.len() as u64;
        let disagreements = checks.into_iter().filter(|c| c.verdict.disagrees()).collect();
        let run_id = format!("r-{}", uuid::Uuid::new_v4().simple());
        ReconciliationRun { run_id, batch_id, at, by, provider, checked, providers, disagreements }
    }

    /// Whether everything asked about agrees.
    pub fn agrees(&self) -> bool {
        self.disagreements.is_empty()
    }

    pub fn disagrees_on(&self, ticket_id: &TicketId) -> bool {
        self.disagreements.iter().any(|c| &c.ticket_id == ticket_id)
    }
}

/// Every payment operation the ticket's records say was applied, declined or
/// left unknown: the steps done, the compensations that undid them, the step
/// a provider declined, and those whose answer was lost (the one a lapsed
/// claim names and those after it, which it covers). Operations being sent
/// right now are left out: their answers are still to come.
pub fn expected_operations(t: &Ticket) -> Vec<Expected> {
    let mut out = Vec::new();
    let mut push = |operation: Operation, recorded: Recorded| {
        out.push(Expected { provider: operation.provider(), operation: operation.name(), key: t.operation_key(operation), recorded });
    };
    let done = usize::from(t.pay.done).min(PayStep::ALL.len());
    for step in &PayStep::ALL[..done] {
        push(Operation::Step(*step), Recorded::Applied);
    }
    for step in PayStep::ALL[..done].iter().rev().take(usize::from(t.pay.undone)) {
        push(Operation::Undo(*step), Recorded::Applied);
    }
    let slot = &t.pay.slot;
    let unknown = match (slot.is_unknown(), slot.in_flight, t.pay.next_operation()) {
        (true, Some(named), _) => t.pay.operations_from(named),
        (_, None, Some(next)) if slot.ask_first => t.pay.operations_from(next),
        _ => Vec::new(),
    };
    if let (Some(_), Some(step)) = (&t.pay.failure, PayStep::ALL.get(done)) {
        let decline = format!("{} declined {}", step.provider(), step.operation());
        if unknown.is_empty() && t.pay.failure.as_deref().is_some_and(|f| f.starts_with(&decline)) {
            push(Operation::Step(*step), Recorded::Declined);
        }
    }
    for operation in unknown {
        push(operation, Recorded::Unknown);
    }
    out
}

/// Compares what we recorded with what the provider says.
pub fn verdict(recorded: Recorded, amount_minor: i64, currency: &str, theirs: &ProviderView) -> Verdict {
    match (recorded, theirs) {
        (_, ProviderView::NoAnswer { .. }) => Verdict::Unanswered,
        (Recorded::Applied, ProviderView::Applied { amount_minor: a, currency: c, .. }) if *a != amount_minor || c != currency => {
            Verdict::AmountMismatch
        }
        (Recorded::Applied, ProviderView::Applied { .. }) => Verdict::Agree,
        (Recorded::Applied, ProviderView::Absent) => Verdict::OursOnly,
        (Recorded::Declined | Recorded::Unknown, ProviderView::Applied { .. }) => Verdict::ProviderOnly,
        (Recorded::Declined | Recorded::Unknown, ProviderView::Absent) => Verdict::Agree,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Status;
    use crate::domain::ticket::tests::{op, ticket};

    fn ops(t: &Ticket) -> Vec<(&'static str, Recorded)> {
        expected_operations(t).into_iter().map(|e| (e.operation, e.recorded)).collect()
    }

    #[test]
    fn a_paid_ticket_recorded_its_four_steps() {
        let mut t = ticket(Status::Paid);
        t.pay.done = 4;
        assert_eq!(ops(&t), [("capture", Recorded::Applied), ("settle", Recorded::Applied), ("post", Recorded::Applied), ("issue", Recorded::Applied)]);
        assert_eq!(expected_operations(&t)[0].key, format!("{}:{}:capture", t.batch_id, t.ticket_id));
    }

    #[test]
    fn a_failed_ticket_recorded_its_steps_their_undoing_and_the_decline() {
        let mut t = ticket(Status::Failed);
        t.pay.done = 2;
        t.pay.undone = 2;
        t.pay.failure = Some("ledger declined post: closed".into());
        assert_eq!(ops(&t), [("capture", Recorded::Applied), ("settle", Recorded::Applied), ("cancel", Recorded::Applied), ("refund", Recorded::Applied), ("post", Recorded::Declined)]);
        let mut declined_first = ticket(Status::Failed);
        declined_first.pay.failure = Some("gateway declined capture: card".into());
        assert_eq!(ops(&declined_first), [("capture", Recorded::Declined)]);
    }

    #[test]
    fn a_lost_answer_is_asked_about_with_those_its_claim_covers_and_a_call_in_flight_is_not() {
        let mut t = ticket(Status::Parked);
        t.pay.done = 1;
        t.pay.slot.claim(op("settle"), Utc::now());
        assert_eq!(ops(&t), [("capture", Recorded::Applied)], "still being sent");
        t.pay.slot.release_claim();
        let unknown = [("settle", Recorded::Unknown), ("post", Recorded::Unknown), ("issue", Recorded::Unknown)];
        assert_eq!(ops(&t)[1..], unknown);
        t.pay.slot.clear_claim();
        t.pay.slot.ask_first = true;
        assert_eq!(ops(&t)[1..], unknown, "a step confirmed before them settled only itself");
    }

    #[test]
    fn verdicts_name_each_way_of_disagreeing() {
        let applied = |minor| ProviderView::Applied { reference: "g-1".into(), amount_minor: minor, currency: "EUR".into() };
        assert_eq!(verdict(Recorded::Applied, 500, "EUR", &applied(500)), Verdict::Agree);
        assert_eq!(verdict(Recorded::Applied, 500, "EUR", &applied(400)), Verdict::AmountMismatch);
        assert_eq!(verdict(Recorded::Applied, 500, "EUR", &ProviderView::Absent), Verdict::OursOnly);
        assert_eq!(verdict(Recorded::Unknown, 500, "EUR", &applied(500)), Verdict::ProviderOnly);
        assert_eq!(verdict(Recorded::Declined, 500, "EUR", &ProviderView::Absent), Verdict::Agree);
        assert_eq!(verdict(Recorded::Unknown, 500, "EUR", &ProviderView::NoAnswer { error: "503".into() }), Verdict::Unanswered);
    }
}
