//! The Azure Cosmos DB store.
//!
//! Container `batches` (partition key `/batch_id`): one logical partition per
//! batch holding the batch document (`id` = `batch`), one document per ticket
//! (`id` = `ticket:{ticket_id}`) and the audit events
//! (`id` = `event:{ticket_id}:{seq}`). A payment claim is alone in a logical
//! partition of `batches` of its own, `claim:{authority}:{ticket_id}`
//! (`id` = `claim`), naming the batch that may pay that ticket. Container
//! `idempotency` (partition key `/client_id`): one document per idempotency
//! key, naming its batch. Each recorded reconciliation run of a batch is a
//! document of its partition too (`id` = `reconciliation:{run_id}`).
//!
//! ETags are the versions. A ticket change, its budget movement and its events
//! go in one transactional batch in the batch's partition. See
//! `docs/data-model.md` for the reasoning, the upload protocol and the costs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_data_cosmos::clients::ContainerClient;
use azure_data_cosmos::diagnostics::DiagnosticsContext;
use azure_data_cosmos::models::{BatchResponse, ItemResponse};
use azure_data_cosmos::options::{BatchReplaceOptions, ItemWriteOptions, Precondition};
use azure_data_cosmos::{AccountReference, CosmosClient, CosmosError, FeedScope, Query, RoutingStrategy, TransactionalBatch};
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use tracing::Instrument;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::meter::Meter;
use super::{BatchSummary, BudgetChange, Created, PaymentClaim, Result, Store, StoreError, TicketPage, TicketUpdate, Versioned};
use crate::domain::reconciliation::ReconciliationRun;
use crate::domain::{AuthorityCode, Batch, BatchId, ClientId, Event, Status, Ticket, TicketId};

/// Container holding batches, tickets and events, partitioned by `/batch_id`.
pub const BATCHES: &str = "batches";
/// Container holding idempotency keys, partitioned by `/client_id`.
pub const IDEMPOTENCY: &str = "idempotency";

const BATCH_DOC_ID: &str = "batch";
const CLAIM_DOC_ID: &str = "claim";
/// A transactional batch holds at most 100 operations and 2 MB.
const MAX_BATCH_OPS: usize = 100;
const MAX_BATCH_BYTES: usize = 1_500_000;
/// Attempts at a change of the batch document lost to a concurrent writer.
const BATCH_DOC_ATTEMPTS: u32 = 100;
/// Upload chunks written at once.
const UPLOAD_PARALLELISM: usize = 4;
/// An idempotency key whose batch never appeared may be taken over after this long
/// (the upload that claimed it died between claiming it and committing).
const KEY_TAKEOVER_AFTER: chrono::Duration = chrono::Duration::minutes(10);

#[derive(Clone)]
pub struct CosmosStore {
    batches: ContainerClient,
    keys: ContainerClient,
    meter: Arc<Meter>,
}

// ---------------------------------------------------------------- documents

#[derive(Debug, Serialize, Deserialize)]
struct BatchDoc {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    /// `created_at` in microseconds: sortable (RFC 3339 text with a variable
    /// number of fractional digits does not sort as text).
    created_us: i64,
    #[serde(flatten)]
    batch: Batch,
    #[serde(rename = "_etag", default, skip_serializing)]
    etag: Option<String>,
}

impl BatchDoc {
    fn new(batch: &Batch) -> BatchDoc {
        BatchDoc {
            id: BATCH_DOC_ID.into(),
            kind: "batch".into(),
            created_us: batch.created_at.timestamp_micros(),
            batch: batch.clone(),
            etag: None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct TicketDoc {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    batch_id: String,
    ticket_id: String,
    status: Status,
    notified: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
    paid: i64,
    reserved: i64,
    /// [`Ticket::due_at`] in microseconds, for the sweep's query.
    #[serde(default)]
    due_us: i64,
    ticket: Ticket,
    #[serde(rename = "_etag", default, skip_serializing)]
    etag: Option<String>,
}

fn ticket_doc_id(ticket_id: &TicketId) -> String {
    format!("ticket:{ticket_id}")
}

impl TicketDoc {
    fn new(t: &Ticket) -> TicketDoc {
        TicketDoc {
            id: ticket_doc_id(&t.ticket_id),
            kind: "ticket".into(),
            batch_id: t.batch_id.to_string(),
            ticket_id: t.ticket_id.to_string(),
            status: t.status,
            notified: t.notified,
            reference: t.reference.as_ref().map(|r| r.as_str().to_owned()),
            paid: t.paid,
            reserved: t.reserved,
            due_us: t.due_at().timestamp_micros(),
            ticket: t.clone(),
            etag: None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct EventDoc {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    batch_id: String,
    ticket_id: String,
    /// Append order: microseconds since the epoch, strictly increasing within a process.
    seq: i64,
    event: Event,
}

impl EventDoc {
    fn new(e: &Event, id: String, seq: i64) -> EventDoc {
        EventDoc {
            id,
            kind: "event".into(),
            batch_id: e.batch_id.to_string(),
            ticket_id: e.ticket_id.to_string(),
            seq,
            event: e.clone(),
        }
    }

    /// An event appended after the upload: a fresh, time-ordered id.
    fn appended(e: &Event) -> EventDoc {
        let seq = next_seq();
        let nonce = &uuid::Uuid::new_v4().simple().to_string()[..8];
        EventDoc::new(e, format!("event:{}:{seq:016}-{nonce}", e.ticket_id), seq)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct ReconciliationDoc {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    batch_id: String,
    /// `at` in microseconds, for ordering.
    at_us: i64,
    run: ReconciliationRun,
}

#[derive(Debug, Serialize, Deserialize)]
struct KeyDoc {
    id: String,
    client_id: String,
    batch_id: String,
    claimed_at: DateTime<Utc>,
    #[serde(rename = "_etag", default, skip_serializing)]
    etag: Option<String>,
}

impl KeyDoc {
    fn new(batch: &Batch, key: &str) -> KeyDoc {
        KeyDoc {
            id: key.to_owned(),
            client_id: batch.client_id.to_string(),
            batch_id: batch.batch_id.to_string(),
            claimed_at: Utc::now(),
            etag: None,
        }
    }
}

/// A payment claim. Its partition key value (the container's `/batch_id`) names
/// the ticket, so every batch taking that ticket meets on this one document;
/// `owner` is the batch holding it.
#[derive(Debug, Serialize, Deserialize)]
struct ClaimDoc {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    batch_id: String,
    authority: AuthorityCode,
    ticket_id: TicketId,
    owner: BatchId,
    claimed_at: DateTime<Utc>,
    #[serde(rename = "_etag", default, skip_serializing)]
    etag: Option<String>,
}

fn claim_partition(authority: &AuthorityCode, ticket_id: &TicketId) -> String {
    // Neither part may hold a ':' (see `domain::ids`), and no batch id starts with `claim:`.
    format!("claim:{authority}:{ticket_id}")
}

impl ClaimDoc {
    fn new(c: &PaymentClaim) -> ClaimDoc {
        ClaimDoc {
            id: CLAIM_DOC_ID.into(),
            kind: "claim".into(),
            batch_id: claim_partition(&c.authority, &c.ticket_id),
            authority: c.authority.clone(),
            ticket_id: c.ticket_id.clone(),
            owner: c.batch_id.clone(),
            claimed_at: c.claimed_at,
            etag: None,
        }
    }

    fn claim(&self) -> PaymentClaim {
        PaymentClaim {
            authority: self.authority.clone(),
            ticket_id: self.ticket_id.clone(),
            batch_id: self.owner.clone(),
            claimed_at: self.claimed_at,
        }
    }
}

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

// ---------------------------------------------------------------- errors

fn map_err(what: impl std::fmt::Display, e: CosmosError) -> StoreError {
    let s = e.status();
    if s.is_precondition_failed() || s.is_conflict() {
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

fn invalid(e: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid(e.to_string())
}

/// Maps a failed operation of a transactional batch (other than the ones the caller decides on).
fn op_error(what: &str, status: u16) -> StoreError {
    match status {
        409 | 412 => StoreError::Conflict(what.to_owned()),
        404 => StoreError::NotFound(what.to_owned()),
        400 | 413 => StoreError::Invalid(format!("{what}: status {status}")),
        _ => StoreError::Unavailable(format!("{what}: status {status}")),
    }
}

/// The per-operation statuses of an executed transactional batch, whether the
/// service answered 200 (all applied) or 207 (one failed, nothing applied).
async fn run_batch(store: &CosmosStore, partition: &str, batch: TransactionalBatch, what: &str) -> Result<Vec<(u16, Option<String>)>> {
    let mut waited = Duration::ZERO;
    loop {
        let results = run_batch_once(store, partition, batch.clone(), what).await?;
        // A batch refused for the partition's throughput applied nothing: sent again once the
        // service says, as the SDK does with a refused single request.
        let throttled = results.iter().find(|(status, ..)| *status == 429).map(|(.., after)| after.unwrap_or(THROTTLED_PAUSE));
        match throttled {
            Some(after) if waited < THROTTLED_PATIENCE => {
                store.meter.throttled(1);
                tokio::time::sleep(after).await;
                waited += after;
            }
            _ => return Ok(results.into_iter().map(|(status, etag, _)| (status, etag)).collect()),
        }
    }
}

/// How long a throttled transactional batch waits when the service names no time.
const THROTTLED_PAUSE: Duration = Duration::from_millis(100);
/// How long one transactional batch keeps waiting out throttling before the stage is
/// told the store is unavailable (and its message comes back later).
const THROTTLED_PATIENCE: Duration = Duration::from_secs(10);

/// One execution: each operation's status, ETag and, if refused for throughput, when to try again.
async fn run_batch_once(store: &CosmosStore, partition: &str, batch: TransactionalBatch, what: &str) -> Result<Vec<(u16, Option<String>, Option<Duration>)>> {
    let executed = store.batches.execute_transactional_batch(batch, None);
    let response = match store.metered(BATCHES, "batch", partition, executed).await {
        Ok(response) => response,
        // Should a failed batch come back as an error status rather than 207, its body
        // still lists the operations' outcomes: decide on those, like on a 207.
        Err(e) => {
            #[derive(Deserialize)]
            struct OpResult {
                #[serde(rename = "statusCode")]
                status_code: u16,
                #[serde(rename = "eTag", default)]
                etag: Option<String>,
                #[serde(rename = "retryAfterMilliseconds", default)]
                retry_after_ms: Option<u64>,
            }
            let listed = e.response().and_then(|r| r.body().clone().into_single::<Vec<OpResult>>().ok());
            return match listed {
                Some(results) if !results.is_empty() => {
                    Ok(results.into_iter().map(|r| (r.status_code, r.etag, r.retry_after_ms.map(Duration::from_millis))).collect())
                }
                _ => Err(map_err(what, e)),
            };
        }
    };
    let model = response.into_model().map_err(|e| map_err(what, e))?;
    Ok(model.results().iter().map(|r| (r.status_code(), r.etag().map(str::to_owned), r.retry_after())).collect())
}

/// The first failed operation (its index and status), ignoring the 424s of the operations it took down.
fn first_failure(results: &[(u16, Option<String>)]) -> Option<(usize, u16)> {
    results.iter().enumerate().find(|(_, (s, _))| !(200..300).contains(s) && *s != 424).map(|(i, (s, _))| (i, *s))
}

// ---------------------------------------------------------------- construction

impl CosmosStore {
    /// The store on an existing client; the database and both containers must exist.
    pub async fn new(client: CosmosClient, database: &str) -> Result<CosmosStore> {
        let db = client.database_client(database.to_owned());
        let batches = db.container_client(BATCHES, None).await.map_err(|e| map_err(format!("container {BATCHES}"), e))?;
        let keys = db.container_client(IDEMPOTENCY, None).await.map_err(|e| map_err(format!("container {IDEMPOTENCY}"), e))?;
        Ok(CosmosStore { batches, keys, meter: Arc::default() })
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

    /// The store on the SDK's in-memory Cosmos emulator, in this process: a new, empty
    /// account with the database and both containers, charging request units by the
    /// emulator's model and, given `ru_per_second`, answering 429 past it (as in Azure,
    /// each of a container's physical partitions, four here, gets its share of it).
    #[cfg(feature = "cosmos-emulator")]
    pub async fn emulated(ru_per_second: Option<u64>) -> Result<CosmosStore> {
        use azure_core::credentials::Secret;
        use azure_data_cosmos::CosmosRuntimeBuilder;
        use azure_data_cosmos_driver::in_memory_emulator::{ContainerConfig, InMemoryEmulatorHttpClient, VirtualAccountConfig, VirtualRegion};

        const URL: &str = "https://local.emulator.local";
        const DATABASE: &str = "ticketpay";
        const REGION: &str = "East US";
        let unavailable = |e: &dyn std::fmt::Display| StoreError::Unavailable(format!("cosmos emulator: {e}"));
        let regions = vec![VirtualRegion::new(REGION, URL.parse().map_err(|e| unavailable(&e))?)];
        let account = VirtualAccountConfig::new(regions).map_err(|e| unavailable(&e))?.with_throttling_enabled(ru_per_second.is_some());
        let emulator = Arc::new(InMemoryEmulatorHttpClient::new(account));
        let mut config = ContainerConfig::new();
        if let Some(ru) = ru_per_second {
            config = config.with_throughput(ru);
        }
        let config = config.build().map_err(|e| unavailable(&e))?;
        let pk = |path: &str| serde_json::from_value(serde_json::json!({"paths": [path], "kind": "Hash", "version": 2})).map_err(|e| unavailable(&e));
        emulator.store().create_database(DATABASE);
        emulator.store().create_container_with_config(DATABASE, BATCHES, pk("/batch_id")?, config.clone());
        emulator.store().create_container_with_config(DATABASE, IDEMPOTENCY, pk("/client_id")?, config);
        let runtime = CosmosRuntimeBuilder::from(emulator.runtime_builder()).build().await.map_err(|e| unavailable(&e))?;
        let account = AccountReference::with_authentication_key(URL.parse().map_err(|e| unavailable(&e))?, Secret::new("bG9jYWw="));
        let client = CosmosClient::builder()
            .with_runtime(runtime)
            .build(account, RoutingStrategy::ProximityTo(REGION.into()))
            .await
            .map_err(|e| map_err("cosmos emulator", e))?;
        Self::new(client, DATABASE).await
    }

    async fn read_doc<T: DeserializeOwned>(&self, c: &ContainerClient, pk: &str, id: &str) -> Result<Option<T>> {
        let container = if std::ptr::eq(c, &self.keys) { IDEMPOTENCY } else { BATCHES };
        match self.metered(container, "read", pk, c.read_item(pk.to_owned(), id, None)).await {
            Ok(r) => r.into_model::<T>().map(Some).map_err(|e| invalid(format!("{id}: {e}"))),
            Err(e) if e.status().is_not_found() => Ok(None),
            Err(e) => Err(map_err(format!("{pk}/{id}"), e)),
        }
    }

    async fn batch_doc(&self, batch_id: &str) -> Result<Option<BatchDoc>> {
        self.read_doc(&self.batches, batch_id, BATCH_DOC_ID).await
    }

    async fn query<T: DeserializeOwned + Send + 'static>(&self, q: Query, partition: Option<&str>, what: &str) -> Result<Vec<T>> {
        let (scope, partition) = match partition {
            Some(pk) => (FeedScope::partition(pk.to_owned()), pk),
            None => (FeedScope::full_container(), "(every partition)"),
        };
        let pages = self.batches.query_items::<T>(q, scope, None).await.map_err(|e| map_err(what, e))?.into_pages();
        let mut pages = std::pin::pin!(pages);
        let mut rows = Vec::new();
        let span = request_span(BATCHES, "query");
        while let Some(page) = pages.next().instrument(span.clone()).await {
            let charged = page.as_ref().map_or_else(|e| e.diagnostics(), |p| Some(p.diagnostics()));
            self.count(&span, BATCHES, "query", partition, charged.as_deref());
            rows.extend(page.map_err(|e| map_err(what, e))?.into_items());
        }
        Ok(rows)
    }

    /// Runs one request as a client span, counting what it cost (answered or refused) against its partition.
    async fn metered<T: Charged>(
        &self,
        container: &'static str,
        operation: &'static str,
        partition: &str,
        request: impl std::future::Future<Output = azure_data_cosmos::Result<T>>,
    ) -> azure_data_cosmos::Result<T> {
        let span = request_span(container, operation);
        let answer = request.instrument(span.clone()).await;
        let diagnostics = match &answer {
            Ok(r) => Some(r.diagnostics()),
            Err(e) => e.diagnostics(),
        };
        self.count(&span, container, operation, partition, diagnostics.as_deref());
        answer
    }

    fn count(&self, span: &tracing::Span, container: &'static str, operation: &'static str, partition: &str, diagnostics: Option<&DiagnosticsContext>) {
        let Some(d) = diagnostics else { return };
        let ru = f64::from(d.total_request_charge());
        let throttled = d.requests().iter().filter(|r| r.status().is_throttled()).count() as u64;
        self.meter.charge(container, operation, partition, ru, throttled);
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
            match self.metered(BATCHES, "replace", id, self.batches.replace_item(id.to_owned(), BATCH_DOC_ID, &doc, Some(options))).await {
                Ok(_) => return Ok(out),
                Err(e) if e.status().is_precondition_failed() => backoff(attempt).await,
                Err(e) => return Err(map_err(format!("batch {id}"), e)),
            }
        }
        Err(StoreError::Conflict(format!("batch {id} (kept changing)")))
    }

    /// Writes the upload's tickets and events: upserts, in transactional
    /// batches of at most 100 operations, a few at once. Idempotent.
    async fn write_upload(&self, batch_id: &str, tickets: &[Ticket], events: &[Event]) -> Result<()> {
        let mut docs: Vec<serde_json::Value> = Vec::with_capacity(tickets.len() + events.len());
        for t in tickets {
            docs.push(serde_json::to_value(TicketDoc::new(t)).map_err(invalid)?);
        }
        // Upload events get ids from their position, so writing the upload again replaces them
        // instead of adding copies.
        let mut per_ticket: HashMap<&str, usize> = HashMap::new();
        for e in events {
            let n = per_ticket.entry(e.ticket_id.as_str()).or_default();
            let id = format!("event:{}:upload-{n}", e.ticket_id);
            *n += 1;
            docs.push(serde_json::to_value(EventDoc::new(e, id, next_seq())).map_err(invalid)?);
        }
        let mut chunks: Vec<Vec<serde_json::Value>> = Vec::new();
        let mut size = 0;
        for doc in docs {
            let len = doc.to_string().len();
            match chunks.last_mut() {
                Some(chunk) if chunk.len() < MAX_BATCH_OPS && size + len <= MAX_BATCH_BYTES => {
                    size += len;
                    chunk.push(doc);
                }
                _ => {
                    size = len;
                    chunks.push(vec![doc]);
                }
            }
        }
        let what = format!("upload of batch {batch_id}");
        futures::stream::iter(chunks)
            .map(|chunk| {
                let what = what.clone();
                async move {
                    let mut tb = TransactionalBatch::new(batch_id.to_owned());
                    for doc in chunk {
                        tb = tb.upsert_item(doc, None).map_err(invalid)?;
                    }
                    let results = run_batch(self, batch_id, tb, &what).await?;
                    match first_failure(&results) {
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

    /// Claims the client's idempotency key for `batch`: held by this upload (at
    /// the version it wrote or read), or already the key of a committed batch.
    async fn claim_key(&self, batch: &Batch, key: &str) -> Result<KeyClaim> {
        let client = batch.client_id.as_str();
        let doc = KeyDoc::new(batch, key);
        let what = format!("idempotency key {client}/{key}");
        match self.metered(IDEMPOTENCY, "create", client, self.keys.create_item(client.to_owned(), key, &doc, None)).await {
            Ok(r) => return self.written_key(&doc, r.headers().etag().map(|e| e.to_string())).await.map(KeyClaim::Held),
            Err(e) if e.status().is_conflict() => {}
            Err(e) => return Err(map_err(what, e)),
        }
        let Some(mut held) = self.read_doc::<KeyDoc>(&self.keys, client, key).await? else {
            // Released between our create and our read: the other upload failed. Let the caller retry.
            return Err(StoreError::Conflict(what));
        };
        if let Some(existing) = self.batch_doc(&held.batch_id).await? {
            return Ok(KeyClaim::Existing(existing.batch));
        }
        let etag = held.etag.take().ok_or_else(|| invalid(format!("{what} has no _etag")))?;
        // The key is claimed but its batch is not committed: either that upload is still being
        // written (or is this one, retried), or it died before committing or releasing the key.
        if held.batch_id == batch.batch_id.as_str() {
            return Ok(KeyClaim::Held(HeldKey { key: key.to_owned(), etag }));
        }
        if Utc::now() - held.claimed_at < KEY_TAKEOVER_AFTER {
            return Err(StoreError::Conflict(format!("{what} (an upload with this key is in progress)")));
        }
        let taken = self.replace_key(&doc, etag).await?;
        Ok(KeyClaim::Held(taken))
    }

    /// The key as this upload just wrote it (`doc`), at the version the write answered
    /// (read back if the answer had no ETag).
    async fn written_key(&self, doc: &KeyDoc, etag: Option<String>) -> Result<HeldKey> {
        let etag = match etag {
            Some(etag) => etag,
            None => match self.read_doc::<KeyDoc>(&self.keys, &doc.client_id, &doc.id).await? {
                Some(KeyDoc { batch_id, etag: Some(etag), .. }) if batch_id == doc.batch_id => etag,
                _ => return Err(StoreError::Conflict(format!("idempotency key {}/{}", doc.client_id, doc.id))),
            },
        };
        Ok(HeldKey { key: doc.id.clone(), etag })
    }

    /// Writes `doc` over the key if it is still at `etag`: `Conflict` if another upload changed it since.
    async fn replace_key(&self, doc: &KeyDoc, etag: String) -> Result<HeldKey> {
        let what = format!("idempotency key {}/{}", doc.client_id, doc.id);
        let options = ItemWriteOptions::default().with_precondition(Precondition::if_match(etag));
        match self.metered(IDEMPOTENCY, "replace", &doc.client_id, self.keys.replace_item(doc.client_id.clone(), &doc.id, doc, Some(options))).await {
            Ok(r) => self.written_key(doc, r.headers().etag().map(|e| e.to_string())).await,
            Err(e) if e.status().is_precondition_failed() || e.status().is_not_found() => {
                Err(StoreError::Conflict(format!("{what} (taken over by another upload)")))
            }
            Err(e) => Err(map_err(what, e)),
        }
    }

    /// Just before the commit point: the key must still be this upload's. Writing it
    /// again with if-match proves it (a read might be stale) and starts its takeover
    /// clock afresh, so nobody takes it over in the moment before the commit.
    async fn confirm_key(&self, batch: &Batch, held: &mut HeldKey) -> Result<()> {
        let doc = KeyDoc::new(batch, &held.key);
        *held = self.replace_key(&doc, held.etag.clone()).await?;
        Ok(())
    }

    /// Gives the key up after a failed upload, only if it is still as this upload
    /// wrote it: once taken over, it is another upload's.
    async fn release_key(&self, batch: &Batch, held: &HeldKey) {
        let client = batch.client_id.as_str();
        let key = held.key.as_str();
        let options = ItemWriteOptions::default().with_precondition(Precondition::if_match(held.etag.clone()));
        match self.metered(IDEMPOTENCY, "delete", client, self.keys.delete_item(client.to_owned(), key, Some(options))).await {
            Ok(_) => {}
            Err(e) if e.status().is_precondition_failed() || e.status().is_not_found() => {}
            // Left behind, the key is taken over once KEY_TAKEOVER_AFTER has passed.
            Err(e) => tracing::warn!(client, key, error = %e, "could not release an idempotency key after a failed upload"),
        }
    }

    async fn create_uncommitted(&self, batch: &Batch, tickets: &[Ticket], events: &[Event], key: Option<&mut HeldKey>) -> Result<Created> {
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
        match self.metered(BATCHES, "create", id, self.batches.create_item(id.to_owned(), BATCH_DOC_ID, &BatchDoc::new(batch), None)).await {
            Ok(_) => Ok(Created::New),
            Err(e) => Err(map_err(format!("batch {id}"), e)),
        }
    }
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
}

/// An idempotency key held by the upload that wrote it, at the version it wrote.
struct HeldKey {
    key: String,
    etag: String,
}

enum KeyClaim {
    Held(HeldKey),
    /// The key belongs to this committed batch.
    Existing(Batch),
}

async fn backoff(attempt: u32) {
    let cap = 2u64.saturating_pow(attempt.min(5)).min(25);
    let ms = rand::random_range(0..=cap);
    tokio::time::sleep(Duration::from_millis(ms)).await;
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
        let doc: Option<TicketDoc> = self.read_doc(&self.batches, batch_id.as_str(), &ticket_doc_id(ticket_id)).await?;
        doc.map(|d| {
            let etag = d.etag.ok_or_else(|| invalid(format!("ticket {batch_id}/{ticket_id} has no _etag")))?;
            Ok(Versioned { value: d.ticket, etag })
        })
        .transpose()
    }

    async fn update_ticket(&self, update: TicketUpdate) -> Result<Versioned<Ticket>> {
        let TicketUpdate { ticket, etag, budget, events } = update;
        let batch_id = ticket.batch_id.as_str().to_owned();
        let what = format!("ticket {}/{}", ticket.batch_id, ticket.ticket_id);
        let ticket_id = ticket_doc_id(&ticket.ticket_id);
        if events.len() + 2 > MAX_BATCH_OPS {
            return Err(invalid(format!("{what}: {} events in one change (at most {})", events.len(), MAX_BATCH_OPS - 2)));
        }
        if let Some(e) = events.iter().find(|e| e.batch_id != ticket.batch_id) {
            return Err(invalid(format!("{what}: an event of batch {}", e.batch_id)));
        }
        let ticket_doc = TicketDoc::new(&ticket);
        let event_docs: Vec<EventDoc> = events.iter().map(EventDoc::appended).collect();

        for attempt in 0..BATCH_DOC_ATTEMPTS {
            let mut tb = TransactionalBatch::new(batch_id.clone()).replace_item(
                ticket_id.clone(),
                &ticket_doc,
                Some(BatchReplaceOptions::default().with_precondition(Precondition::if_match(etag.clone()))),
            )
            .map_err(invalid)?;
            let budget_op = match budget {
                None => false,
                Some(change) => {
                    let mut doc = self.batch_doc(&batch_id).await?.ok_or_else(|| StoreError::NotFound(format!("batch {batch_id}")))?;
                    match change {
                        BudgetChange::Reserve(n) => {
                            if !doc.batch.can_reserve(n) {
                                // Refused either way; a stale ticket version is reported as such,
                                // as if the ticket had been checked first.
                                return match self.ticket(&ticket.batch_id, &ticket.ticket_id).await? {
                                    Some(current) if current.etag == etag => Err(StoreError::InsufficientBudget),
                                    _ => Err(StoreError::Conflict(what)),
                                };
                            }
                            doc.batch.committed += n;
                        }
                        BudgetChange::Release(n) => {
                            if n < 0 || doc.batch.committed < n {
                                return Err(invalid(format!("batch {batch_id}: releasing {n} of {} committed", doc.batch.committed)));
                            }
                            doc.batch.committed -= n;
                        }
                    }
                    let batch_etag = doc.etag.take().ok_or_else(|| invalid(format!("batch {batch_id} has no _etag")))?;
                    let options = BatchReplaceOptions::default().with_precondition(Precondition::if_match(batch_etag));
                    tb = tb.replace_item(BATCH_DOC_ID, &doc, Some(options)).map_err(invalid)?;
                    true
                }
            };
            for e in &event_docs {
                tb = tb.create_item(e).map_err(invalid)?;
            }
            let results = run_batch(self, &batch_id, tb, &what).await?;
            match first_failure(&results) {
                None => {
                    let new_etag = match results.first().and_then(|(_, e)| e.clone()) {
                        Some(e) => e,
                        None => self.ticket(&ticket.batch_id, &ticket.ticket_id).await?.map(|v| v.etag).unwrap_or_default(),
                    };
                    return Ok(Versioned { value: ticket, etag: new_etag });
                }
                // The ticket is not at the version the change was made from (or is gone).
                Some((0, 412 | 404)) => return Err(StoreError::Conflict(what)),
                // Another reservation moved the budget first: read it again.
                Some((1, 412)) if budget_op => backoff(attempt).await,
                Some((_, 429)) => return Err(StoreError::Unavailable(format!("{what}: throttled"))),
                Some((_, status)) => return Err(op_error(&what, status)),
            }
        }
        Err(StoreError::Conflict(format!("batch {batch_id} (budget kept changing)")))
    }

    async fn append_events(&self, events: &[Event]) -> Result<()> {
        let mut by_batch: Vec<(&BatchId, Vec<EventDoc>)> = Vec::new();
        for e in events {
            let doc = EventDoc::appended(e);
            match by_batch.iter_mut().find(|(b, _)| **b == e.batch_id) {
                Some((_, docs)) => docs.push(doc),
                None => by_batch.push((&e.batch_id, vec![doc])),
            }
        }
        for (batch_id, docs) in by_batch {
            let what = format!("events of batch {batch_id}");
            for chunk in docs.chunks(MAX_BATCH_OPS) {
                let mut tb = TransactionalBatch::new(batch_id.as_str().to_owned());
                for d in chunk {
                    tb = tb.create_item(d).map_err(invalid)?;
                }
                let results = run_batch(self, batch_id.as_str(), tb, &what).await?;
                if let Some((_, status)) = first_failure(&results) {
                    return Err(op_error(&what, status));
                }
            }
        }
        Ok(())
    }

    async fn events(&self, batch_id: &BatchId, ticket_id: &TicketId) -> Result<Vec<Event>> {
        let q = Query::from("SELECT * FROM c WHERE c.type = 'event' AND c.ticket_id = @ticket ORDER BY c.seq")
            .with_parameter("@ticket", ticket_id.as_str())
            .map_err(invalid)?;
        let docs: Vec<EventDoc> = self.query(q, Some(batch_id.as_str()), "events").await?;
        Ok(docs.into_iter().map(|d| d.event).collect())
    }

    async fn tickets(&self, batch_id: &BatchId, status: Option<Status>, limit: usize, cursor: Option<&str>) -> Result<TicketPage> {
        let mut text = format!("SELECT TOP {} * FROM c WHERE c.type = 'ticket' AND c.ticket_id > @cursor", limit + 1);
        let mut q = Query::from(String::new()).with_parameter("@cursor", cursor.unwrap_or("")).map_err(invalid)?;
        if let Some(s) = status {
            text.push_str(" AND c.status = @status");
            q = q.with_parameter("@status", s.as_str()).map_err(invalid)?;
        }
        text.push_str(" ORDER BY c.ticket_id");
        let docs: Vec<TicketDoc> = self.query(q.with_text(text), Some(batch_id.as_str()), "tickets").await?;
        Ok(TicketPage::from_fetched(docs.into_iter().map(|d| d.ticket).collect(), limit))
    }

    async fn summary(&self, batch_id: &BatchId) -> Result<BatchSummary> {
        #[derive(Deserialize)]
        struct Row {
            status: Status,
            notified: bool,
            paid: i64,
            reserved: i64,
        }
        // The few fields of every ticket, added up here: the SDK runs no GROUP BY or
        // aggregate that needs a client-side stage, and this is one partition's worth.
        let q = Query::from("SELECT c.status, c.notified, c.paid, c.reserved FROM c WHERE c.type = 'ticket'");
        let rows: Vec<Row> = self.query(q, Some(batch_id.as_str()), "summary").await?;
        let mut summary = BatchSummary::default();
        for r in rows {
            *summary.counts.entry(r.status).or_default() += 1;
            if r.status.is_end() && !r.notified {
                summary.awaiting_notification += 1;
            }
            summary.paid += r.paid;
            summary.reserved += r.reserved;
        }
        Ok(summary)
    }

    async fn has_open_tickets(&self, batch_id: &BatchId) -> Result<bool> {
        let q = Query::from("SELECT TOP 1 VALUE c.ticket_id FROM c WHERE c.type = 'ticket' AND c.notified = false");
        let open: Vec<String> = self.query(q, Some(batch_id.as_str()), "open tickets").await?;
        Ok(!open.is_empty())
    }

    async fn overdue_tickets(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<Versioned<Ticket>>> {
        let text = format!("SELECT TOP {limit} * FROM c WHERE c.type = 'ticket' AND c.notified = false AND c.due_us < @before");
        let q = Query::from(text).with_parameter("@before", before.timestamp_micros()).map_err(invalid)?;
        let docs: Vec<TicketDoc> = self.query(q, None, "overdue tickets").await?;
        docs.into_iter()
            .map(|d| {
                let etag = d.etag.ok_or_else(|| invalid(format!("ticket {}/{} has no _etag", d.batch_id, d.ticket_id)))?;
                Ok(Versioned { value: d.ticket, etag })
            })
            .collect()
    }

    async fn overdue_in_batch(&self, batch_id: &BatchId, before: DateTime<Utc>) -> Result<u64> {
        let q = Query::from("SELECT VALUE COUNT(1) FROM c WHERE c.type = 'ticket' AND c.notified = false AND c.due_us < @before")
            .with_parameter("@before", before.timestamp_micros())
            .map_err(invalid)?;
        let counts: Vec<u64> = self.query(q, Some(batch_id.as_str()), "overdue tickets").await?;
        Ok(counts.into_iter().sum())
    }

    async fn incomplete_batches(&self, limit: usize) -> Result<Vec<Batch>> {
        let text = format!("SELECT TOP {limit} * FROM c WHERE c.type = 'batch' AND (NOT IS_DEFINED(c.completed_at) OR IS_NULL(c.completed_at))");
        let docs: Vec<BatchDoc> = self.query(Query::from(text), None, "incomplete batches").await?;
        Ok(docs.into_iter().map(|d| d.batch).collect())
    }

    async fn find_by_reference(&self, reference: &str, client: Option<&ClientId>, limit: usize) -> Result<Vec<Ticket>> {
        let mut text = format!("SELECT TOP {limit} * FROM c WHERE c.type = 'ticket' AND c.reference = @reference");
        let mut q = Query::from(String::new()).with_parameter("@reference", reference).map_err(invalid)?;
        if let Some(client) = client {
            text.push_str(" AND c.ticket.client_id = @client");
            q = q.with_parameter("@client", client.as_str()).map_err(invalid)?;
        }
        let docs: Vec<TicketDoc> = self.query(q.with_text(text), None, "tickets by reference").await?;
        // Tickets of an upload that never committed (no batch document) are not there.
        let mut committed: HashMap<String, bool> = HashMap::new();
        let mut out = Vec::new();
        for d in docs {
            let known = match committed.get(&d.batch_id) {
                Some(k) => *k,
                None => {
                    let k = self.batch_doc(&d.batch_id).await?.is_some();
                    committed.insert(d.batch_id.clone(), k);
                    k
                }
            };
            if known {
                out.push(d.ticket);
            }
        }
        Ok(out)
    }

    async fn record_reconciliation(&self, run: &ReconciliationRun) -> Result<()> {
        let doc = ReconciliationDoc {
            id: format!("reconciliation:{}", run.run_id),
            kind: "reconciliation".into(),
            batch_id: run.batch_id.to_string(),
            at_us: run.at.timestamp_micros(),
            run: run.clone(),
        };
        let what = format!("reconciliation of batch {}", run.batch_id);
        let created = self.batches.create_item(doc.batch_id.clone(), &doc.id, &doc, None);
        self.metered(BATCHES, "create", &doc.batch_id, created).await.map_err(|e| map_err(&what, e))?;
        Ok(())
    }

    async fn reconciliations(&self, batch_id: &BatchId, limit: usize) -> Result<Vec<ReconciliationRun>> {
        let text = format!("SELECT TOP {limit} * FROM c WHERE c.type = 'reconciliation' ORDER BY c.at_us DESC");
        let docs: Vec<ReconciliationDoc> = self.query(Query::from(text), Some(batch_id.as_str()), "reconciliations").await?;
        Ok(docs.into_iter().map(|d| d.run).collect())
    }

    async fn payment_claim(&self, authority: &AuthorityCode, ticket_id: &TicketId) -> Result<Option<Versioned<PaymentClaim>>> {
        let pk = claim_partition(authority, ticket_id);
        let doc: Option<ClaimDoc> = self.read_doc(&self.batches, &pk, CLAIM_DOC_ID).await?;
        doc.map(|d| {
            let etag = d.etag.clone().ok_or_else(|| invalid(format!("payment claim {pk} has no _etag")))?;
            Ok(Versioned { value: d.claim(), etag })
        })
        .transpose()
    }

    async fn take_payment_claim(&self, claim: &PaymentClaim, over: Option<&str>) -> Result<Versioned<PaymentClaim>> {
        let doc = ClaimDoc::new(claim);
        let what = format!("payment claim {}", doc.batch_id);
        let written = match over {
            None => self.metered(BATCHES, "create", &doc.batch_id, self.batches.create_item(doc.batch_id.clone(), CLAIM_DOC_ID, &doc, None)).await,
            Some(etag) => {
                let options = ItemWriteOptions::default().with_precondition(Precondition::if_match(etag.to_owned()));
                self.metered(BATCHES, "replace", &doc.batch_id, self.batches.replace_item(doc.batch_id.clone(), CLAIM_DOC_ID, &doc, Some(options))).await
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
        match self.metered(BATCHES, "delete", &pk, self.batches.delete_item(pk.clone(), CLAIM_DOC_ID, Some(options))).await {
            Ok(_) => Ok(true),
            Err(e) if e.status().is_precondition_failed() || e.status().is_not_found() => Ok(false),
            Err(e) => Err(map_err(format!("payment claim {pk}"), e)),
        }
    }
}
