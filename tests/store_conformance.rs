//! The store contract, one suite for every implementation of the seam.
//! Each backend gets the same tests and must give the same results.

use std::sync::Arc;

use chrono::Utc;
use ticketpay::domain::{
    AuthorityCode, Batch, BatchId, BatchRequest, ClientId, Currency, Event, EventKind, Money, Operation, PayStep, Reference, Stage, State,
    Status, Ticket, TicketId,
};
use ticketpay::domain::reconciliation::{Check, ProviderView, ReconciliationRun, Recorded, Verdict};
use ticketpay::domain::upload::TicketLine;
use ticketpay::providers::ProviderName;
use ticketpay::store::sqlite::SqliteStore;
use ticketpay::store::{BudgetChange, Created, PaymentClaim, Store, StoreError, TicketUpdate};

fn eur(minor: i64) -> Money {
    Money::new(minor, Currency::parse("EUR").unwrap())
}

/// A batch of `tickets` lines that the store has not seen, paying in EUR.
fn batch(client: &str, budget: i64, tickets: u32, key: Option<&str>) -> Batch {
    let line = |i| TicketLine { ticket_id: TicketId::parse(&format!("t{i:04}")).unwrap(), authority: AuthorityCode::parse("CITY-PARKING").unwrap(), reference: None };
    let request = BatchRequest { client_id: ClientId::parse(client).unwrap(), currency: Currency::parse("EUR").unwrap(), budget: eur(budget), tickets: (0..tickets).map(line).collect() };
    let mut b = Batch::accepted(BatchId::generate(), &request, key.map(str::to_owned), Utc::now());
    b.request_digest = "digest".into();
    b
}

fn tickets(b: &Batch, n: u32) -> Vec<Ticket> {
    (0..n)
        .map(|i| {
            let line = TicketLine {
                ticket_id: TicketId::parse(&format!("t{i:04}")).unwrap(),
                authority: AuthorityCode::parse("CITY-PARKING").unwrap(),
                reference: Some(Reference::parse(&format!("{}-ref-{i}", b.batch_id)).unwrap()),
            };
            Ticket::accepted(b, line, b.created_at)
        })
        .collect()
}

fn accepted(ts: &[Ticket]) -> Vec<Event> {
    ts.iter().map(|t| Event::new(&t.batch_id, &t.ticket_id, Stage::Lookup, EventKind::Accepted, Utc::now())).collect()
}

async fn seeded(store: &dyn Store, budget: i64, n: u32) -> (Batch, Vec<Ticket>) {
    let b = batch("acme", budget, n, None);
    let ts = tickets(&b, n);
    assert_eq!(store.create_batch(&b, &ts, &accepted(&ts)).await.unwrap(), Created::New);
    (b, ts)
}

fn moved(t: &Ticket, state: State) -> Ticket {
    let mut t = t.clone();
    t.state = state;
    t
}

async fn batches_and_tickets_are_created_once(store: Arc<dyn Store>) {
    let (b, ts) = seeded(store.as_ref(), 1_000, 3).await;
    assert!(matches!(store.create_batch(&b, &ts, &[]).await, Err(StoreError::Conflict(_))), "the same batch twice");
    let got = store.batch(&b.batch_id).await.unwrap().unwrap();
    assert_eq!(got, b);
    assert_eq!(store.tickets(&b.batch_id, None, 10, None).await.unwrap().tickets.len(), 3);

    let keyed = batch("acme", 500, 1, Some("key-1"));
    let kt = tickets(&keyed, 1);
    assert_eq!(store.create_batch(&keyed, &kt, &[]).await.unwrap(), Created::New);
    let retry = batch("acme", 500, 1, Some("key-1"));
    let rt = tickets(&retry, 1);
    match store.create_batch(&retry, &rt, &[]).await.unwrap() {
        Created::Existing(existing) => assert_eq!(existing.batch_id, keyed.batch_id),
        Created::New => panic!("the idempotency key was used already"),
    }
    assert!(store.batch(&retry.batch_id).await.unwrap().is_none(), "nothing of the retry was stored");
    let other_client = batch("globex", 500, 1, Some("key-1"));
    let ot = tickets(&other_client, 1);
    assert_eq!(store.create_batch(&other_client, &ot, &[]).await.unwrap(), Created::New, "keys are per client");
    assert!(store.batch(&BatchId::parse("b-missing").unwrap()).await.unwrap().is_none());
}

async fn transitions_are_conditional_and_apply_once(store: Arc<dyn Store>) {
    let (b, ts) = seeded(store.as_ref(), 1_000, 1).await;
    let current = store.ticket(&b.batch_id, &ts[0].ticket_id).await.unwrap().unwrap();
    let update = TicketUpdate { ticket: moved(&current.value, State::waiting_for(Stage::Validate)), etag: current.etag.clone(), budget: None, events: vec![] };
    let after = store.update_ticket(update.clone()).await.unwrap();
    assert_ne!(after.etag, current.etag);
    assert!(matches!(store.update_ticket(update).await, Err(StoreError::Conflict(_))), "a redelivered transition");
    let stored = store.ticket(&b.batch_id, &ts[0].ticket_id).await.unwrap().unwrap();
    assert_eq!(stored.value.status(), Status::Validate);
    assert_eq!(stored.etag, after.etag);

    // A reservation redelivered with the old version does not hold the money twice.
    let reserve = TicketUpdate {
        ticket: { let mut t = moved(&stored.value, State::Pay); t.hold(t.money(300)).unwrap(); t },
        etag: stored.etag.clone(),
        budget: Some(BudgetChange::Reserve(eur(300))),
        events: vec![],
    };
    store.update_ticket(reserve.clone()).await.unwrap();
    assert!(matches!(store.update_ticket(reserve).await, Err(StoreError::Conflict(_))));
    assert_eq!(store.batch(&b.batch_id).await.unwrap().unwrap().committed().minor, 300);
}

async fn concurrent_reservations_never_overspend(store: Arc<dyn Store>) {
    let (b, ts) = seeded(store.as_ref(), 10_000, 60).await;
    let mut tasks = Vec::new();
    for t in ts {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let current = store.ticket(&t.batch_id, &t.ticket_id).await.unwrap().unwrap();
            let mut next = moved(&current.value, State::Pay);
            next.hold(next.money(700)).unwrap();
            let update = TicketUpdate { ticket: next, etag: current.etag, budget: Some(BudgetChange::Reserve(eur(700))), events: vec![] };
            match store.update_ticket(update).await {
                Ok(_) => true,
                Err(StoreError::InsufficientBudget) => false,
                Err(e) => panic!("unexpected {e}"),
            }
        }));
    }
    let mut reserved = 0;
    for task in tasks {
        reserved += i64::from(task.await.unwrap());
    }
    assert_eq!(reserved, 14, "10,000 holds exactly 14 reservations of 700");
    let batch = store.batch(&b.batch_id).await.unwrap().unwrap();
    let summary = store.summary(&b.batch_id, Utc::now()).await.unwrap();
    assert_eq!(batch.committed().minor, 9_800);
    assert!(batch.committed().minor <= batch.budget().minor);
    assert_eq!(summary.reserved, 9_800, "the tickets hold what the budget says is held");
    assert_eq!(batch.remaining().minor, batch.budget().minor - summary.reserved - summary.paid);
    assert_eq!(summary.counts[&Status::Pay], 14);
    assert_eq!(summary.counts[&Status::Lookup], 46, "a refused reservation changed nothing");
}

/// A reservation made from a ticket version that has moved on is refused. Tried
/// again from the current version it holds the money once; and a ticket that
/// ends holding nothing leaves the budget whole.
async fn a_stale_reservation_never_holds_money_twice_nor_once_its_ticket_ends(store: Arc<dyn Store>) {
    let (b, ts) = seeded(store.as_ref(), 1_000, 2).await;
    let reserve = |t: &ticketpay::store::Versioned<Ticket>, etag: &str| {
        let mut next = moved(&t.value, State::Pay);
        next.hold(next.money(300)).unwrap();
        TicketUpdate { ticket: next, etag: etag.to_owned(), budget: Some(BudgetChange::Reserve(eur(300))), events: vec![] }
    };
    let touch = |t: &ticketpay::store::Versioned<Ticket>| {
        let mut next = t.value.clone();
        next.attempt += 1;
        TicketUpdate { ticket: next, etag: t.etag.clone(), budget: None, events: vec![] }
    };

    let first = store.ticket(&b.batch_id, &ts[0].ticket_id).await.unwrap().unwrap();
    let now = store.update_ticket(touch(&first)).await.unwrap();
    assert!(matches!(store.update_ticket(reserve(&first, &first.etag)).await, Err(StoreError::Conflict(_))), "from a stale version");
    store.update_ticket(reserve(&now, &now.etag)).await.expect("from the current version");
    assert_eq!(store.batch(&b.batch_id).await.unwrap().unwrap().committed().minor, 300, "held once");

    let second = store.ticket(&b.batch_id, &ts[1].ticket_id).await.unwrap().unwrap();
    let now = store.update_ticket(touch(&second)).await.unwrap();
    assert!(matches!(store.update_ticket(reserve(&second, &second.etag)).await, Err(StoreError::Conflict(_))));
    let mut ended = moved(&now.value, State::OverBudget { reason: "needs more than is left".into() });
    ended.notified = true;
    store.update_ticket(TicketUpdate { ticket: ended, etag: now.etag.clone(), budget: None, events: vec![] }).await.unwrap();
    let batch = store.batch(&b.batch_id).await.unwrap().unwrap();
    let summary = store.summary(&b.batch_id, Utc::now()).await.unwrap();
    assert_eq!(batch.committed().minor, 300, "the ticket that ended holds nothing of the budget");
    assert_eq!(batch.remaining().minor, batch.budget().minor - summary.reserved - summary.paid);
}

fn reservation(t: &ticketpay::store::Versioned<Ticket>, etag: &str, minor: i64) -> TicketUpdate {
    let mut next = moved(&t.value, State::Pay);
    next.hold(next.money(minor)).unwrap();
    TicketUpdate { ticket: next, etag: etag.to_owned(), budget: Some(BudgetChange::Reserve(eur(minor))), events: vec![] }
}

fn outcome(result: &Result<ticketpay::store::Versioned<Ticket>, StoreError>) -> &'static str {
    match result {
        Ok(_) => "held",
        Err(StoreError::InsufficientBudget) => "insufficient",
        Err(StoreError::Conflict(_)) => "stale",
        Err(_) => "other",
    }
}

/// Reservations given together are taken as if one after the other, in their
/// order: one that does not fit is refused alone and a later, smaller one still
/// fits; a stale one is refused; given again, none holds money twice; and one
/// whose earlier try left its commitment holds the money once.
async fn reservations_given_together_are_taken_in_order_and_held_once(store: Arc<dyn Store>) {
    let (b, ts) = seeded(store.as_ref(), 1_000, 8).await;
    let mut current = Vec::new();
    for t in &ts {
        current.push(store.ticket(&b.batch_id, &t.ticket_id).await.unwrap().unwrap());
    }
    let stale = current[5].clone();
    let mut touched = stale.value.clone();
    touched.attempt += 1;
    current[5] = store.update_ticket(TicketUpdate { ticket: touched, etag: stale.etag.clone(), budget: None, events: vec![] }).await.unwrap();
    let wanted = [400, 700, 300, 400, 300, 100];
    let updates: Vec<_> = wanted.iter().enumerate().map(|(i, minor)| {
        let from = if i == 5 { &stale } else { &current[i] };
        reservation(from, &from.etag, *minor)
    }).collect();
    let results = store.update_tickets(updates.clone()).await;
    assert_eq!(results.iter().map(outcome).collect::<Vec<_>>(), ["held", "insufficient", "held", "insufficient", "held", "stale"]);
    let batch = store.batch(&b.batch_id).await.unwrap().unwrap();
    let summary = store.summary(&b.batch_id, Utc::now()).await.unwrap();
    assert_eq!((batch.committed().minor, summary.reserved, summary.count(Status::Pay)), (1_000, 1_000, 3));
    assert_eq!(results[2].as_ref().unwrap().value.reserved().minor, 300);

    let again = store.update_tickets(updates).await;
    assert!(again.iter().all(|r| matches!(r, Err(StoreError::Conflict(_)) | Err(StoreError::InsufficientBudget))), "{:?}", again.iter().map(outcome).collect::<Vec<_>>());
    assert_eq!(store.batch(&b.batch_id).await.unwrap().unwrap().committed().minor, 1_000, "given again, nothing held twice");

    // A second batch: an earlier try of a reservation whose ticket had moved on.
    let (b, ts) = seeded(store.as_ref(), 1_000, 2).await;
    let first = store.ticket(&b.batch_id, &ts[0].ticket_id).await.unwrap().unwrap();
    let mut touched = first.value.clone();
    touched.attempt += 1;
    let now = store.update_ticket(TicketUpdate { ticket: touched, etag: first.etag.clone(), budget: None, events: vec![] }).await.unwrap();
    assert!(matches!(store.update_ticket(reservation(&first, &first.etag, 200)).await, Err(StoreError::Conflict(_))));
    let second = store.ticket(&b.batch_id, &ts[1].ticket_id).await.unwrap().unwrap();
    let results = store.update_tickets(vec![reservation(&now, &now.etag, 200), reservation(&second, &second.etag, 300)]).await;
    assert_eq!(results.iter().map(outcome).collect::<Vec<_>>(), ["held", "held"]);
    assert_eq!(store.batch(&b.batch_id).await.unwrap().unwrap().committed().minor, 500, "the earlier try's hold counted once");
    assert_eq!(store.summary(&b.batch_id, Utc::now()).await.unwrap().reserved, 500);

    // The same change given twice (a message and its copy): held once, the copy finds it moved.
    let (b, ts) = seeded(store.as_ref(), 1_000, 1).await;
    let current = store.ticket(&b.batch_id, &ts[0].ticket_id).await.unwrap().unwrap();
    let twice = vec![reservation(&current, &current.etag, 300), reservation(&current, &current.etag, 300)];
    assert_eq!(store.update_tickets(twice).await.iter().map(outcome).collect::<Vec<_>>(), ["held", "stale"]);
    assert_eq!(store.batch(&b.batch_id).await.unwrap().unwrap().committed().minor, 300);

    // One in another currency than its batch's is refused as invalid, alone, and holds nothing.
    let (b, ts) = seeded(store.as_ref(), 1_000, 3).await;
    let mut updates = Vec::new();
    for t in &ts {
        let current = store.ticket(&b.batch_id, &t.ticket_id).await.unwrap().unwrap();
        updates.push(reservation(&current, &current.etag, 100));
    }
    updates[1].budget = Some(BudgetChange::Reserve(Money::new(100, Currency::parse("USD").unwrap())));
    let results = store.update_tickets(updates).await;
    assert!(matches!(results[1], Err(StoreError::Invalid(_))), "{:?}", results[1].as_ref().err());
    assert_eq!([outcome(&results[0]), outcome(&results[2])], ["held", "held"]);
    assert_eq!(store.batch(&b.batch_id).await.unwrap().unwrap().committed().minor, 200);
    assert_eq!(store.ticket(&b.batch_id, &ts[1].ticket_id).await.unwrap().unwrap().value.status(), Status::Lookup, "nothing of it stored");
}

async fn a_failed_payment_releases_exactly_its_reservation(store: Arc<dyn Store>) {
    let (b, ts) = seeded(store.as_ref(), 1_000, 2).await;
    let mut versions = Vec::new();
    for t in &ts {
        let current = store.ticket(&b.batch_id, &t.ticket_id).await.unwrap().unwrap();
        let mut next = moved(&current.value, State::Pay);
        next.hold(next.money(400)).unwrap();
        let u = TicketUpdate { ticket: next, etag: current.etag, budget: Some(BudgetChange::Reserve(eur(400))), events: vec![] };
        versions.push(store.update_ticket(u).await.unwrap());
    }
    let mut paid = versions[0].value.clone();
    paid.pay_reservation();
    paid.state = State::Paid;
    store.update_ticket(TicketUpdate { ticket: paid, etag: versions[0].etag.clone(), budget: None, events: vec![] }).await.unwrap();
    let mut failed = versions[1].value.clone();
    failed.release_reservation();
    failed.state = State::Failed { reason: "settlement declined".into() };
    let over = TicketUpdate { ticket: failed.clone(), etag: versions[1].etag.clone(), budget: Some(BudgetChange::Release(eur(500))), events: vec![] };
    assert!(matches!(store.update_ticket(over).await, Err(StoreError::Invalid(_))), "more than the ticket holds is refused");
    let unchanged = store.ticket(&b.batch_id, &ts[1].ticket_id).await.unwrap().unwrap();
    assert_eq!((unchanged.etag.as_str(), unchanged.value.status()), (versions[1].etag.as_str(), Status::Pay), "and nothing is written");
    assert_eq!(store.batch(&b.batch_id).await.unwrap().unwrap().committed().minor, 800);
    let release = TicketUpdate { ticket: failed, etag: versions[1].etag.clone(), budget: Some(BudgetChange::Release(eur(400))), events: vec![] };
    store.update_ticket(release).await.unwrap();

    let batch = store.batch(&b.batch_id).await.unwrap().unwrap();
    let summary = store.summary(&b.batch_id, Utc::now()).await.unwrap();
    assert_eq!((batch.committed().minor, summary.paid, summary.reserved), (400, 400, 0));
    assert_eq!(batch.remaining(), eur(600));
    assert_eq!(batch.remaining().minor, batch.budget().minor - summary.reserved - summary.paid);
}

async fn events_are_appended_and_read_in_order(store: Arc<dyn Store>) {
    let (b, ts) = seeded(store.as_ref(), 1_000, 2).await;
    let t = &ts[0];
    let kinds: Vec<EventKind> = (0..20).map(|i| EventKind::Notified { outcome: format!("n{i}") }).collect();
    for chunk in kinds.chunks(7) {
        let events: Vec<Event> = chunk.iter().map(|k| Event::new(&t.batch_id, &t.ticket_id, Stage::Notify, k.clone(), Utc::now())).collect();
        store.append_events(&events).await.unwrap();
    }
    let current = store.ticket(&b.batch_id, &t.ticket_id).await.unwrap().unwrap();
    let with_change = Event::new(&t.batch_id, &t.ticket_id, Stage::Lookup, EventKind::Paid { amount: t.money(100) }, Utc::now());
    let u = TicketUpdate { ticket: moved(&current.value, State::waiting_for(Stage::Validate)), etag: current.etag, budget: None, events: vec![with_change.clone()] };
    store.update_ticket(u).await.unwrap();
    let stale = TicketUpdate { ticket: moved(&current.value, State::Rejected { reason: "amount mismatch".into() }), etag: "0".into(), budget: None, events: vec![with_change.clone()] };
    assert!(store.update_ticket(stale).await.is_err());

    let read = store.events(&b.batch_id, &t.ticket_id).await.unwrap();
    assert_eq!(read.len(), 1 + 20 + 1, "accepted, twenty notes, one change; the refused change wrote nothing");
    assert_eq!(read[0].kind, EventKind::Accepted);
    for (i, e) in read[1..21].iter().enumerate() {
        assert_eq!(e.kind, EventKind::Notified { outcome: format!("n{i}") });
    }
    assert_eq!(read[21], with_change);
    assert_eq!(store.events(&b.batch_id, &ts[1].ticket_id).await.unwrap().len(), 1, "another ticket's log is its own");

    // Many tickets share a partition of a store that spreads a batch over a few: each reads its own upload.
    let (b, ts) = seeded(store.as_ref(), 1_000, 200).await;
    for t in &ts {
        let read = store.events(&b.batch_id, &t.ticket_id).await.unwrap();
        assert_eq!(read.iter().map(|e| (&e.ticket_id, &e.kind)).collect::<Vec<_>>(), [(&t.ticket_id, &EventKind::Accepted)], "{}", t.ticket_id);
    }
}

/// Events no deflating shortens much, too many to keep beside a ticket.
fn long_note(t: &Ticket) -> Event {
    let outcome = (0..60).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect::<String>();
    Event::new(&t.batch_id, &t.ticket_id, Stage::Notify, EventKind::Notified { outcome }, Utc::now())
}

/// Writes `steps` to the ticket in order ("change", "quiet change" with no
/// events, "long change", "append", "long append"); every event written, in order.
async fn write_steps(stores: &[&dyn Store], t: &Ticket, steps: &[&str]) -> Vec<EventKind> {
    let note = |outcome: String| Event::new(&t.batch_id, &t.ticket_id, Stage::Notify, EventKind::Notified { outcome }, Utc::now());
    let mut written = vec![EventKind::Accepted];
    for (i, step) in steps.iter().enumerate() {
        let store = stores[i % stores.len()];
        let events = match *step {
            "quiet change" => Vec::new(),
            s if s.starts_with("long") => vec![long_note(t)],
            _ => vec![note(format!("{step} {i}")), note(format!("{step} {i}, again"))],
        };
        written.extend(events.iter().map(|e| e.kind.clone()));
        if step.ends_with("append") {
            store.append_events(&events).await.unwrap();
            continue;
        }
        let current = store.ticket(&t.batch_id, &t.ticket_id).await.unwrap().unwrap();
        let mut ticket = current.value.clone();
        ticket.attempt += 1;
        store.update_ticket(TicketUpdate { ticket, etag: current.etag, budget: None, events }).await.unwrap();
    }
    written
}

async fn a_tickets_trail_reads_in_the_order_written(store: Arc<dyn Store>) {
    let (b, ts) = seeded(store.as_ref(), 1_000, 1).await;
    let steps = ["change", "append", "quiet change", "change", "long change", "change", "append", "change", "long append", "change", "quiet change"];
    let written = write_steps(&[store.as_ref()], &ts[0], &steps).await;
    let read: Vec<EventKind> = store.events(&b.batch_id, &ts[0].ticket_id).await.unwrap().into_iter().map(|e| e.kind).collect();
    assert_eq!(read, written);
}

async fn tickets_page_by_id_and_filter_by_status(store: Arc<dyn Store>) {
    let (b, ts) = seeded(store.as_ref(), 1_000, 25).await;
    for t in ts.iter().step_by(5) {
        let current = store.ticket(&b.batch_id, &t.ticket_id).await.unwrap().unwrap();
        let mut done = moved(&current.value, State::NotPayable { reason: "nothing is due".into() });
        done.notified = true;
        store.update_ticket(TicketUpdate { ticket: done, etag: current.etag, budget: None, events: vec![] }).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store.tickets(&b.batch_id, None, 10, cursor.as_deref()).await.unwrap();
        seen.extend(page.tickets.iter().map(|t| t.ticket_id.to_string()));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let expected: Vec<String> = ts.iter().map(|t| t.ticket_id.to_string()).collect();
    assert_eq!(seen, expected, "every ticket once, in id order");
    let ended = store.tickets(&b.batch_id, Some(Status::NotPayable), 100, None).await.unwrap();
    assert_eq!(ended.tickets.len(), 5);
    assert!(ended.next_cursor.is_none());
    assert!(ended.tickets.iter().all(|t| t.status() == Status::NotPayable));
    assert!(store.has_open_tickets(&b.batch_id).await.unwrap(), "20 tickets are still open");
    let summary = store.summary(&b.batch_id, Utc::now()).await.unwrap();
    assert_eq!((summary.counts[&Status::Lookup], summary.counts[&Status::NotPayable], summary.awaiting_notification), (20, 5, 0));

    assert!(store.mark_completed(&b.batch_id, Utc::now()).await.unwrap());
    assert!(!store.mark_completed(&b.batch_id, Utc::now()).await.unwrap(), "completion is recorded once");
    store.mark_enqueued(&b.batch_id).await.unwrap();
    assert!(store.batch(&b.batch_id).await.unwrap().unwrap().enqueued);

    let reference = ts[3].reference.as_ref().unwrap().as_str();
    let found = store.find_by_reference(reference, None, 10).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].ticket_id, ts[3].ticket_id);
    let own = store.find_by_reference(reference, Some(&b.client_id), 10).await.unwrap();
    assert_eq!(own, found, "the batch's own client finds it");
    let other = ClientId::parse("someone-else").unwrap();
    assert!(store.find_by_reference(reference, Some(&other), 10).await.unwrap().is_empty(), "another client does not");
}

async fn batches_are_listed_by_client_newest_first(store: Arc<dyn Store>) {
    let mut acme = Vec::new();
    for i in 0..3 {
        let mut b = batch("acme", 100, 1, None);
        b.created_at = Utc::now() + chrono::Duration::seconds(i);
        store.create_batch(&b, &tickets(&b, 1), &[]).await.unwrap();
        acme.push(b.batch_id);
    }
    let g = batch("globex", 100, 1, None);
    store.create_batch(&g, &tickets(&g, 1), &[]).await.unwrap();
    let listed: Vec<BatchId> =
        store.batches(Some(&ClientId::parse("acme").unwrap()), 10).await.unwrap().into_iter().map(|b| b.batch_id).collect();
    acme.reverse();
    assert_eq!(listed, acme);
    assert_eq!(store.batches(None, 10).await.unwrap().len(), 4);
    assert_eq!(store.batches(None, 2).await.unwrap().len(), 2);
}

async fn overdue_tickets_and_unrecorded_completions_are_found(store: Arc<dyn Store>) {
    let (b, ts) = seeded(store.as_ref(), 1_000, 3).await;
    let mine = |found: Vec<ticketpay::store::Versioned<Ticket>>| found.into_iter().filter(|t| t.value.batch_id == b.batch_id).count();
    let before_upload = b.created_at - chrono::Duration::seconds(1);
    assert_eq!(mine(store.overdue_tickets(before_upload, 100).await.unwrap()), 0, "nothing is overdue before it is due");
    let later = Utc::now() + chrono::Duration::minutes(1);
    assert_eq!(mine(store.overdue_tickets(later, 100).await.unwrap()), 3);
    assert_eq!(store.summary(&b.batch_id, later).await.unwrap().overdue, 3);

    let update = |t: ticketpay::store::Versioned<Ticket>, change: &dyn Fn(&mut Ticket)| {
        let mut ticket = t.value.clone();
        change(&mut ticket);
        TicketUpdate { ticket, etag: t.etag, budget: None, events: vec![] }
    };
    let retrying = store.ticket(&b.batch_id, &ts[0].ticket_id).await.unwrap().unwrap();
    store.update_ticket(update(retrying, &|t| t.retry_at = Some(Utc::now() + chrono::Duration::minutes(5)))).await.unwrap();
    assert_eq!(store.summary(&b.batch_id, later).await.unwrap().overdue, 2, "a retry scheduled later is not due yet");
    let told = store.ticket(&b.batch_id, &ts[1].ticket_id).await.unwrap().unwrap();
    store
        .update_ticket(update(told, &|t| {
            t.state = State::Rejected { reason: "amount mismatch".into() };
            t.notified = true;
        }))
        .await
        .unwrap();
    assert_eq!(store.summary(&b.batch_id, later).await.unwrap().overdue, 1, "an ended and told ticket waits for nothing");
    assert_eq!(mine(store.overdue_tickets(later, 100).await.unwrap()), 1);

    let incomplete = |list: Vec<Batch>| list.iter().any(|x| x.batch_id == b.batch_id);
    assert!(incomplete(store.incomplete_batches(100).await.unwrap()));
    assert!(store.mark_completed(&b.batch_id, Utc::now()).await.unwrap());
    assert!(!incomplete(store.incomplete_batches(100).await.unwrap()), "a recorded completion");
    store.reopen(&b.batch_id).await.unwrap();
    assert!(store.batch(&b.batch_id).await.unwrap().unwrap().completed_at.is_none(), "reopened");
    assert!(incomplete(store.incomplete_batches(100).await.unwrap()));
}

fn claim(batch: &BatchId, ticket: &str) -> PaymentClaim {
    PaymentClaim {
        authority: AuthorityCode::parse("CITY-PARKING").unwrap(),
        ticket_id: TicketId::parse(ticket).unwrap(),
        batch_id: batch.clone(),
        claimed_at: Utc::now(),
    }
}

async fn a_payment_claim_changes_hands_only_from_the_version_read(store: Arc<dyn Store>) {
    let (a, b, c) = (BatchId::generate(), BatchId::generate(), BatchId::generate());
    let ticket = format!("t-{}", uuid::Uuid::new_v4().simple());
    let mine = claim(&a, &ticket);
    assert!(store.payment_claim(&mine.authority, &mine.ticket_id).await.unwrap().is_none());
    let taken = store.take_payment_claim(&mine, None).await.unwrap();
    assert_eq!(taken.value, mine);
    let read = store.payment_claim(&mine.authority, &mine.ticket_id).await.unwrap().unwrap();
    assert_eq!(read, taken, "read back as taken, with its version");
    assert!(matches!(store.take_payment_claim(&claim(&b, &ticket), None).await, Err(StoreError::Conflict(_))), "held already");
    assert!(matches!(store.take_payment_claim(&mine, None).await, Err(StoreError::Conflict(_))), "even by its owner, without its version");
    let other_authority = PaymentClaim { authority: AuthorityCode::parse("STATE-TOLLS").unwrap(), ..claim(&b, &ticket) };
    store.take_payment_claim(&other_authority, None).await.expect("the same ticket id of another authority is another ticket");

    let again = store.take_payment_claim(&mine, Some(&read.etag)).await.expect("its owner takes it again as read");
    assert_ne!(again.etag, read.etag);
    assert!(matches!(store.take_payment_claim(&claim(&b, &ticket), Some(&read.etag)).await, Err(StoreError::Conflict(_))), "from an old version");
    let over = store.take_payment_claim(&claim(&b, &ticket), Some(&again.etag)).await.expect("taken over as read");
    assert_eq!(store.payment_claim(&mine.authority, &mine.ticket_id).await.unwrap().unwrap().value.batch_id, b);

    assert!(!store.release_payment_claim(&again).await.unwrap(), "a former owner cannot release it");
    assert_eq!(store.payment_claim(&mine.authority, &mine.ticket_id).await.unwrap().unwrap(), over);
    assert!(store.release_payment_claim(&over).await.unwrap());
    assert!(store.payment_claim(&mine.authority, &mine.ticket_id).await.unwrap().is_none());
    assert!(!store.release_payment_claim(&over).await.unwrap(), "released once");
    assert!(matches!(store.take_payment_claim(&claim(&c, &ticket), Some(&over.etag)).await, Err(StoreError::Conflict(_))), "gone");

    // Released and taken again: a version read before never matches the new one.
    let retaken = store.take_payment_claim(&claim(&c, &ticket), None).await.unwrap();
    for old in [&taken, &again, &over] {
        assert_ne!(retaken.etag, old.etag);
        assert!(matches!(store.take_payment_claim(&claim(&a, &ticket), Some(&old.etag)).await, Err(StoreError::Conflict(_))));
    }
    assert_eq!(store.payment_claim(&mine.authority, &mine.ticket_id).await.unwrap().unwrap(), retaken);
}

async fn concurrent_takes_of_a_payment_claim_have_one_winner(store: Arc<dyn Store>) {
    let ticket = format!("t-{}", uuid::Uuid::new_v4().simple());
    let race = |over: Option<String>| {
        let ticket = ticket.clone();
        let store = store.clone();
        async move {
            let tasks: Vec<_> = (0..16)
                .map(|_| {
                    let (store, over, mine) = (store.clone(), over.clone(), claim(&BatchId::generate(), &ticket));
                    tokio::spawn(async move {
                        match store.take_payment_claim(&mine, over.as_deref()).await {
                            Ok(taken) => Some(taken),
                            Err(StoreError::Conflict(_)) => None,
                            Err(e) => panic!("unexpected {e}"),
                        }
                    })
                })
                .collect();
            let mut won = Vec::new();
            for t in tasks {
                won.extend(t.await.unwrap());
            }
            won
        }
    };
    let first = race(None).await;
    assert_eq!(first.len(), 1, "sixteen batches take a free claim at once: one gets it");
    let held = store.payment_claim(&first[0].value.authority, &first[0].value.ticket_id).await.unwrap().unwrap();
    assert_eq!(held, first[0]);
    let second = race(Some(held.etag.clone())).await;
    assert_eq!(second.len(), 1, "sixteen batches take it over from the same version: one gets it");
    let held = store.payment_claim(&held.value.authority, &held.value.ticket_id).await.unwrap().unwrap();
    assert_eq!(held, second[0]);
}

/// A run that found one disagreement, recorded at `at`.
fn run(batch: &Batch, at: chrono::DateTime<Utc>, by: &str) -> ReconciliationRun {
    let check = Check {
        ticket_id: TicketId::parse("t0001").unwrap(),
        provider: ProviderName::Gateway,
        operation: "capture".into(),
        idempotency_key: format!("{}:t0001:capture", batch.batch_id),
        ours: Recorded::Unknown,
        amount_minor: 1250,
        currency: "EUR".into(),
        theirs: ProviderView::Applied { reference: "gateway-1".into(), amount_minor: 1250, currency: "EUR".into() },
        verdict: Verdict::ProviderOnly,
    };
    ReconciliationRun::new(batch.batch_id.clone(), by.into(), None, at, vec![check])
}

async fn reconciliation_runs_are_kept_per_batch_newest_first(store: Arc<dyn Store>) {
    let (b, _) = seeded(store.as_ref(), 10_000, 2).await;
    let (other, _) = seeded(store.as_ref(), 10_000, 1).await;
    assert!(store.reconciliations(&b.batch_id, 10).await.unwrap().is_empty());
    let now = Utc::now();
    let runs = [run(&b, now - chrono::Duration::minutes(5), "first"), run(&b, now, "second"), run(&b, now - chrono::Duration::minutes(1), "middle")];
    for r in &runs {
        store.record_reconciliation(r).await.unwrap();
    }
    store.record_reconciliation(&run(&other, now, "elsewhere")).await.unwrap();
    let read = store.reconciliations(&b.batch_id, 10).await.unwrap();
    assert_eq!(read.iter().map(|r| r.by.as_str()).collect::<Vec<_>>(), ["second", "middle", "first"]);
    assert_eq!(read[0], runs[1], "a run reads back as recorded");
    assert_eq!(store.reconciliations(&b.batch_id, 1).await.unwrap(), [runs[1].clone()]);
    assert_eq!(read[0].disagreements.len(), 1);
}

macro_rules! conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;

            async fn store() -> (Arc<dyn Store>, Box<dyn std::any::Any>) {
                $make
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn batches_and_tickets_are_created_once() { let (s, _keep) = store().await; super::batches_and_tickets_are_created_once(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn transitions_are_conditional_and_apply_once() { let (s, _keep) = store().await; super::transitions_are_conditional_and_apply_once(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_reservations_never_overspend() { let (s, _keep) = store().await; super::concurrent_reservations_never_overspend(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_stale_reservation_never_holds_money_twice_nor_once_its_ticket_ends() { let (s, _keep) = store().await; super::a_stale_reservation_never_holds_money_twice_nor_once_its_ticket_ends(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn reservations_given_together_are_taken_in_order_and_held_once() { let (s, _keep) = store().await; super::reservations_given_together_are_taken_in_order_and_held_once(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_failed_payment_releases_exactly_its_reservation() { let (s, _keep) = store().await; super::a_failed_payment_releases_exactly_its_reservation(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn events_are_appended_and_read_in_order() { let (s, _keep) = store().await; super::events_are_appended_and_read_in_order(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_tickets_trail_reads_in_the_order_written() { let (s, _keep) = store().await; super::a_tickets_trail_reads_in_the_order_written(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tickets_page_by_id_and_filter_by_status() { let (s, _keep) = store().await; super::tickets_page_by_id_and_filter_by_status(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn batches_are_listed_by_client_newest_first() { let (s, _keep) = store().await; super::batches_are_listed_by_client_newest_first(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn overdue_tickets_and_unrecorded_completions_are_found() { let (s, _keep) = store().await; super::overdue_tickets_and_unrecorded_completions_are_found(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_payment_claim_changes_hands_only_from_the_version_read() { let (s, _keep) = store().await; super::a_payment_claim_changes_hands_only_from_the_version_read(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn reconciliation_runs_are_kept_per_batch_newest_first() { let (s, _keep) = store().await; super::reconciliation_runs_are_kept_per_batch_newest_first(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_takes_of_a_payment_claim_have_one_winner() { let (s, _keep) = store().await; super::concurrent_takes_of_a_payment_claim_have_one_winner(s).await }
        }
    };
}

conformance!(sqlite, {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    (Arc::new(store) as Arc<dyn Store>, Box::new(dir) as Box<dyn std::any::Any>)
});

/// A fresh in-memory Cosmos account (the SDK's own emulator, no network) with
/// the `ticketpay` database and both containers, and a client on it.
async fn cosmos_account(
    observer: Option<Arc<dyn azure_data_cosmos_driver::in_memory_emulator::RequestObserver>>,
) -> (azure_data_cosmos::CosmosClient, Arc<azure_data_cosmos_driver::in_memory_emulator::InMemoryEmulatorHttpClient>) {
    use azure_core::credentials::Secret;
    use azure_data_cosmos::{AccountReference, CosmosClient, CosmosRuntimeBuilder, RoutingStrategy};
    use azure_data_cosmos_driver::in_memory_emulator::{InMemoryEmulatorHttpClient, VirtualAccountConfig, VirtualRegion};
    use ticketpay::store::cosmos::CONTAINERS;

    let url = "https://eastus.emulator.local";
    let mut emulator =
        InMemoryEmulatorHttpClient::new(VirtualAccountConfig::new(vec![VirtualRegion::new("East US", url.parse().unwrap())]).unwrap());
    if let Some(observer) = observer {
        emulator = emulator.with_request_observer(observer);
    }
    let emulator = Arc::new(emulator);
    let pk = |path: &str| serde_json::from_value(serde_json::json!({"paths": [path], "kind": "Hash", "version": 2})).unwrap();
    emulator.store().create_database("ticketpay");
    for (name, path) in CONTAINERS {
        emulator.store().create_container("ticketpay", name, pk(path));
    }
    let client = CosmosClient::builder()
        .with_runtime(CosmosRuntimeBuilder::from(emulator.runtime_builder()).build().await.unwrap())
        .build(
            AccountReference::with_authentication_key(url.parse().unwrap(), Secret::new("dGVzdGtleQ==")),
            RoutingStrategy::ProximityTo("East US".into()),
        )
        .await
        .unwrap();
    (client, emulator)
}

async fn cosmos_store() -> (Arc<dyn Store>, Box<dyn std::any::Any>) {
    let (client, emulator) = cosmos_account(None).await;
    let store = ticketpay::store::cosmos::CosmosStore::new(client, "ticketpay").await.unwrap();
    (Arc::new(store) as Arc<dyn Store>, Box::new(emulator) as Box<dyn std::any::Any>)
}

conformance!(cosmos, cosmos_store().await);

/// Cosmos alone: its idempotency keys are documents of their own, taken over
/// once the upload that claimed one looks dead.
mod cosmos_idempotency_keys {
    use std::sync::mpsc;
    use std::sync::Mutex;

    use azure_data_cosmos_driver::in_memory_emulator::RequestObserver;
    use ticketpay::store::cosmos::{CosmosStore, IDEMPOTENCY};

    use super::*;

    /// Holds the first write of a batch's upload (its first transactional batch)
    /// until told to go on: the upload stalls after it claimed its key.
    #[derive(Debug)]
    struct StallUpload {
        batch_id: String,
        stalled: Mutex<Option<mpsc::Sender<()>>>,
        resume: Mutex<mpsc::Receiver<()>>,
    }

    impl RequestObserver for StallUpload {
        fn on_request(&self, request: &azure_core::http::Request) {
            let ours = request.headers().iter().any(|(name, value)| {
                name.as_str() == "x-ms-documentdb-partitionkey" && value.as_str().contains(&self.batch_id)
            });
            let is_batch = request.headers().iter().any(|(name, _)| name.as_str() == "x-ms-cosmos-is-batch-request");
            if !(ours && is_batch) {
                return;
            }
            if let Some(stalled) = self.stalled.lock().unwrap().take() {
                stalled.send(()).unwrap();
                self.resume.lock().unwrap().recv().unwrap();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_whose_key_was_taken_over_does_not_commit_nor_release_the_key() {
        let slow = batch("acme", 1_000, 2, Some("key-taken-over"));
        let (stalled_tx, stalled_rx) = mpsc::channel();
        let (resume_tx, resume_rx) = mpsc::channel();
        let observer = StallUpload { batch_id: slow.batch_id.to_string(), stalled: Mutex::new(Some(stalled_tx)), resume: Mutex::new(resume_rx) };
        let (client, _emulator) = cosmos_account(Some(Arc::new(observer))).await;
        let keys = client.database_client("ticketpay".to_owned()).container_client(IDEMPOTENCY, None).await.unwrap();
        let store: Arc<dyn Store> = Arc::new(CosmosStore::new(client, "ticketpay").await.unwrap());

        // The slow upload claimed its key long ago (so it looks dead) and is still writing.
        let claimed_long_ago = serde_json::json!({
            "id": "key-taken-over",
            "client_id": "acme",
            "batch_id": slow.batch_id,
            "claimed_at": Utc::now() - chrono::Duration::minutes(11),
        });
        keys.create_item("acme".to_owned(), "key-taken-over", &claimed_long_ago, None).await.unwrap();
        let slow_upload = {
            let (store, slow) = (store.clone(), slow.clone());
            tokio::spawn(async move {
                let ts = tickets(&slow, 2);
                store.create_batch(&slow, &ts, &accepted(&ts)).await
            })
        };
        tokio::task::spawn_blocking(move || stalled_rx.recv().unwrap()).await.unwrap();

        // Meanwhile the client sends the upload again: the key is taken over, and that batch commits.
        let retry = batch("acme", 1_000, 2, Some("key-taken-over"));
        let rt = tickets(&retry, 2);
        assert_eq!(store.create_batch(&retry, &rt, &accepted(&rt)).await.unwrap(), Created::New);

        resume_tx.send(()).unwrap();
        let slow_result = slow_upload.await.unwrap();
        assert!(matches!(slow_result, Err(StoreError::Conflict(_))), "the slow upload lost its key: {slow_result:?}");
        assert!(store.batch(&slow.batch_id).await.unwrap().is_none(), "and did not commit");
        assert!(store.batch(&retry.batch_id).await.unwrap().is_some());

        let held: serde_json::Value =
            keys.read_item("acme".to_owned(), "key-taken-over", None).await.expect("the key is still there").into_model().unwrap();
        assert_eq!(held["batch_id"], retry.batch_id.as_str(), "still naming the batch that took it over");
        let again = batch("acme", 1_000, 2, Some("key-taken-over"));
        match store.create_batch(&again, &tickets(&again, 2), &[]).await.unwrap() {
            Created::Existing(existing) => assert_eq!(existing.batch_id, retry.batch_id, "one batch for one key"),
            Created::New => panic!("a second batch for one key"),
        }
    }
}

/// A row it cannot read is invalid data, said so, never filled in with made-up values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_reports_a_row_it_cannot_read_as_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(&path).unwrap();
    let (b, _) = seeded(&store, 1_000, 1).await;
    for (column, value) in [("currency", "E1"), ("client_id", "no spaces allowed"), ("created_at", "yesterday")] {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let good: String = conn.query_row(&format!("SELECT {column} FROM batches WHERE batch_id = ?1"), [b.batch_id.as_str()], |r| r.get(0)).unwrap();
        conn.execute(&format!("UPDATE batches SET {column} = ?2 WHERE batch_id = ?1"), [b.batch_id.as_str(), value]).unwrap();
        match store.batch(&b.batch_id).await {
            Err(StoreError::Invalid(e)) => assert!(e.contains(column), "{e}"),
            other => panic!("a batch with {column} = {value:?} read as {other:?}"),
        }
        assert!(matches!(store.batches(None, 10).await, Err(StoreError::Invalid(_))), "{column}");
        conn.execute(&format!("UPDATE batches SET {column} = ?2 WHERE batch_id = ?1"), [b.batch_id.as_str(), good.as_str()]).unwrap();
    }
    assert_eq!(store.batch(&b.batch_id).await.unwrap().unwrap().batch_id, b.batch_id);
}

/// A ticket part way through its payment (its settle's answer lost), as a store holds it.
async fn paying(store: &dyn Store) -> (Batch, ticketpay::store::Versioned<Ticket>) {
    let (b, ts) = seeded(store, 1_000, 1).await;
    let current = store.ticket(&b.batch_id, &ts[0].ticket_id).await.unwrap().unwrap();
    let mut next = moved(&current.value, State::Pay);
    next.pay.done = 1;
    next.pay.slot.claim(Operation::Step(PayStep::Settle), Utc::now());
    next.pay.slot.release_claim();
    let held = Event::new(&b.batch_id, &next.ticket_id, Stage::Reserve, EventKind::BudgetReserved { amount: next.money(1250) }, Utc::now());
    let written = store.update_ticket(TicketUpdate { ticket: next, etag: current.etag, budget: None, events: vec![held] }).await.unwrap();
    (b, written)
}

/// An audit entry's events as releases before versions wrote them: amounts as bare decimals.
fn first_shape_events(events: &str) -> String {
    use ticketpay::store::schema::EVENT_SCHEMA;
    events.replace(&format!("\"schema\":{EVENT_SCHEMA},"), "").replace(" EUR\"", "\"")
}

/// The trail [`paying`] wrote reads back with its amount in the batch's currency.
async fn reads_the_held_amount(store: &dyn Store, b: &Batch, id: &TicketId) {
    let events = store.events(&b.batch_id, id).await.unwrap();
    let amounts: Vec<_> = events.iter().filter_map(|e| match &e.kind { EventKind::BudgetReserved { amount } => Some(*amount), _ => None }).collect();
    assert_eq!(amounts, [ticketpay::domain::Money::new(1250, b.currency)], "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_reads_a_file_a_ticket_and_an_audit_entry_in_every_earlier_shape_and_refuses_newer_ones() {
    use ticketpay::store::schema::{EVENT_SCHEMA, TICKET_SCHEMA};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let (b, written) = paying(&SqliteStore::open(&path).unwrap()).await;
    let id = written.value.ticket_id.clone();

    // As releases before versions left it: the same tables, no version, a ticket without `schema`.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let doc: String = conn.query_row("SELECT doc FROM tickets WHERE ticket_id = ?1", [id.as_str()], |r| r.get(0)).unwrap();
    let first_shape = doc.replacen(&format!("\"schema\":{TICKET_SCHEMA},"), "", 1);
    assert_ne!(first_shape, doc, "a ticket is written with its shape: {doc}");
    conn.execute("UPDATE tickets SET doc = ?1 WHERE ticket_id = ?2", [first_shape.as_str(), id.as_str()]).unwrap();
    conn.pragma_update(None, "user_version", 0).unwrap();
    let (seq, entry): (i64, String) = conn.query_row("SELECT seq, doc FROM events WHERE doc LIKE '%budget_reserved%'", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert!(entry.contains("\"12.50 EUR\""), "an amount is written with its currency: {entry}");
    conn.execute("UPDATE events SET doc = ?1 WHERE seq = ?2", rusqlite::params![first_shape_events(&entry), seq]).unwrap();

    let store = SqliteStore::open(&path).unwrap();
    let read = store.ticket(&b.batch_id, &id).await.unwrap().unwrap();
    assert_eq!(read, written, "today's shape reads as it was written");
    reads_the_held_amount(&store, &b, &id).await;
    let later = entry.replacen(&format!("\"schema\":{EVENT_SCHEMA},"), &format!("\"schema\":{},", EVENT_SCHEMA + 1), 1);
    conn.execute("UPDATE events SET doc = ?1 WHERE seq = ?2", rusqlite::params![later, seq]).unwrap();
    match store.events(&b.batch_id, &id).await {
        Err(StoreError::Invalid(e)) => assert!(e.contains("newer release"), "{e}"),
        other => panic!("an audit entry in a newer shape read as {other:?}"),
    }
    assert_eq!(conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0)).unwrap(), 1, "the file is upgraded");

    let later = first_shape.replacen('{', &format!("{{\"schema\":{},", TICKET_SCHEMA + 1), 1);
    conn.execute("UPDATE tickets SET doc = ?1 WHERE ticket_id = ?2", [later.as_str(), id.as_str()]).unwrap();
    match store.ticket(&b.batch_id, &id).await {
        Err(StoreError::Invalid(e)) => assert!(e.contains("newer release"), "{e}"),
        other => panic!("a ticket in a newer shape read as {other:?}"),
    }
    drop(store);
    conn.pragma_update(None, "user_version", 99).unwrap();
    match SqliteStore::open(&path) {
        Err(StoreError::Invalid(e)) => assert!(e.contains("newer release"), "{e}"),
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a file from a newer release was opened"),
    }
}

/// An audit entry's events, as the Cosmos store keeps them deflated.
/// An audit entry's JSON as stored: raw deflate with the preset dictionary it names
/// (`d1:`, the file beside the store's code), in base64.
fn inflated(deflated: &serde_json::Value) -> String {
    use base64::Engine;
    use std::io::Read;
    let text = deflated.as_str().expect("deflated events");
    let encoded = text.strip_prefix("d1:").expect("written with the entries' dictionary");
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
    let mut decompress = flate2::Decompress::new(false);
    decompress.set_dictionary(include_bytes!("../src/store/cosmos/entry-dictionary.json")).unwrap();
    let mut json = String::new();
    flate2::read::ZlibDecoder::new_with_decompress(bytes.as_slice(), decompress).read_to_string(&mut json).unwrap();
    json
}

/// An entry as releases before the dictionary deflated it.
fn deflated(json: &str) -> String {
    use base64::Engine;
    use std::io::Write;
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(json.as_bytes()).unwrap();
    base64::engine::general_purpose::STANDARD.encode(encoder.finish().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cosmos_reads_a_ticket_and_an_audit_entry_in_every_earlier_shape_and_refuses_newer_ones() {
    use azure_data_cosmos::{FeedScope, Query};
    use futures::TryStreamExt;
    use ticketpay::store::cosmos::{CosmosStore, RECORDS};
    use ticketpay::store::schema::TICKET_SCHEMA;

    let (client, _emulator) = cosmos_account(None).await;
    let records = client.database_client("ticketpay".to_owned()).container_client(RECORDS, None).await.unwrap();
    let store = CosmosStore::new(client, "ticketpay").await.unwrap();
    let (b, written) = paying(&store).await;
    let id = written.value.ticket_id.clone();
    let documents = async |kind: &str| -> Vec<serde_json::Value> {
        let q = Query::from("SELECT * FROM c WHERE STARTSWITH(c.id, @kind)").with_parameter("@kind", format!("{kind}:")).unwrap();
        let pages = records.query_items::<serde_json::Value>(q, FeedScope::full_container(), None).await.unwrap().into_pages();
        pages.map_ok(|page| page.into_items()).try_concat().await.unwrap()
    };
    let mut doc = documents("ticket").await.into_iter().next().expect("the ticket's document");
    assert_eq!(doc["ticket"]["schema"], TICKET_SCHEMA, "a ticket is written with its shape, inside it: {doc}");
    assert!(doc.get("type").is_none() && doc.get("ticket_id").is_none(), "its kind and id are in its document id: {doc}");
    let held: serde_json::Value = serde_json::from_str(&inflated(&doc["ticket"]["recent"])).expect("the reservation's events, held beside the ticket");
    assert_eq!(held[0], ticketpay::store::schema::EVENT_SCHEMA, "events are written with their shape: {held}");
    let [seq, nonce, events] = [&held[1][0][0], &held[1][0][1], &held[1][0][2]];
    assert!(events.to_string().contains("\"12.50 EUR\""), "an amount is written with its currency");

    // As releases before versions wrote them: the ticket with its kind and id as
    // properties of their own, and its events in an entry of their own, amounts
    // as bare decimals, deflated without the dictionary.
    let (pk, doc_id) = (doc["pk"].as_str().unwrap().to_owned(), doc["id"].as_str().unwrap().to_owned());
    let doc = doc.as_object_mut().unwrap();
    doc["ticket"].as_object_mut().unwrap().remove("recent");
    doc["ticket"].as_object_mut().unwrap().remove("schema");
    doc.insert("type".into(), "ticket".into());
    doc.insert("ticket_id".into(), id.as_str().into());
    doc.insert("notified".into(), false.into());
    records.replace_item(pk.clone(), &doc_id, &doc, None).await.unwrap();
    let entry_id = format!("events:{id}:{:016}-{}", seq.as_i64().unwrap(), nonce.as_str().unwrap());
    let entry = serde_json::json!({"id": entry_id, "pk": pk, "seq": seq, "type": "events", "ticket_id": id.as_str(), "deflated": deflated(&first_shape_events(&events.to_string()))});
    records.create_item(pk.clone(), &entry_id, &entry, None).await.unwrap();
    let read = store.ticket(&b.batch_id, &id).await.unwrap().unwrap();
    assert_eq!(read.value, written.value, "the earlier shape reads as it was written");
    assert_eq!(store.tickets(&b.batch_id, None, 10, None).await.unwrap().tickets, std::slice::from_ref(&written.value), "and is found by queries");
    reads_the_held_amount(&store, &b, &id).await;
    assert!(store.has_open_tickets(&b.batch_id).await.unwrap(), "a ticket whose document says it is not told keeps its batch open");
    doc.insert("notified".into(), true.into());
    records.replace_item(pk.clone(), &doc_id, &doc, None).await.unwrap();
    assert!(!store.has_open_tickets(&b.batch_id).await.unwrap(), "and one whose document says it is told does not");

    let mut doc = serde_json::Value::Object(doc.clone());
    doc["ticket"]["schema"] = serde_json::json!(TICKET_SCHEMA + 1);
    records.replace_item(pk, &doc_id, &doc, None).await.unwrap();
    match store.ticket(&b.batch_id, &id).await {
        Err(StoreError::Invalid(e)) => assert!(e.contains("newer release"), "{e}"),
        other => panic!("a ticket in a newer shape read as {other:?}"),
    }
    assert!(matches!(store.tickets(&b.batch_id, None, 10, None).await, Err(StoreError::Invalid(_))), "nor in a page of tickets");
}

/// Cosmos alone: reservations given together move the batch's budget in one
/// transactional batch of its home, not one per ticket.
/// Counts the transactional batches sent to the logical partitions whose key begins with `partition`.
#[derive(Debug, Default)]
struct PartitionBatches {
    partition: std::sync::Mutex<Option<String>>,
    seen: std::sync::atomic::AtomicUsize,
}

impl azure_data_cosmos_driver::in_memory_emulator::RequestObserver for PartitionBatches {
    fn on_request(&self, request: &azure_core::http::Request) {
        let Some(key) = self.partition.lock().unwrap().clone() else { return };
        let headers = request.headers();
        let is_batch = headers.iter().any(|(name, _)| name.as_str() == "x-ms-cosmos-is-batch-request");
        let ours = headers.iter().any(|(name, value)| name.as_str() == "x-ms-documentdb-partitionkey" && value.as_str().starts_with(&format!("[\"{key}")));
        if is_batch && ours {
            self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

mod cosmos_budget {
    use std::sync::atomic::Ordering;

    use ticketpay::store::cosmos::CosmosStore;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reservations_given_together_move_the_budget_once() {
        let observer = Arc::new(PartitionBatches::default());
        let (client, _emulator) = cosmos_account(Some(observer.clone())).await;
        let store = CosmosStore::new(client, "ticketpay").await.unwrap();
        let (b, ts) = seeded(&store, 10_000, 30).await;
        let mut updates = Vec::new();
        for t in &ts {
            let current = store.ticket(&b.batch_id, &t.ticket_id).await.unwrap().unwrap();
            updates.push(reservation(&current, &current.etag, 300));
        }
        *observer.partition.lock().unwrap() = Some(format!("{}\"", b.batch_id));
        let results = store.update_tickets(updates).await;
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 30);
        assert_eq!(observer.seen.load(Ordering::Relaxed), 1, "one transactional batch of the batch's home for 30 reservations");
        assert_eq!(store.batch(&b.batch_id).await.unwrap().unwrap().committed().minor, 9_000);
    }
}

mod cosmos_trail {
    use std::sync::atomic::Ordering;

    use ticketpay::store::cosmos::CosmosStore;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tickets_small_changes_keep_their_events_beside_it_until_its_document_outgrows_a_kilobyte() {
        let observer = Arc::new(PartitionBatches::default());
        let (client, _emulator) = cosmos_account(Some(observer.clone())).await;
        // Two processes: each carries on what the other wrote.
        let (one, other) = (CosmosStore::new(client.clone(), "ticketpay").await.unwrap(), CosmosStore::new(client, "ticketpay").await.unwrap());
        let (b, ts) = seeded(&one, 1_000, 1).await;
        let t = &ts[0];
        *observer.partition.lock().unwrap() = Some(format!("{}:", b.batch_id));
        let batches = || observer.seen.load(Ordering::Relaxed);

        let mut written = write_steps(&[&one, &other], t, &["change", "quiet change", "change"]).await;
        assert_eq!(batches(), 0, "a change with a few events is one write of the ticket's document");
        written.extend(write_steps(&[&other], t, &["long change", "change"]).await.into_iter().skip(1));
        assert_eq!(batches(), 1, "the change that outgrows the document writes an entry with it");

        for store in [&one, &other] {
            let read: Vec<EventKind> = store.events(&b.batch_id, &t.ticket_id).await.unwrap().into_iter().map(|e| e.kind).collect();
            assert_eq!(read, written);
        }
    }
}
