//! Each stage's rules, fast: the pipeline on a real SQLite store, with the
//! bus keeping what was sent and the providers answering from a script that
//! applies each key once, as the simulator does.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;

use super::*;
use crate::domain::ticket::tests::batch_of_one;
use crate::domain::{Batch, Currency, Due, Money, Operation, PayStep, ProviderName, State, Status};
use crate::providers::client::Call;
use crate::providers::wire::{CheckRequest, CheckResponse, Decision, OperationResponse, WireMoney};
use crate::store::sqlite::SqliteStore;

#[derive(Default)]
struct Kept(Mutex<Vec<OutgoingMessage>>);

#[async_trait]
impl Bus for Kept {
    async fn send(&self, message: &OutgoingMessage) -> Result<(), BusError> {
        self.0.lock().unwrap().push(message.clone());
        Ok(())
    }

    async fn send_batch(&self, _queue: &str, messages: &[OutgoingMessage]) -> Result<(), BusError> {
        self.0.lock().unwrap().extend_from_slice(messages);
        Ok(())
    }
}

/// Providers that approve every check, owe 12.50 on every ticket, apply each
/// key once, decline the operations named in `declines`, and answer 503 (before
/// applying anything) as many times as `unavailable` says for a check
/// (`check fraud`) or an operation (`settle`).
#[derive(Default)]
struct Scripted {
    declines: HashSet<&'static str>,
    unavailable: Mutex<BTreeMap<String, u32>>,
    /// Idempotency key → the operation applied under it.
    applied: Mutex<BTreeMap<String, String>>,
    /// Every request: the operation sent, or `status` and the key asked about.
    calls: Mutex<Vec<String>>,
}

fn exchange(provider: ProviderName, operation: &str, key: Option<&str>, status: u16) -> Exchange {
    let headers = BTreeMap::from([(crate::providers::wire::REQUEST_ID.to_ascii_lowercase(), uuid::Uuid::new_v4().to_string())]);
    Exchange {
        provider,
        operation: operation.into(),
        attempt: 0,
        idempotency_key: key.map(str::to_owned),
        request: crate::domain::event::HttpRequestRecord { method: "POST".into(), url: format!("http://{provider}/{operation}"), headers, body: serde_json::Value::Null },
        response: Some(crate::domain::event::HttpResponseRecord { status, headers: BTreeMap::new(), body: serde_json::Value::Null }),
        outcome: if status == 200 { "ok".into() } else { "declined".into() },
        error: None,
        latency_ms: 0,
        trace_id: None,
    }
}

impl Scripted {
    fn down_once_more(&self, what: &str) -> bool {
        let mut left = self.unavailable.lock().unwrap();
        match left.get_mut(what) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

fn unavailable<T>(provider: ProviderName, operation: &str, key: Option<&str>) -> Call<T> {
    Call { result: Err(CallError::Transient { error: "503 unavailable".into() }), exchange: exchange(provider, operation, key, 503) }
}

fn applied(key: &str, operation: &str) -> OperationResponse {
    OperationResponse { id: format!("ref-{key}"), operation: operation.into(), idempotency_key: key.into(), amount: WireMoney { minor: 1250, currency: "EUR".into() } }
}

#[async_trait]
impl Providers for Scripted {
    async fn lookup(&self, _authority: &str, currency: Currency, _caller: &Caller<'_>) -> Call<Due> {
        Call { result: Ok(Due::Owed(Money::new(1250, currency))), exchange: exchange(ProviderName::Authority, "lookup", None, 200) }
    }

    async fn check(&self, provider: ProviderName, _request: &CheckRequest, _caller: &Caller<'_>) -> Call<CheckResponse> {
        self.calls.lock().unwrap().push(format!("check {provider}"));
        if self.down_once_more(&format!("check {provider}")) {
            return unavailable(provider, "check", None);
        }
        Call { result: Ok(CheckResponse { decision: Decision::Approve, reason: None }), exchange: exchange(provider, "check", None, 200) }
    }

    async fn operate(&self, provider: ProviderName, operation: &str, key: &str, _request: &OperationRequest, _caller: &Caller<'_>) -> Call<OperationResponse> {
        self.calls.lock().unwrap().push(operation.to_owned());
        if self.down_once_more(operation) {
            return unavailable(provider, operation, Some(key));
        }
        if self.declines.contains(operation) {
            let result = Err(CallError::Permanent { status: 422, error: "declined".into() });
            return Call { result, exchange: exchange(provider, operation, Some(key), 422) };
        }
        self.applied.lock().unwrap().insert(key.to_owned(), operation.to_owned());
        Call { result: Ok(applied(key, operation)), exchange: exchange(provider, operation, Some(key), 200) }
    }

    async fn operation_status(&self, provider: ProviderName, key: &str, _caller: &Caller<'_>) -> Call<Option<OperationResponse>> {
        let operation = key.rsplit(':').next().unwrap_or_default().to_owned();
        self.calls.lock().unwrap().push(format!("status {operation}"));
        let found = self.applied.lock().unwrap().get(key).map(|op| applied(key, op));
        let status = if found.is_some() { 200 } else { 404 };
        Call { result: Ok(found), exchange: exchange(provider, "status", Some(key), status) }
    }
}

struct Stages {
    pipeline: Pipeline,
    bus: Arc<Kept>,
    providers: Arc<Scripted>,
    batch: Batch,
    _dir: tempfile::TempDir,
}

const LEASE: Duration = Duration::from_secs(30);

async fn stages(declines: &[&'static str], budget: i64) -> Stages {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("store.db")).unwrap());
    let spool = spool::AuditSpool::start(&dir.path().join("spool"), store.clone()).unwrap();
    let bus = Arc::new(Kept::default());
    let providers = Arc::new(Scripted { declines: declines.iter().copied().collect(), ..Scripted::default() });
    let pipeline = Pipeline {
        store,
        spool,
        bus: bus.clone(),
        providers: providers.clone(),
        retry: RetryPolicy::default(),
        sweep: sweep::SweepPolicy::default(),
        claim_lease: LEASE,
    };
    let now = Utc::now();
    let (batch, line) = batch_of_one(BatchId::generate(), "acme", budget, now);
    let ticket = Ticket::accepted(&batch, line, now);
    pipeline.store.create_batch(&batch, std::slice::from_ref(&ticket), &[]).await.unwrap();
    Stages { pipeline, bus, providers, batch, _dir: dir }
}

impl Stages {
    async fn ticket(&self) -> Versioned<Ticket> {
        self.pipeline.store.ticket(&self.batch.batch_id, &TicketId::parse("t1").unwrap()).await.unwrap().unwrap()
    }

    /// The ticket moved on by hand to `status`, holding 12.50 of the budget from reserve on.
    async fn at(&self, status: Status, shape: impl FnOnce(&mut Ticket)) -> Versioned<Ticket> {
        let current = self.ticket().await;
        let mut next = current.value.clone();
        next.move_to(State::waiting_for(status.stage()), Utc::now());
        next.owes(next.money(1250)).unwrap();
        let budget = (status == Status::Pay).then(|| {
            next.hold(next.money(1250)).unwrap();
            BudgetChange::Reserve(next.money(1250))
        });
        shape(&mut next);
        self.pipeline.store.update_ticket(TicketUpdate { ticket: next, etag: current.etag, budget, events: vec![] }).await.unwrap()
    }

    async fn deliver(&self, stage: Stage, attempt: u32) -> Handled {
        let message = StageMessage { batch_id: self.batch.batch_id.clone(), ticket_id: TicketId::parse("t1").unwrap(), attempt, deferrals: 0 };
        self.pipeline.handle(stage, message).await.unwrap()
    }

    fn calls(&self) -> Vec<String> {
        self.providers.calls.lock().unwrap().clone()
    }

    fn sent_to(&self, queue: &str) -> usize {
        self.bus.0.lock().unwrap().iter().filter(|m| m.queue == queue).count()
    }

    async fn committed(&self) -> i64 {
        self.pipeline.store.batch(&self.batch.batch_id).await.unwrap().unwrap().committed().minor
    }
}

/// `t` as a defective document would have it: past lookup with no amount due.
fn without_amount_due(t: &Ticket) -> Ticket {
    let mut stored = serde_json::to_value(t).unwrap();
    stored.as_object_mut().unwrap().remove("amount_due");
    serde_json::from_value(stored).unwrap()
}

fn writes_between(before: &Versioned<Ticket>, after: &Versioned<Ticket>) -> i64 {
    after.etag.parse::<i64>().unwrap() - before.etag.parse::<i64>().unwrap()
}

#[tokio::test]
async fn a_payment_sends_each_step_once_in_order_and_writes_its_ticket_twice() {
    let s = stages(&[], 10_000).await;
    let before = s.at(Status::Pay, |_| {}).await;
    let Handled::Done(paid) = s.deliver(Stage::Pay, 0).await else { panic!("the payment ran") };
    assert_eq!((paid.status(), paid.paid().minor, paid.reserved().minor), (Status::Paid, 1250, 0));
    assert_eq!(s.calls(), ["capture", "settle", "post", "issue"]);
    assert_eq!(writes_between(&before, &s.ticket().await), 2, "the claim, then the end");
    assert_eq!(s.sent_to("ticket-notify"), 1);
    let trail = s.pipeline.store.events(&s.batch.batch_id, &paid.ticket_id).await.unwrap();
    let exchanges = trail.iter().filter(|e| matches!(e.kind, EventKind::Exchange(_))).count();
    assert_eq!(exchanges, 4, "every step's exchange is in the trail");
}

#[tokio::test]
async fn a_declined_step_undoes_the_steps_done_in_reverse_and_gives_the_reservation_back() {
    let s = stages(&["post"], 10_000).await;
    let before = s.at(Status::Pay, |_| {}).await;
    assert_eq!(s.committed().await, 1250);
    let Handled::Done(failed) = s.deliver(Stage::Pay, 0).await else { panic!("the payment ran") };
    assert_eq!((failed.status(), failed.pay.done, failed.pay.undone), (Status::Failed, 2, 2));
    assert!(failed.reason().unwrap().contains("ledger declined post"), "{:?}", failed.reason());
    assert_eq!(s.calls(), ["capture", "settle", "post", "cancel", "refund"]);
    assert_eq!(writes_between(&before, &s.ticket().await), 3, "the claim, the turn to undoing under a claim of its own, the end");
    assert_eq!(s.committed().await, 0, "the reservation is given back");
}

#[tokio::test]
async fn a_run_that_finds_a_lapsed_claim_asks_each_step_before_it_sends_any() {
    let s = stages(&[], 10_000).await;
    // A run claimed the payment and died after its capture and settle were applied.
    let dead = Utc::now() - chrono::Duration::from_std(LEASE * 2).unwrap();
    s.at(Status::Pay, |t| t.pay.slot.claim(Operation::Step(PayStep::Capture), dead)).await;
    let t = s.ticket().await.value;
    for step in [PayStep::Capture, PayStep::Settle] {
        let op = Operation::Step(step);
        s.providers.applied.lock().unwrap().insert(t.operation_key(op), op.name().into());
    }
    let Handled::Done(paid) = s.deliver(Stage::Pay, 0).await else { panic!("the payment ran") };
    assert_eq!(paid.status(), Status::Paid);
    assert_eq!(s.calls(), ["status capture", "status settle", "status post", "post", "issue"], "nothing applied is sent again");
}

#[tokio::test]
async fn a_claim_a_live_run_holds_sends_nothing_and_comes_back_after_its_lease() {
    let s = stages(&[], 10_000).await;
    s.at(Status::Pay, |t| {
        t.pay.done = 1;
        t.pay.slot.claim(Operation::Step(PayStep::Settle), Utc::now());
    })
    .await;
    assert_eq!(s.deliver(Stage::Pay, 0).await, Handled::Deferred);
    assert!(s.calls().is_empty(), "{:?}", s.calls());
    let recheck = s.bus.0.lock().unwrap().last().cloned().expect("a copy to look again");
    assert!(recheck.scheduled_at.unwrap() > Utc::now() + chrono::Duration::from_std(LEASE / 2).unwrap(), "{recheck:?}");
}

#[tokio::test]
async fn a_message_for_an_earlier_attempt_changes_nothing_and_the_awaited_one_is_sent_again() {
    let s = stages(&[], 10_000).await;
    let before = s.at(Status::Pay, |t| t.attempt = 2).await;
    assert_eq!(s.deliver(Stage::Pay, 1).await, Handled::Stale);
    assert!(s.calls().is_empty());
    assert_eq!(s.ticket().await.etag, before.etag, "nothing written");
    let sent = s.bus.0.lock().unwrap().clone();
    assert!(sent.iter().any(|m| m.queue == "ticket-pay" && m.message_id.ends_with(":pay:2")), "{sent:?}");
}

#[tokio::test]
async fn a_reservation_past_the_budget_ends_over_budget_holding_nothing_and_lets_the_claim_go() {
    let s = stages(&[], 1_000).await;
    s.at(Status::Reserve, |_| {}).await;
    let Handled::Done(ended) = s.deliver(Stage::Reserve, 0).await else { panic!("the reservation ran") };
    assert_eq!((ended.status(), ended.reserved().minor), (Status::OverBudget, 0));
    assert!(ended.reason().unwrap().starts_with("needs 12.50"), "{:?}", ended.reason());
    assert_eq!(s.committed().await, 0);
    let claim = s.pipeline.store.payment_claim(&ended.authority, &ended.ticket_id).await.unwrap();
    assert!(claim.is_none(), "another batch may pay it now: {claim:?}");
    assert_eq!(s.sent_to("ticket-notify"), 1, "the client is told");
}

#[tokio::test]
async fn a_ticket_past_lookup_with_no_amount_due_is_refused_for_good_and_nobody_is_asked() {
    for (status, stage) in [(Status::Validate, Stage::Validate), (Status::Reserve, Stage::Reserve)] {
        let s = stages(&[], 10_000).await;
        s.at(status, |t| *t = without_amount_due(t)).await;
        let message = StageMessage { batch_id: s.batch.batch_id.clone(), ticket_id: TicketId::parse("t1").unwrap(), attempt: 0, deferrals: 0 };
        let refused = s.pipeline.handle(stage, message).await.unwrap_err();
        assert!(!refused.is_transient(), "{stage}: {refused}");
        assert!(refused.to_string().contains("no amount due"), "{stage}: {refused}");
        assert_eq!(s.committed().await, 0, "{stage}: nothing held");
        assert!(s.calls().is_empty(), "{stage}: {:?}", s.calls());
    }
}

#[tokio::test]
async fn a_validation_retried_asks_only_the_validators_that_have_not_approved() {
    let s = stages(&[], 10_000).await;
    s.providers.unavailable.lock().unwrap().insert("check fraud".into(), 1);
    s.at(Status::Validate, |_| {}).await;
    let Handled::Done(waiting) = s.deliver(Stage::Validate, 0).await else { panic!("the validation ran") };
    assert_eq!(waiting.status(), Status::Validate);
    assert_eq!(waiting.approved_by(), [ProviderName::Registry, ProviderName::Sanctions]);
    assert_eq!((waiting.attempt, waiting.failures), (1, 1));
    let Handled::Done(validated) = s.deliver(Stage::Validate, 1).await else { panic!("the retry ran") };
    assert_eq!(validated.status(), Status::Reserve);
    assert_eq!(s.calls(), ["check registry", "check fraud", "check sanctions", "check fraud"]);
    let trail = s.pipeline.store.events(&s.batch.batch_id, &validated.ticket_id).await.unwrap();
    let exchanges = trail.iter().filter(|e| matches!(e.kind, EventKind::Exchange(_))).count();
    assert_eq!(exchanges, 4, "each check asked is in the trail, and only those");
}

/// The retry limit counts failures in a row: a step applied between two
/// failures starts the count again, and the attempt number keeps growing (each
/// retry's message has its own id).
#[tokio::test]
async fn failures_between_which_the_ticket_got_further_never_add_up_to_a_park() {
    let mut s = stages(&[], 10_000).await;
    s.pipeline.retry = RetryPolicy { max_attempts: 2, base: Duration::ZERO, cap: Duration::ZERO };
    for step in ["capture", "settle", "post"] {
        s.providers.unavailable.lock().unwrap().insert(step.into(), 1);
    }
    s.at(Status::Pay, |_| {}).await;
    let (mut attempt, mut retried) = (0, Vec::new());
    let paid = loop {
        let Handled::Done(t) = s.deliver(Stage::Pay, attempt).await else { panic!("attempt {attempt} ran") };
        if t.status() != Status::Pay {
            break t;
        }
        retried.push((t.attempt, t.failures));
        attempt = t.attempt;
    };
    assert_eq!(paid.status(), Status::Paid, "{:?}", paid.reason());
    assert_eq!(retried, [(1, 1), (2, 1), (3, 1)]);
    assert_eq!(s.providers.applied.lock().unwrap().len(), 4, "each step applied once");

    let mut s = stages(&[], 10_000).await;
    s.pipeline.retry = RetryPolicy { max_attempts: 2, base: Duration::ZERO, cap: Duration::ZERO };
    s.providers.unavailable.lock().unwrap().insert("settle".into(), 2);
    s.at(Status::Pay, |_| {}).await;
    s.deliver(Stage::Pay, 0).await;
    let Handled::Done(parked) = s.deliver(Stage::Pay, 1).await else { panic!("the retry ran") };
    assert_eq!((parked.status(), parked.parked_stage()), (Status::Parked, Some(Stage::Pay)), "two failures of one step in a row");
    assert!(parked.reason().unwrap().contains("after 2 attempts"), "{:?}", parked.reason());
}

#[tokio::test]
async fn a_sessions_reservations_are_taken_in_order_and_a_copy_among_them_holds_nothing_twice() {
    let s = stages(&[], 10_000).await;
    let now = Utc::now();
    let owed = [1250, 2000, 1000, 500, 800];
    let (mut batch, line) = batch_of_one(BatchId::generate(), "acme", 3_000, now);
    batch.tickets = owed.len() as u32;
    let tickets: Vec<Ticket> = owed
        .iter()
        .enumerate()
        .map(|(i, minor)| {
            let mut line = line.clone();
            line.ticket_id = TicketId::parse(&format!("s{i}")).unwrap();
            let mut t = Ticket::accepted(&batch, line, now);
            t.move_to(State::waiting_for(Stage::Reserve), now);
            t.owes(t.money(*minor)).unwrap();
            t
        })
        .collect();
    s.pipeline.store.create_batch(&batch, &tickets, &[]).await.unwrap();
    let message = |t: &Ticket| StageMessage { batch_id: batch.batch_id.clone(), ticket_id: t.ticket_id.clone(), attempt: t.attempt, deferrals: 0 };
    let mut messages: Vec<_> = tickets.iter().map(|t| (message(t), tracing::Span::none())).collect();
    messages.push((message(&tickets[0]), tracing::Span::none()));

    let handled = s.pipeline.handle_session(Stage::Reserve, &messages).await;
    let statuses: Vec<Status> = handled
        .iter()
        .map(|h| match h {
            Ok(Handled::Done(t)) => t.status(),
            other => panic!("{other:?}"),
        })
        .collect();
    use Status::{OverBudget, Pay};
    assert_eq!(statuses, [Pay, OverBudget, Pay, Pay, OverBudget, Pay], "taken in order; a smaller one after a refusal still fits");
    let held = s.pipeline.store.batch(&batch.batch_id).await.unwrap().unwrap();
    assert_eq!(held.committed().minor, 1250 + 1000 + 500, "the copy of the first message held nothing more");
    let summary = s.pipeline.store.summary(&batch.batch_id, Utc::now()).await.unwrap();
    assert_eq!(summary.reserved, held.committed().minor);
    let to_pay: HashSet<String> = s.bus.0.lock().unwrap().iter().filter(|m| m.queue == "ticket-pay").map(|m| m.message_id.clone()).collect();
    assert_eq!(to_pay.len(), 3);
    for over in [&tickets[1], &tickets[4]] {
        let claim = s.pipeline.store.payment_claim(&over.authority, &over.ticket_id).await.unwrap();
        assert!(claim.is_none(), "a ticket over budget gives its payment claim up");
    }
}
