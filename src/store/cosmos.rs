//! The Azure Cosmos DB store.
//!
//! Container `records` (partition key `/pk`) holds a batch in many logical
//! partitions: its home (the batch document, the budget's commitments, the
//! reconciliation runs), its tickets spread over [`TICKET_PARTITIONS`] ticket
//! partitions with their audit entries, and the payment claims, each alone in
//! a partition named by its ticket (see [`documents`]). Container
//! `idempotency` (partition key `/client_id`) holds the upload keys.
//!
//! ETags are the versions. A ticket change and its events are one write of the
//! ticket's document, which holds its latest writes' events while it stays
//! within a kilobyte (past that, one transactional batch of the ticket and an
//! entry of the events it held); its budget movement is one
//! in the batch's home, made first and idempotent per ticket (a commitment
//! document per ticket), so a change tried again never holds money twice. See
//! `docs/data-model.md` for the reasoning, the upload protocol and the costs.

mod documents;
#[cfg(feature = "cosmos-emulator")]
mod emulator;
mod keys;
mod transaction;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_data_cosmos::clients::ContainerClient;
use azure_data_cosmos::diagnostics::DiagnosticsContext;
use azure_data_cosmos::models::{BatchResponse, ItemResponse};
use azure_data_cosmos::options::{ItemWriteOptions, Precondition};
use azure_data_cosmos::{AccountReference, CosmosClient, CosmosError, FeedScope, Query, RoutingStrategy};
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use self::documents::{
    claim_partition, commitment_doc_id, events_doc_prefix, recent_writes, ticket_doc_id, ticket_partition, ticket_partitions, BatchDoc, ClaimDoc, CommitmentDoc,
    EventsDoc, ReconciliationDoc, TicketDoc, UploadEventsDoc, Written, BATCH_DOC_ID, CLAIM_DOC_ID, IS_TICKET, NOT_TOLD, TICKET_DOC_PREFIX,
    UPLOAD_EVENTS_DOC_ID,
};
pub use self::documents::{INDEXED_PATHS, TICKET_PARTITIONS};
use self::keys::KeyClaim;
use self::transaction::{first_failure, op_error, Pricer, Transaction, MAX_OPS};
use super::meter::Meter;
use super::{BatchSummary, BudgetChange, Created, PaymentClaim, Result, Store, StoreError, TicketPage, TicketUpdate, Versioned};
use crate::domain::reconciliation::ReconciliationRun;
use crate::domain::{AuthorityCode, Batch, BatchId, BudgetError, ClientId, Event, Money, Status, Ticket, TicketId};

/// Container holding batches, tickets, events, budget commitments and payment claims, partitioned by `/pk`.
pub const RECORDS: &str = "records";
/// Container holding idempotency keys, partitioned by `/client_id`.
pub const IDEMPOTENCY: &str = "idempotency";
/// Every container the store needs, with its partition key path.
pub const CONTAINERS: [(&str, &str); 2] = [(RECORDS, "/pk"), (IDEMPOTENCY, "/client_id")];

const MAX_BATCH_BYTES: usize = 1_500_000;
/// Attempts at a change of the batch document lost to a concurrent writer.
const BATCH_DOC_ATTEMPTS: u32 = 100;
/// Upload chunks written at once.
const UPLOAD_PARALLELISM: usize = 4;
/// Ticket partitions asked at once by a query over a whole batch.
const FAN_OUT: usize = 8;

#[derive(Clone)]
pub struct CosmosStore {
    records: ContainerClient,
    keys: ContainerClient,
    meter: Arc<Meter>,
    /// Prices the writes of transactional batches, for an account whose answers do not (the emulator).
    pricer: Option<Pricer>,
    /// Told what each request to a container cost, for an account that does not hold
    /// all of them to its throughput itself (the emulator).
    spent: Option<Spent>,
    recent: Arc<RecentEvents>,
}

/// What the ticket documents this store last read or wrote hold beside their
/// ticket (the events of writes in no entry of their own), by version: a change
/// carries them on without reading its ticket's document again.
#[derive(Default)]
struct RecentEvents(Mutex<HashMap<String, (String, Option<String>)>>);

/// Ticket documents remembered at most; past that the memory starts again.
const REMEMBERED: usize = 10_000;

impl RecentEvents {
    fn remember(&self, doc: &TicketDoc, etag: &str) {
        let mut known = self.0.lock().expect("no holder panics");
        if known.len() >= REMEMBERED {
            known.clear();
        }
        known.insert(format!("{}/{}", doc.pk, doc.id), (etag.to_owned(), doc.nested.recent.clone()));
    }

    /// What the document of `ticket` holds at version `etag`, if known.
    fn at(&self, ticket: &Ticket, etag: &str) -> Option<Option<String>> {
        let key = format!("{}/{}", ticket_partition(ticket.batch_id.as_str(), ticket.ticket_id.as_str()), ticket_doc_id(&ticket.ticket_id));
        let known = self.0.lock().expect("no holder panics");
        known.get(&key).filter(|(at, _)| at == etag).map(|(_, recent)| recent.clone())
    }
}

/// Hears what a request to a container (named) cost, in RU.
type Spent = Arc<dyn Fn(&'static str, f64) + Send + Sync>;

static LAST_SEQ: AtomicI64 = AtomicI64::new(0);

/// Microseconds since the epoch, never the same twice in this process and never going back.
fn next_seq() -> i64 {
    let now = Utc::now().timestamp_micros();
    let mut last = LAST_SEQ.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST_SEQ.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// One write's events (all of one ticket): a fresh, time-ordered place in its trail.
fn written(events: Vec<Event>) -> Written {
    Written { seq: next_seq(), nonce: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(), events }
}

/// A ticket's document as a change writes it, with the events of the writes
/// before it that the document held (`held`, as stored), and the entry its
/// events go into when they do not stay in the document.
fn planned(ticket: &Ticket, held: Option<String>, events: Vec<Event>) -> Result<(TicketDoc, Option<EventsDoc>)> {
    let mut doc = TicketDoc::new(ticket);
    if events.is_empty() {
        doc.nested.recent = held;
        return Ok((doc, None));
    }
    let mut writes = match &held {
        Some(text) => recent_writes(text, &ticket.batch_id, &ticket.ticket_id).map_err(invalid)?,
        None => Vec::new(),
    };
    writes.push(written(events));
    let doc = doc.holding(&writes).map_err(invalid)?;
    if doc.fits_a_kilobyte() {
        return Ok((doc, None));
    }
    let entry = EventsDoc::of_writes(&writes).map_err(invalid)?;
    Ok((doc.holding(&[]).map_err(invalid)?, Some(entry)))
}

/// `events` split by ticket, in the order given.
fn by_ticket(events: &[Event]) -> Vec<Vec<Event>> {
    let mut groups: Vec<Vec<Event>> = Vec::new();
    for e in events {
        match groups.iter_mut().find(|g| g[0].batch_id == e.batch_id && g[0].ticket_id == e.ticket_id) {
            Some(g) => g.push(e.clone()),
            None => groups.push(vec![e.clone()]),
        }
    }
    groups
}

// ---------------------------------------------------------------- errors

/// The sub-status the SDK gives a document it could not turn into the type asked for.
const UNREADABLE_BODY: u16 = 20020;

fn map_err(what: impl std::fmt::Display, e: CosmosError) -> StoreError {
    let s = e.status();
    if s.sub_status().is_some_and(|sub| sub.value() == UNREADABLE_BODY) {
        // A stored document the store cannot read: trying again will not help.
        StoreError::Invalid(format!("{what}: {}", with_causes(&e)))
    } else if s.is_precondition_failed() || s.is_conflict() {
        StoreError::Conflict(what.to_string())
    } else if s.is_not_found() {
        StoreError::NotFound(what.to_string())
    } else if s.is_bad_request() {
        StoreError::Invalid(format!("{what}: {e}"))
    } else {
        // Throttling (429) the SDK could not absorb, timeouts, 503s, transport failures.
        StoreError::Unavailable(format!("{what}: {e}"))
    }
}

/// An error and what caused it, as one line.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(&format!(": {c}"));
        cause = c.source();
    }
    line
}

fn invalid(e: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid(e.to_string())
}

// ---------------------------------------------------------------- construction

impl CosmosStore {
    /// The store on an existing client; the database and both containers must exist.
    pub async fn new(client: CosmosClient, database: &str) -> Result<CosmosStore> {
        let db = client.database_client(database.to_owned());
        let records = db.container_client(RECORDS, None).await.map_err(|e| map_err(format!("container {RECORDS}"), e))?;
        let keys = db.container_client(IDEMPOTENCY, None).await.map_err(|e| map_err(format!("container {IDEMPOTENCY}"), e))?;
        Ok(CosmosStore { records, keys, meter: Arc::default(), pricer: None, spent: None, recent: Arc::default() })
    }

    /// The store on an account reached with Entra ID (the caller picks the
    /// credential: managed identity in Azure, developer tools on a workstation).
    pub async fn connect(endpoint: &str, database: &str, credential: Arc<dyn TokenCredential>) -> Result<CosmosStore> {
        let endpoint = endpoint.parse().map_err(|e| StoreError::Invalid(format!("endpoint {endpoint}: {e}")))?;
        let account = AccountReference::with_credential(endpoint, credential);
        // No preferred regions: the account's own region order.
        let client = CosmosClient::builder()
            .build(account, RoutingStrategy::PreferredRegions(Vec::new()))
            .await
            .map_err(|e| map_err("cosmos account", e))?;
        Self::new(client, database).await
    }

    fn container(&self, name: &'static str) -> &ContainerClient {
        if name == IDEMPOTENCY { &self.keys } else { &self.records }
    }

    async fn read_doc<T: DeserializeOwned>(&self, container: &'static str, pk: &str, id: &str) -> Result<Option<T>> {
        match self.metered(container, "read", pk, self.container(container).read_item(pk.to_owned(), id, None)).await {
            Ok(r) => r.into_model::<T>().map(Some).map_err(|e| invalid(format!("{id}: {}", with_causes(&e)))),
            Err(e) if e.status().is_not_found() => Ok(None),
            Err(e) => Err(map_err(format!("{pk}/{id}"), e)),
        }
    }

    async fn batch_doc(&self, batch_id: &str) -> Result<Option<BatchDoc>> {
        self.read_doc(RECORDS, batch_id, BATCH_DOC_ID).await
    }

    async fn query<T: DeserializeOwned + Send + 'static>(&self, q: Query, partition: Option<&str>, what: &str) -> Result<Vec<T>> {
        let (scope, partition) = match partition {
            Some(pk) => (FeedScope::partition(pk.to_owned()), pk),
            None => (FeedScope::full_container(), "(every partition)"),
        };
        let pages = self.records.query_items::<T>(q, scope, None).await.map_err(|e| map_err(what, e))?.into_pages();
        let mut pages = std::pin::pin!(pages);
        let mut rows = Vec::new();
        let span = request_span(RECORDS, "query");
        while let Some(page) = pages.next().instrument(span.clone()).await {
            let charged = page.as_ref().map_or_else(|e| e.diagnostics(), |p| Some(p.diagnostics()));
            self.count(&span, RECORDS, "query", partition, charged.as_deref(), None);
            rows.extend(page.map_err(|e| map_err(what, e))?.into_items());
        }
        Ok(rows)
    }

    /// The same query in every ticket partition of the batch, a few at once: each partition's rows.
    async fn query_tickets<T: DeserializeOwned + Send + 'static>(&self, batch_id: &BatchId, q: Query, what: &str) -> Result<Vec<Vec<T>>> {
        futures::stream::iter(ticket_partitions(batch_id.as_str()))
            .map(|pk| {
                let q = q.clone();
                async move { self.query::<T>(q, Some(&pk), what).await }
            })
            .buffered(FAN_OUT)
            .try_collect()
            .await
    }

    /// Runs one request as a client span, counting what it cost (answered or refused) against its partition.
    async fn metered<T: Charged>(
        &self,
        container: &'static str,
        operation: &'static str,
        partition: &str,
        request: impl std::future::Future<Output = azure_data_cosmos::Result<T>>,
    ) -> azure_data_cosmos::Result<T> {
        self.metered_priced(container, operation, partition, None, request).await
    }

    /// [`Self::metered`], counting `priced` instead of the answer's charge for a request that fully applied.
    async fn metered_priced<T: Charged>(
        &self,
        container: &'static str,
        operation: &'static str,
        partition: &str,
        priced: Option<f64>,
        request: impl std::future::Future<Output = azure_data_cosmos::Result<T>>,
    ) -> azure_data_cosmos::Result<T> {
        let span = request_span(container, operation);
        let answer = request.instrument(span.clone()).await;
        let (diagnostics, priced) = match &answer {
            Ok(r) => (Some(r.diagnostics()), priced.filter(|_| r.applied())),
            Err(e) => (e.diagnostics(), None),
        };
        self.count(&span, container, operation, partition, diagnostics.as_deref(), priced);
        answer
    }

    /// Counts what a request cost: `priced`, or else what its answer says it charged.
    fn count(&self, span: &tracing::Span, container: &'static str, operation: &'static str, partition: &str, diagnostics: Option<&DiagnosticsContext>, priced: Option<f64>) {
        let Some(d) = diagnostics else { return };
        let ru = priced.unwrap_or_else(|| f64::from(d.total_request_charge()));
        let throttled = d.requests().iter().filter(|r| r.status().is_throttled()).count() as u64;
        self.meter.charge(container, operation, partition, ru, throttled);
        if let Some(spent) = &self.spent {
            spent(container, ru);
        }
        span.record("azure.cosmosdb.operation.request_charge", ru);
        span.record("throttled", throttled);
    }

    /// Read-modify-replace of the batch document with its ETag, retried when
    /// another writer got there first. `change` returns `false` to write nothing.
    async fn modify_batch<R>(&self, batch_id: &BatchId, mut change: impl FnMut(&mut Batch) -> Result<(bool, R)>) -> Result<R> {
        let id = batch_id.as_str();
        for attempt in 0..BATCH_DOC_ATTEMPTS {
            let Some(mut doc) = self.batch_doc(id).await? else {
                return Err(StoreError::NotFound(format!("batch {id}")));
            };
            let (write, out) = change(&mut doc.batch)?;
            if !write {
                return Ok(out);
            }
            let etag = doc.etag.take().ok_or_else(|| invalid(format!("batch {id} has no _etag")))?;
            let options = ItemWriteOptions::default().with_precondition(Precondition::if_match(etag));
            let written = BatchDoc::new(&doc.batch);
            let replaced = self.records.replace_item(id.to_owned(), BATCH_DOC_ID, &written, Some(options));
            match self.metered(RECORDS, "replace", id, replaced).await {
                Ok(_) => return Ok(out),
                Err(e) if e.status().is_precondition_failed() => backoff(attempt).await,
                Err(e) => return Err(map_err(format!("batch {id}"), e)),
            }
        }
        Err(StoreError::Conflict(format!("batch {id} (kept changing)")))
    }

    /// Writes the upload's tickets and their events: upserts, in transactional
    /// batches of at most 100 operations per ticket partition, a few at once. Idempotent.
    async fn write_upload(&self, batch_id: &str, tickets: &[Ticket], events: &[Event]) -> Result<()> {
        let mut partitions: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
        for t in tickets {
            let doc = TicketDoc::new(t);
            partitions.entry(doc.pk.clone()).or_default().push(serde_json::to_value(doc).map_err(invalid)?);
        }
        // A partition's upload events are one entry with an id of its own, so writing the
        // upload again replaces it instead of adding a copy.
        let mut recorded: HashMap<String, Vec<(&TicketId, Vec<&Event>)>> = HashMap::new();
        for e in events {
            let of = recorded.entry(ticket_partition(batch_id, e.ticket_id.as_str())).or_default();
            match of.iter_mut().rev().find(|(t, _)| **t == e.ticket_id) {
                Some((_, events)) => events.push(e),
                None => of.push((&e.ticket_id, vec![e])),
            }
        }
        for (pk, by_ticket) in recorded {
            let doc = UploadEventsDoc::new(pk.clone(), &by_ticket).map_err(invalid)?;
            partitions.entry(pk).or_default().push(serde_json::to_value(doc).map_err(invalid)?);
        }
        let mut chunks: Vec<(String, Vec<serde_json::Value>)> = Vec::new();
        for (pk, docs) in partitions {
            let mut size = 0;
            let mut chunk: Vec<serde_json::Value> = Vec::new();
            for doc in docs {
                let len = doc.to_string().len();
                if chunk.len() == MAX_OPS || size + len > MAX_BATCH_BYTES {
                    chunks.push((pk.clone(), std::mem::take(&mut chunk)));
                    size = 0;
                }
                size += len;
                chunk.push(doc);
            }
            chunks.push((pk, chunk));
        }
        let what = format!("upload of batch {batch_id}");
        futures::stream::iter(chunks)
            .map(|(pk, chunk)| {
                let what = what.clone();
                async move {
                    let mut tx = Transaction::new(self, &pk);
                    for doc in &chunk {
                        tx = tx.upsert(doc)?;
                    }
                    match first_failure(&tx.run(self, &what).await?) {
                        None => Ok(()),
                        Some((_, status)) => Err(op_error(&what, status)),
                    }
                }
            })
            .buffer_unordered(UPLOAD_PARALLELISM)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn create_uncommitted(&self, batch: &Batch, tickets: &[Ticket], events: &[Event], key: Option<&mut keys::HeldKey>) -> Result<Created> {
        let id = batch.batch_id.as_str();
        // A committed batch is never written over: its tickets may be moving already.
        if self.batch_doc(id).await?.is_some() {
            return Err(StoreError::Conflict(format!("batch {id}")));
        }
        self.write_upload(id, tickets, events).await?;
        if let Some(held) = key {
            self.confirm_key(batch, held).await?;
        }
        // The commit point: readers see the batch (and its tickets) from here on.
        match self.metered(RECORDS, "create", id, self.records.create_item(id.to_owned(), BATCH_DOC_ID, &BatchDoc::new(batch), None)).await {
            Ok(_) => Ok(Created::New),
            Err(e) => Err(map_err(format!("batch {id}"), e)),
        }
    }

    async fn commitment(&self, ticket: &Ticket) -> Result<Option<CommitmentDoc>> {
        self.read_doc(RECORDS, ticket.batch_id.as_str(), &commitment_doc_id(&ticket.ticket_id)).await
    }

    /// Holds `amount` of the budget for the ticket, once: a commitment already there
    /// (an earlier try of this same change) is taken as done. `stale` tells whether the
    /// ticket moved on since `etag`, for a reservation that does not fit.
    async fn commit_budget(&self, ticket: &Ticket, etag: &str, amount: Money) -> Result<()> {
        let batch_id = ticket.batch_id.as_str();
        let what = format!("budget of batch {batch_id} for ticket {}", ticket.ticket_id);
        for attempt in 0..BATCH_DOC_ATTEMPTS {
            let mut doc = self.batch_doc(batch_id).await?.ok_or_else(|| StoreError::NotFound(format!("batch {batch_id}")))?;
            let next = doc.batch.budget_state().reserve(amount);
            if let Err(BudgetError::Insufficient) = next {
                return self.does_not_fit(ticket, etag, amount).await;
            }
            let batch_etag = doc.etag.take().ok_or_else(|| invalid(format!("batch {batch_id} has no _etag")))?;
            doc.batch.commit(next?).map_err(|e| invalid(format!("{what}: {e}")))?;
            let tx = Transaction::new(self, batch_id)
                .create(&CommitmentDoc::new(&ticket.batch_id, &ticket.ticket_id, amount.minor))?
                .replace(BATCH_DOC_ID, &BatchDoc::new(&doc.batch), &batch_etag)?;
            match first_failure(&tx.run(self, &what).await?) {
                None => return Ok(()),
                Some((0, 409)) => {
                    let held = self.commitment(ticket).await?.ok_or_else(|| StoreError::Conflict(what.clone()))?;
                    return same_amount(&held, amount, &what);
                }
                // Another change of the budget landed first: read it again.
                Some((1, 412)) => backoff(attempt).await,
                Some((_, 429)) => return Err(StoreError::Unavailable(format!("{what}: throttled"))),
                Some((_, status)) => return Err(op_error(&what, status)),
            }
        }
        Err(StoreError::Conflict(format!("batch {batch_id} (budget kept changing)")))
    }

    /// A reservation the budget cannot cover: done if an earlier try of it holds the
    /// money already, else refused; a stale ticket version is reported as such, as if
    /// the ticket had been checked first.
    async fn does_not_fit(&self, ticket: &Ticket, etag: &str, amount: Money) -> Result<()> {
        if let Some(held) = self.commitment(ticket).await? {
            return same_amount(&held, amount, &format!("budget of batch {} for ticket {}", ticket.batch_id, ticket.ticket_id));
        }
        match self.ticket(&ticket.batch_id, &ticket.ticket_id).await? {
            Some(current) if current.etag == etag => Err(StoreError::InsufficientBudget),
            _ => Err(StoreError::Conflict(format!("ticket {}/{}", ticket.batch_id, ticket.ticket_id))),
        }
    }

    /// Holds the budget for reservations of one batch's tickets, evaluated in order
    /// against it and moved once: the commitments of those that fit and the batch
    /// document in one transactional batch of the home (a hundred operations at
    /// most, so in chunks). Each result is what [`Self::commit_budget`] would have
    /// answered for it, one after the other; a chunk in which a ticket already holds
    /// a commitment (an earlier try of its change) is done that way.
    async fn commit_budgets(&self, batch_id: &BatchId, wants: &[(&Ticket, &str, Money)]) -> Vec<Result<()>> {
        let mut results = Vec::with_capacity(wants.len());
        for chunk in wants.chunks(MAX_OPS - 1) {
            results.extend(self.commit_budget_chunk(batch_id, chunk).await);
        }
        results
    }

    async fn commit_budget_chunk(&self, batch_id: &BatchId, wants: &[(&Ticket, &str, Money)]) -> Vec<Result<()>> {
        let id = batch_id.as_str();
        let what = format!("budget of batch {id} for {} tickets", wants.len());
        let all = |e: StoreError| wants.iter().map(|_| Err(e.clone())).collect::<Vec<_>>();
        for attempt in 0..BATCH_DOC_ATTEMPTS {
            let mut doc = match self.batch_doc(id).await {
                Ok(Some(doc)) => doc,
                Ok(None) => return all(StoreError::NotFound(format!("batch {id}"))),
                Err(e) => return all(e),
            };
            let mut budget = doc.batch.budget_state();
            // Each one checked against what the ones before it left: `Some(Ok)` holds,
            // `None` does not fit, `Some(Err)` can never be held.
            let checked: Vec<Option<Result<()>>> = wants
                .iter()
                .map(|(_, _, amount)| match budget.reserve(*amount) {
                    Ok(next) => {
                        budget = next;
                        Some(Ok(()))
                    }
                    Err(BudgetError::Insufficient) => None,
                    Err(BudgetError::Invalid(why)) => Some(Err(invalid(format!("{what}: {why}")))),
                })
                .collect();
            let fits: Vec<bool> = checked.iter().map(|c| matches!(c, Some(Ok(())))).collect();
            let committed = fits.iter().filter(|f| **f).count();
            if committed > 0 {
                let Some(batch_etag) = doc.etag.take() else { return all(invalid(format!("batch {id} has no _etag"))) };
                if let Err(e) = doc.batch.commit(budget) {
                    return all(invalid(format!("{what}: {e}")));
                }
                let tx = wants
                    .iter()
                    .zip(&fits)
                    .filter(|(_, fit)| **fit)
                    .try_fold(Transaction::new(self, id), |tx, ((t, _, amount), _)| tx.create(&CommitmentDoc::new(batch_id, &t.ticket_id, amount.minor)))
                    .and_then(|tx| tx.replace(BATCH_DOC_ID, &BatchDoc::new(&doc.batch), &batch_etag));
                let outcomes = match tx {
                    Ok(tx) => tx.run(self, &what).await,
                    Err(e) => Err(e),
                };
                match outcomes.map(|o| first_failure(&o)) {
                    Ok(None) => {}
                    // Another change of the budget landed first: read it again.
                    Ok(Some((i, 412))) if i == committed => {
                        backoff(attempt).await;
                        continue;
                    }
                    // A ticket holds a commitment already: an earlier try of its change.
                    Ok(Some((_, 409))) => return self.one_by_one(wants).await,
                    Ok(Some((_, 429))) => return all(StoreError::Unavailable(format!("{what}: throttled"))),
                    Ok(Some((_, status))) => return all(op_error(&what, status)),
                    Err(e) => return all(e),
                }
            }
            let mut results = Vec::with_capacity(wants.len());
            for ((ticket, etag, amount), checked) in wants.iter().zip(checked) {
                results.push(match checked {
                    Some(done) => done,
                    None => self.does_not_fit(ticket, etag, *amount).await,
                });
            }
            return results;
        }
        all(StoreError::Conflict(format!("batch {id} (budget kept changing)")))
    }

    async fn one_by_one(&self, wants: &[(&Ticket, &str, Money)]) -> Vec<Result<()>> {
        let mut results = Vec::with_capacity(wants.len());
        for (ticket, etag, amount) in wants {
            results.push(self.commit_budget(ticket, etag, *amount).await);
        }
        results
    }

    /// Gives the ticket's commitment back to the budget, once: no commitment left means
    /// an earlier try of this same change gave it back already. `amount`: what the change
    /// says is committed (refused if it is not); `None`, whatever is.
    async fn release_budget(&self, ticket: &Ticket, amount: Option<Money>) -> Result<()> {
        let batch_id = ticket.batch_id.as_str();
        let what = format!("budget of batch {batch_id} for ticket {}", ticket.ticket_id);
        for attempt in 0..BATCH_DOC_ATTEMPTS {
            let Some(held) = self.commitment(ticket).await? else { return Ok(()) };
            let held_etag = held.etag.clone().ok_or_else(|| invalid(format!("{what}: commitment has no _etag")))?;
            let mut doc = self.batch_doc(batch_id).await?.ok_or_else(|| StoreError::NotFound(format!("batch {batch_id}")))?;
            let held_amount = ticket.money(held.amount);
            let next = doc.batch.budget_state().release(held_amount, amount.unwrap_or(held_amount)).map_err(|e| invalid(format!("{what}: {e}")))?;
            let batch_etag = doc.etag.take().ok_or_else(|| invalid(format!("batch {batch_id} has no _etag")))?;
            doc.batch.commit(next).map_err(|e| invalid(format!("{what}: {e}")))?;
            let tx = Transaction::new(self, batch_id)
                .delete(&held.id, &held, &held_etag)?
                .replace(BATCH_DOC_ID, &BatchDoc::new(&doc.batch), &batch_etag)?;
            match first_failure(&tx.run(self, &what).await?) {
                None => return Ok(()),
                // Given back meanwhile, or the budget changed first: look again.
                Some((0, 404 | 412) | (1, 412)) => backoff(attempt).await,
                Some((_, 429)) => return Err(StoreError::Unavailable(format!("{what}: throttled"))),
                Some((_, status)) => return Err(op_error(&what, status)),
            }
        }
        Err(StoreError::Conflict(format!("batch {batch_id} (budget kept changing)")))
    }

    /// The ticket's change and its events: one replace of its document, which keeps
    /// them while it is written in its first kilobyte; past that one transactional
    /// batch in its partition, the document and an entry of the events it held and these.
    async fn write_ticket(&self, update: TicketUpdate) -> Result<Versioned<Ticket>> {
        let TicketUpdate { ticket, etag, budget, events } = update;
        let what = format!("ticket {}/{}", ticket.batch_id, ticket.ticket_id);
        let with_events = !events.is_empty();
        let held = self.recent_at(&ticket, &etag, &what).await?;
        let (doc, entry) = planned(&ticket, held, events)?;
        let written = match self.put_ticket(&doc, entry.as_ref(), &etag, &what).await {
            Ok(etag) => etag,
            Err(e) if may_have_landed(&e, with_events) => match self.landed(&doc, entry.as_ref()).await {
                Ok(Some(etag)) => Some(etag),
                _ => return Err(e),
            },
            Err(e) => return Err(e),
        };
        if budget.is_none() && ends_holding_nothing(&ticket) {
            self.give_back_stray_commitment(&ticket).await;
        }
        let etag = match written {
            Some(e) => {
                self.recent.remember(&doc, &e);
                e
            }
            None => self.ticket(&ticket.batch_id, &ticket.ticket_id).await?.map(|v| v.etag).unwrap_or_default(),
        };
        Ok(Versioned { value: ticket, etag })
    }

    /// The events the ticket's document holds beside it at version `etag`, as
    /// stored; at another version the change cannot land: a conflict.
    async fn recent_at(&self, ticket: &Ticket, etag: &str, what: &str) -> Result<Option<String>> {
        if let Some(recent) = self.recent.at(ticket, etag) {
            return Ok(recent);
        }
        let pk = ticket_partition(ticket.batch_id.as_str(), ticket.ticket_id.as_str());
        match self.read_doc::<TicketDoc>(RECORDS, &pk, &ticket_doc_id(&ticket.ticket_id)).await? {
            Some(doc) if doc.etag.as_deref() == Some(etag) => Ok(doc.nested.recent),
            _ => Err(StoreError::Conflict(what.to_owned())),
        }
    }

    /// Writes the ticket, conditional on `etag`, with its entry if it has one: its new ETag, if answered.
    async fn put_ticket(&self, doc: &TicketDoc, entry: Option<&EventsDoc>, etag: &str, what: &str) -> Result<Option<String>> {
        let Some(entry) = entry else { return self.replace_ticket(doc, etag, what).await };
        let tx = Transaction::new(self, &doc.pk).replace(&doc.id, doc, etag)?.create(entry)?;
        let results = tx.run(self, what).await?;
        match first_failure(&results) {
            None => Ok(results.into_iter().next().and_then(|(_, e)| e)),
            // The ticket is not at the version the change was made from (or is gone).
            Some((0, 412 | 404)) => Err(StoreError::Conflict(what.to_owned())),
            Some((_, 429)) => Err(StoreError::Unavailable(format!("{what}: throttled"))),
            Some((_, status)) => Err(op_error(what, status)),
        }
    }

    /// Whether a ticket write that failed without a clear answer landed after
    /// all: its entry is there (written with the ticket or not at all), and the
    /// document is exactly as written (the ticket, and the events it holds,
    /// which name this write alone when it has any). The ETag it landed with,
    /// if so and if nothing changed the ticket since.
    async fn landed(&self, doc: &TicketDoc, entry: Option<&EventsDoc>) -> Result<Option<String>> {
        if let Some(entry) = entry
            && self.read_doc::<serde::de::IgnoredAny>(RECORDS, &entry.pk, &entry.id).await?.is_none()
        {
            return Ok(None);
        }
        let current: Option<TicketDoc> = self.read_doc(RECORDS, &doc.pk, &doc.id).await?;
        let (ticket, recent) = (&doc.nested.ticket, &doc.nested.recent);
        let landed = current.filter(|c| c.nested.ticket == *ticket && c.nested.recent == *recent).and_then(|c| c.etag);
        if landed.is_some() {
            self.found_landed(&format!("ticket {}/{}", ticket.batch_id, ticket.ticket_id));
        }
        Ok(landed)
    }

    /// A write whose answer never came was found landed: counted, and said.
    fn found_landed(&self, what: &str) {
        self.meter.unanswered();
        tracing::info!("{what}: the write's answer was lost, and it had landed");
    }

    /// A ticket change with no events (a claim on an operation): one conditional
    /// replace, throttled and retried as any single request. Its new ETag, if answered.
    async fn replace_ticket(&self, doc: &TicketDoc, etag: &str, what: &str) -> Result<Option<String>> {
        let options = ItemWriteOptions::default().with_precondition(Precondition::if_match(etag.to_owned()));
        let replaced = self.records.replace_item(doc.pk.clone(), &doc.id, doc, Some(options));
        match self.metered(RECORDS, "replace", &doc.pk, replaced).await {
            Ok(response) => Ok(response.headers().etag().map(|e| e.to_string())),
            // Refused as stale, but only after a try whose answer was lost: that try may have been it.
            Err(e) if e.status().is_precondition_failed() && e.diagnostics().is_some_and(|d| tried_before_unanswered(&d)) => {
                Err(StoreError::Unavailable(format!("{what}: refused as stale after a try whose answer was lost")))
            }
            // The ticket is not at the version the change was made from (or is gone).
            Err(e) if e.status().is_precondition_failed() || e.status().is_not_found() => Err(StoreError::Conflict(what.to_owned())),
            Err(e) => Err(map_err(what, e)),
        }
    }


    /// A ticket that ended holding nothing gives back a commitment left by a reservation
    /// whose ticket write never landed. Best effort: kept, it only holds budget unused.
    async fn give_back_stray_commitment(&self, ticket: &Ticket) {
        if let Err(e) = self.release_budget(ticket, None).await {
            tracing::warn!(error = %e, ticket = %ticket.ticket_id, "could not give back a stray budget commitment");
        }
    }
}

/// Whether a request was tried before its last answer and that try's answer
/// never came (a timeout, a dropped connection: it may have been applied), the
/// SDK then sending it again.
fn tried_before_unanswered(d: &DiagnosticsContext) -> bool {
    let requests = d.requests();
    requests.split_last().is_some_and(|(_, earlier)| {
        earlier.iter().any(|r| {
            let status = u16::from(r.status().status_code());
            (status == 408 || status >= 500) && r.request_sent().may_have_been_sent()
        })
    })
}

/// Whether a ticket write that failed may have landed after all: no clear
/// answer came, or it was refused as stale after an earlier send of it landed.
/// Only events, whose place in the trail is the write's alone, tell the second
/// from a change made twice; without them, a conflict stands.
fn may_have_landed(e: &StoreError, with_events: bool) -> bool {
    matches!(e, StoreError::Unavailable(_)) || (with_events && matches!(e, StoreError::Conflict(_)))
}

/// Every event of a change is of its ticket.
fn events_of_its_ticket(update: &TicketUpdate) -> Result<()> {
    let t = &update.ticket;
    match update.events.iter().find(|e| e.batch_id != t.batch_id || e.ticket_id != t.ticket_id) {
        Some(e) => Err(invalid(format!("ticket {}/{}: an event of ticket {}/{}", t.batch_id, t.ticket_id, e.batch_id, e.ticket_id))),
        None => Ok(()),
    }
}


/// A commitment found in place of the one a change would make must be for the same amount.
fn same_amount(held: &CommitmentDoc, amount: Money, what: &str) -> Result<()> {
    if held.amount == amount.minor {
        Ok(())
    } else {
        Err(invalid(format!("{what}: {} committed, not {amount}", held.amount)))
    }
}

/// Ends holding no money, where a reservation may have been tried before.
fn ends_holding_nothing(t: &Ticket) -> bool {
    matches!(t.status(), Status::OverBudget | Status::Parked) && t.reserved().is_zero() && t.paid().is_zero()
}

/// A Cosmos request as the client span the tracing exporters send on.
fn request_span(container: &'static str, operation: &'static str) -> tracing::Span {
    tracing::info_span!(
        "cosmos request",
        otel.name = %format!("{operation} {container}"),
        otel.kind = "client",
        "db.system.name" = "azure.cosmosdb",
        "db.collection.name" = container,
        "db.operation.name" = operation,
        "azure.cosmosdb.operation.request_charge" = tracing::field::Empty,
        throttled = tracing::field::Empty,
        step = super::meter::current_step(),
    )
}

/// An answer that says what it cost.
trait Charged {
    fn diagnostics(&self) -> Arc<DiagnosticsContext>;

    fn applied(&self) -> bool {
        true
    }
}

impl Charged for ItemResponse {
    fn diagnostics(&self) -> Arc<DiagnosticsContext> {
        ItemResponse::diagnostics(self)
    }
}

impl Charged for BatchResponse {
    fn diagnostics(&self) -> Arc<DiagnosticsContext> {
        BatchResponse::diagnostics(self)
    }

    /// 200: every operation applied; 207: one failed and none did.
    fn applied(&self) -> bool {
        self.status().status_code() == azure_core::http::StatusCode::Ok
    }
}

async fn backoff(attempt: u32) {
    let cap = 2u64.saturating_pow(attempt.min(5)).min(25);
    let ms = rand::random_range(0..=cap);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

impl CosmosStore {
    /// The ticket of a document read, at its version (remembering what it holds beside it).
    fn versioned(&self, d: TicketDoc) -> Result<Versioned<Ticket>> {
        let ticket = &d.nested.ticket;
        let etag = d.etag.clone().ok_or_else(|| invalid(format!("ticket {}/{} has no _etag", ticket.batch_id, ticket.ticket_id)))?;
        self.recent.remember(&d, &etag);
        Ok(Versioned { value: d.nested.ticket, etag })
    }
}

// ---------------------------------------------------------------- the seam

#[async_trait]
impl Store for CosmosStore {
    fn charges(&self) -> Option<super::meter::Charges> {
        Some(self.meter.charges())
    }

    async fn create_batch(&self, batch: &Batch, tickets: &[Ticket], events: &[Event]) -> Result<Created> {
        let id = batch.batch_id.as_str();
        if let Some(t) = tickets.iter().find(|t| t.batch_id != batch.batch_id) {
            return Err(invalid(format!("ticket {} belongs to batch {}, not {id}", t.ticket_id, t.batch_id)));
        }
        if let Some(e) = events.iter().find(|e| e.batch_id != batch.batch_id) {
            return Err(invalid(format!("an event of ticket {} belongs to batch {}, not {id}", e.ticket_id, e.batch_id)));
        }
        let Some(key) = &batch.idempotency_key else {
            return self.create_uncommitted(batch, tickets, events, None).await;
        };
        let mut held = match self.claim_key(batch, key).await? {
            KeyClaim::Existing(existing) => return Ok(Created::Existing(existing)),
            KeyClaim::Held(held) => held,
        };
        let created = self.create_uncommitted(batch, tickets, events, Some(&mut held)).await;
        // A commit whose answer was lost may have landed: its key stays.
        if created.is_err() && !matches!(self.batch_doc(id).await, Ok(Some(_))) {
            self.release_key(batch, &held).await;
        }
        created
    }

    async fn batch(&self, batch_id: &BatchId) -> Result<Option<Batch>> {
        Ok(self.batch_doc(batch_id.as_str()).await?.map(|d| d.batch))
    }

    async fn mark_enqueued(&self, batch_id: &BatchId) -> Result<()> {
        self.modify_batch(batch_id, |b| {
            let write = !b.enqueued;
            b.enqueued = true;
            Ok((write, ()))
        })
        .await
    }

    async fn mark_completed(&self, batch_id: &BatchId, at: DateTime<Utc>) -> Result<bool> {
        self.modify_batch(batch_id, |b| {
            if b.completed_at.is_some() {
                return Ok((false, false));
            }
            b.completed_at = Some(at);
            Ok((true, true))
        })
        .await
        .or_else(|e| match e {
            StoreError::NotFound(_) => Ok(false),
            e => Err(e),
        })
    }

    async fn reopen(&self, batch_id: &BatchId) -> Result<()> {
        self.modify_batch(batch_id, |b| Ok((b.completed_at.take().is_some(), ()))).await
    }

    async fn batches(&self, client: Option<&ClientId>, limit: usize) -> Result<Vec<Batch>> {
        let mut text = format!("SELECT TOP {limit} * FROM c WHERE c.type = 'batch'");
        let mut q = Query::from(String::new());
        if let Some(client) = client {
            text.push_str(" AND c.client_id = @client");
            q = q.with_parameter("@client", client.as_str()).map_err(invalid)?;
        }
        text.push_str(" ORDER BY c.created_us DESC");
        let docs: Vec<BatchDoc> = self.query(q.with_text(text), None, "batches").await?;
        Ok(docs.into_iter().map(|d| d.batch).collect())
    }

    async fn ticket(&self, batch_id: &BatchId, ticket_id: &TicketId) -> Result<Option<Versioned<Ticket>>> {
        let pk = ticket_partition(batch_id.as_str(), ticket_id.as_str());
        let doc: Option<TicketDoc> = self.read_doc(RECORDS, &pk, &ticket_doc_id(ticket_id)).await?;
        doc.map(|d| self.versioned(d)).transpose()
    }

    async fn update_ticket(&self, update: TicketUpdate) -> Result<Versioned<Ticket>> {
        events_of_its_ticket(&update)?;
        match update.budget {
            Some(BudgetChange::Reserve(n)) => self.commit_budget(&update.ticket, &update.etag, n).await?,
            Some(BudgetChange::Release(n)) => self.release_budget(&update.ticket, Some(n)).await?,
            None => {}
        }
        self.write_ticket(update).await
    }

    /// Reservations of one batch move its budget once (per hundred); anything
    /// else is applied one change after the other.
    async fn update_tickets(&self, updates: Vec<TicketUpdate>) -> Vec<Result<Versioned<Ticket>>> {
        let reservations_only = updates.iter().all(|u| matches!(u.budget, None | Some(BudgetChange::Reserve(_))));
        let one_batch = updates.windows(2).all(|w| w[0].ticket.batch_id == w[1].ticket.batch_id);
        let reserving = updates.iter().filter(|u| u.budget.is_some()).count();
        if !reservations_only || !one_batch || reserving < 2 {
            return super::one_after_another(self, updates).await;
        }
        let mut held: Vec<Result<()>> = updates.iter().map(events_of_its_ticket).collect();
        let (at, wants): (Vec<usize>, Vec<(&Ticket, &str, Money)>) = updates
            .iter()
            .enumerate()
            .filter_map(|(i, u)| match u.budget {
                Some(BudgetChange::Reserve(n)) if held[i].is_ok() => Some((i, (&u.ticket, u.etag.as_str(), n))),
                _ => None,
            })
            .unzip();
        let results = self.commit_budgets(&updates[0].ticket.batch_id, &wants).await;
        for (i, result) in at.into_iter().zip(results) {
            held[i] = result;
        }
        // Different tickets are written at once; one given twice, one change after the other.
        let mut seen = std::collections::HashSet::new();
        let at_once = if updates.iter().all(|u| seen.insert(&u.ticket.ticket_id)) { FAN_OUT } else { 1 };
        futures::stream::iter(updates.into_iter().zip(held))
            .map(|(update, held)| async move {
                held?;
                self.write_ticket(update).await
            })
            .buffered(at_once)
            .collect()
            .await
    }

    async fn append_events(&self, events: &[Event]) -> Result<()> {
        for group in by_ticket(events) {
            let what = format!("events of ticket {}/{}", group[0].batch_id, group[0].ticket_id);
            let doc = EventsDoc::of_writes(&[written(group)]).map_err(invalid)?;
            let created = self.records.create_item(doc.pk.clone(), &doc.id, &doc, None);
            match self.metered(RECORDS, "create", &doc.pk, created).await {
                Ok(_) => {}
                // The entry's id is its own: there, it is this append, whose answer was lost.
                Err(e) => match self.read_doc::<serde::de::IgnoredAny>(RECORDS, &doc.pk, &doc.id).await {
                    Ok(Some(_)) => self.found_landed(&what),
                    _ => return Err(map_err(&what, e)),
                },
            }
        }
        Ok(())
    }

    async fn events(&self, batch_id: &BatchId, ticket_id: &TicketId) -> Result<Vec<Event>> {
        let q = Query::from("SELECT * FROM c WHERE STARTSWITH(c.id, @entries)")
            .with_parameter("@entries", events_doc_prefix(ticket_id))
            .map_err(invalid)?;
        let (pk, doc_id) = (ticket_partition(batch_id.as_str(), ticket_id.as_str()), ticket_doc_id(ticket_id));
        // The document before the entries: events it held that a write moves into an entry
        // meanwhile are then found in that entry, once.
        let (ticket, upload) = futures::try_join!(
            self.read_doc::<TicketDoc>(RECORDS, &pk, &doc_id),
            self.read_doc::<UploadEventsDoc>(RECORDS, &pk, UPLOAD_EVENTS_DOC_ID),
        )?;
        let docs = self.query::<EventsDoc>(q, Some(&pk), "events").await?;
        // Entries in the first shape recorded amounts without their currency: the batch's.
        let currency = match docs.iter().any(EventsDoc::is_first_shape) {
            true => self.batch(batch_id).await?.map(|b| b.currency),
            false => None,
        };
        let mut writes = match ticket {
            Some(doc) => doc.recent_writes().map_err(invalid)?,
            None => Vec::new(),
        };
        for d in docs {
            let batch_currency = || currency.ok_or_else(|| StoreError::Invalid(format!("no batch {batch_id} to read its audit trail in")));
            writes.extend(d.into_writes(batch_currency).map_err(invalid)?);
        }
        // An entry may hold several writes, and the document the latest: in the order written.
        writes.sort_by(|a, b| (a.seq, &a.nonce).cmp(&(b.seq, &b.nonce)));
        writes.dedup_by(|a, b| a.seq == b.seq && a.nonce == b.nonce);
        let mut events = match upload {
            Some(upload) => upload.events_of(ticket_id).map_err(invalid)?,
            None => Vec::new(),
        };
        events.extend(writes.into_iter().flat_map(|w| w.events));
        Ok(events)
    }

    async fn tickets(&self, batch_id: &BatchId, status: Option<Status>, limit: usize, cursor: Option<&str>) -> Result<TicketPage> {
        let mut text = format!("SELECT TOP {} * FROM c WHERE {IS_TICKET} AND c.id > @cursor", limit + 1);
        let after = format!("{TICKET_DOC_PREFIX}{}", cursor.unwrap_or(""));
        let mut q = Query::from(String::new()).with_parameter("@cursor", after).map_err(invalid)?;
        if let Some(s) = status {
            text.push_str(" AND c.status = @status");
            q = q.with_parameter("@status", s.as_str()).map_err(invalid)?;
        }
        text.push_str(" ORDER BY c.id");
        let partitions: Vec<Vec<TicketDoc>> = self.query_tickets(batch_id, q.with_text(text), "tickets").await?;
        let mut tickets: Vec<Ticket> = partitions.into_iter().flatten().map(|d| d.nested.ticket).collect();
        tickets.sort_by(|a, b| a.ticket_id.as_str().cmp(b.ticket_id.as_str()));
        tickets.truncate(limit + 1);
        Ok(TicketPage::from_fetched(tickets, limit))
    }

    async fn summary(&self, batch_id: &BatchId, overdue_before: DateTime<Utc>) -> Result<BatchSummary> {
        #[derive(Deserialize)]
        struct Row {
            status: Status,
            notified: bool,
            paid: i64,
            reserved: i64,
            due_us: Option<i64>,
        }
        // The few fields of every ticket, added up here: the SDK runs no GROUP BY or
        // aggregate that needs a client-side stage.
        let q = Query::from(format!("SELECT c.status, c.ticket.notified, c.ticket.paid, c.ticket.reserved, c.due_us FROM c WHERE {IS_TICKET}"));
        let before = overdue_before.timestamp_micros();
        let partitions: Vec<Vec<Row>> = self.query_tickets(batch_id, q, "summary").await?;
        let mut summary = BatchSummary::default();
        for r in partitions.into_iter().flatten() {
            *summary.counts.entry(r.status).or_default() += 1;
            if r.status.is_end() && !r.notified {
                summary.awaiting_notification += 1;
            }
            summary.paid += r.paid;
            summary.reserved += r.reserved;
            summary.overdue += u64::from(!r.notified && r.due_us.is_some_and(|due| due < before));
        }
        Ok(summary)
    }

    async fn has_open_tickets(&self, batch_id: &BatchId) -> Result<bool> {
        let q = Query::from(format!("SELECT TOP 1 VALUE c.id FROM c WHERE {IS_TICKET} AND {NOT_TOLD}"));
        // Asked as each ticket ends. While a batch runs nearly every partition has an
        // open ticket, so one from a random place answers at once; the groups asked
        // then double (up to the fan-out), so the last tickets do not ask one by one.
        let mut partitions = ticket_partitions(batch_id.as_str());
        let start = rand::random_range(0..partitions.len());
        partitions.rotate_left(start);
        let (mut from, mut size) = (0, 1);
        while from < partitions.len() {
            let group = &partitions[from..(from + size).min(partitions.len())];
            let asked = group.iter().map(|pk| self.query::<String>(q.clone(), Some(pk), "open tickets"));
            if futures::future::try_join_all(asked).await?.iter().any(|rows| !rows.is_empty()) {
                return Ok(true);
            }
            from += group.len();
            size = (size * 2).min(FAN_OUT);
        }
        Ok(false)
    }

    async fn overdue_tickets(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<Versioned<Ticket>>> {
        let text = format!("SELECT TOP {limit} * FROM c WHERE {IS_TICKET} AND {NOT_TOLD} AND c.due_us < @before");
        let q = Query::from(text).with_parameter("@before", before.timestamp_micros()).map_err(invalid)?;
        let docs: Vec<TicketDoc> = self.query(q, None, "overdue tickets").await?;
        docs.into_iter().map(|d| self.versioned(d)).collect()
    }

    async fn incomplete_batches(&self, limit: usize) -> Result<Vec<Batch>> {
        let text = format!("SELECT TOP {limit} * FROM c WHERE c.type = 'batch' AND c.open = true");
        let docs: Vec<BatchDoc> = self.query(Query::from(text), None, "incomplete batches").await?;
        Ok(docs.into_iter().map(|d| d.batch).collect())
    }

    async fn find_by_reference(&self, reference: &str, client: Option<&ClientId>, limit: usize) -> Result<Vec<Ticket>> {
        let mut text = format!("SELECT TOP {limit} * FROM c WHERE {IS_TICKET} AND c.reference = @reference");
        let mut q = Query::from(String::new()).with_parameter("@reference", reference).map_err(invalid)?;
        if let Some(client) = client {
            text.push_str(" AND c.ticket.client_id = @client");
            q = q.with_parameter("@client", client.as_str()).map_err(invalid)?;
        }
        let docs: Vec<TicketDoc> = self.query(q.with_text(text), None, "tickets by reference").await?;
        // Tickets of an upload that never committed (no batch document) are not there.
        let mut committed: HashMap<BatchId, bool> = HashMap::new();
        let mut out = Vec::new();
        for d in docs {
            let batch_id = d.nested.ticket.batch_id.clone();
            let known = match committed.get(&batch_id) {
                Some(k) => *k,
                None => {
                    let k = self.batch_doc(batch_id.as_str()).await?.is_some();
                    committed.insert(batch_id, k);
                    k
                }
            };
            if known {
                out.push(d.nested.ticket);
            }
        }
        Ok(out)
    }

    async fn record_reconciliation(&self, run: &ReconciliationRun) -> Result<()> {
        let doc = ReconciliationDoc::new(run);
        let what = format!("reconciliation of batch {}", run.batch_id);
        let created = self.records.create_item(doc.pk.clone(), &doc.id, &doc, None);
        self.metered(RECORDS, "create", &doc.pk, created).await.map_err(|e| map_err(&what, e))?;
        Ok(())
    }

    async fn reconciliations(&self, batch_id: &BatchId, limit: usize) -> Result<Vec<ReconciliationRun>> {
        let text = format!("SELECT TOP {limit} * FROM c WHERE c.type = 'reconciliation' ORDER BY c.at_us DESC");
        let docs: Vec<ReconciliationDoc> = self.query(Query::from(text), Some(batch_id.as_str()), "reconciliations").await?;
        Ok(docs.into_iter().map(|d| d.run).collect())
    }

    async fn payment_claim(&self, authority: &AuthorityCode, ticket_id: &TicketId) -> Result<Option<Versioned<PaymentClaim>>> {
        let pk = claim_partition(authority, ticket_id);
        let doc: Option<ClaimDoc> = self.read_doc(RECORDS, &pk, CLAIM_DOC_ID).await?;
        doc.map(|d| {
            let etag = d.etag.clone().ok_or_else(|| invalid(format!("payment claim {pk} has no _etag")))?;
            Ok(Versioned { value: d.claim(authority, ticket_id), etag })
        })
        .transpose()
    }

    async fn take_payment_claim(&self, claim: &PaymentClaim, over: Option<&str>) -> Result<Versioned<PaymentClaim>> {
        let doc = ClaimDoc::new(claim);
        let what = format!("payment claim {}", doc.pk);
        let written = match over {
            None => self.metered(RECORDS, "create", &doc.pk, self.records.create_item(doc.pk.clone(), CLAIM_DOC_ID, &doc, None)).await,
            Some(etag) => {
                let options = ItemWriteOptions::default().with_precondition(Precondition::if_match(etag.to_owned()));
                self.metered(RECORDS, "replace", &doc.pk, self.records.replace_item(doc.pk.clone(), CLAIM_DOC_ID, &doc, Some(options))).await
            }
        };
        let response = match written {
            Ok(r) => r,
            // Taken by someone else, changed since it was read, or released since: not ours.
            Err(e) if e.status().is_conflict() || e.status().is_precondition_failed() || e.status().is_not_found() => {
                return Err(StoreError::Conflict(what));
            }
            Err(e) => return Err(map_err(what, e)),
        };
        let etag = match response.headers().etag() {
            Some(etag) => etag.to_string(),
            None => match self.payment_claim(&claim.authority, &claim.ticket_id).await? {
                Some(read) if read.value == *claim => read.etag,
                _ => return Err(StoreError::Conflict(what)),
            },
        };
        Ok(Versioned { value: claim.clone(), etag })
    }

    async fn release_payment_claim(&self, claim: &Versioned<PaymentClaim>) -> Result<bool> {
        let pk = claim_partition(&claim.value.authority, &claim.value.ticket_id);
        let options = ItemWriteOptions::default().with_precondition(Precondition::if_match(claim.etag.clone()));
        match self.metered(RECORDS, "delete", &pk, self.records.delete_item(pk.clone(), CLAIM_DOC_ID, Some(options))).await {
            Ok(_) => Ok(true),
            Err(e) if e.status().is_precondition_failed() || e.status().is_not_found() => Ok(false),
            Err(e) => Err(map_err(format!("payment claim {pk}"), e)),
        }
    }
}
