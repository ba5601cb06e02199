//! Transactional batches: writes to one logical partition, applied together or
//! not at all, and what they cost.
//!
//! An account answers a transactional batch with the charge of each operation.
//! The SDK's in-memory emulator answers every operation of a batch with a flat
//! stand-in instead, so a store on the emulator prices each write itself, by the
//! emulator's own request-unit model, as the single request it stands for (the
//! service bills a batch about the sum of its operations).

use std::time::Duration;

use azure_data_cosmos::TransactionalBatch;
use azure_data_cosmos::options::{BatchReplaceOptions, Precondition};
use serde::{Deserialize, Serialize};

use super::{invalid, map_err, CosmosStore, RECORDS};
use crate::store::{Result, StoreError};

/// At most this many operations in one transactional batch (and 2 MB).
pub(super) const MAX_OPS: usize = 100;

/// How a write is priced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    Create,
    Replace,
    Delete,
}

/// The request units of one write, from its document's serialized size and its top-level properties.
pub(crate) type Pricer = fn(Write, usize, usize) -> f64;

/// How long a throttled transactional batch waits when the service names no time.
const THROTTLED_PAUSE: Duration = Duration::from_millis(100);
/// How long one transactional batch keeps waiting out throttling before the stage is
/// told the store is unavailable (and its message comes back later).
const THROTTLED_PATIENCE: Duration = Duration::from_secs(10);

/// The outcome of each operation: its status and, for a write that landed, the document's new ETag.
pub(super) type Outcomes = Vec<(u16, Option<String>)>;

pub(super) struct Transaction {
    partition: String,
    ops: TransactionalBatch,
    pricer: Option<Pricer>,
    priced: f64,
}

impl Transaction {
    pub(super) fn new(store: &CosmosStore, partition: &str) -> Transaction {
        Transaction { partition: partition.to_owned(), ops: TransactionalBatch::new(partition.to_owned()), pricer: store.pricer, priced: 0.0 }
    }

    fn price(&mut self, write: Write, doc: &serde_json::Value) {
        if let Some(price) = self.pricer {
            let size = serde_json::to_vec(doc).map_or(0, |b| b.len());
            let properties = doc.as_object().map_or(0, |o| o.len());
            self.priced += price(write, size, properties);
        }
    }

    fn value(doc: &impl Serialize) -> Result<serde_json::Value> {
        serde_json::to_value(doc).map_err(invalid)
    }

    pub(super) fn create(mut self, doc: &impl Serialize) -> Result<Transaction> {
        let doc = Self::value(doc)?;
        self.price(Write::Create, &doc);
        self.ops = self.ops.create_item(doc).map_err(invalid)?;
        Ok(self)
    }

    /// Writes the document whether or not it exists (priced as the create it is meant to be).
    pub(super) fn upsert(mut self, doc: &impl Serialize) -> Result<Transaction> {
        let doc = Self::value(doc)?;
        self.price(Write::Create, &doc);
        self.ops = self.ops.upsert_item(doc, None).map_err(invalid)?;
        Ok(self)
    }

    /// Replaces document `id` only if it is still at `etag`.
    pub(super) fn replace(mut self, id: &str, doc: &impl Serialize, etag: &str) -> Result<Transaction> {
        let doc = Self::value(doc)?;
        self.price(Write::Replace, &doc);
        let options = BatchReplaceOptions::default().with_precondition(Precondition::if_match(etag.to_owned()));
        self.ops = self.ops.replace_item(id.to_owned(), doc, Some(options)).map_err(invalid)?;
        Ok(self)
    }

    /// Deletes `doc` (document `id`) only if it is still at `etag`.
    pub(super) fn delete(mut self, id: &str, doc: &impl Serialize, etag: &str) -> Result<Transaction> {
        let doc = Self::value(doc)?;
        self.price(Write::Delete, &doc);
        let options = azure_data_cosmos::options::BatchDeleteOptions::default().with_precondition(Precondition::if_match(etag.to_owned()));
        self.ops = self.ops.delete_item(id.to_owned(), Some(options));
        Ok(self)
    }

    /// Executes the batch: each operation's outcome, whether the service applied them all
    /// (200) or none (207, one failed). A batch refused for the partition's throughput is
    /// sent again once the service says, as the SDK does with a refused single request.
    pub(super) async fn run(&self, store: &CosmosStore, what: &str) -> Result<Outcomes> {
        let mut waited = Duration::ZERO;
        loop {
            let results = self.run_once(store, what).await?;
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

    /// One execution: each operation's status, ETag and, if refused for throughput, when to try again.
    async fn run_once(&self, store: &CosmosStore, what: &str) -> Result<Vec<(u16, Option<String>, Option<Duration>)>> {
        let executed = store.records.execute_transactional_batch(self.ops.clone(), None);
        let priced = self.pricer.map(|_| self.priced);
        let response = match store.metered_priced(RECORDS, "batch", &self.partition, priced, executed).await {
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
}

/// The first failed operation (its index and status), ignoring the 424s of the operations it took down.
pub(super) fn first_failure(results: &Outcomes) -> Option<(usize, u16)> {
    results.iter().enumerate().find(|(_, (s, _))| !(200..300).contains(s) && *s != 424).map(|(i, (s, _))| (i, *s))
}

/// Maps a failed operation of a transactional batch (other than the ones the caller decides on).
pub(super) fn op_error(what: &str, status: u16) -> StoreError {
    match status {
        409 | 412 => StoreError::Conflict(what.to_owned()),
        404 => StoreError::NotFound(what.to_owned()),
        400 | 413 => StoreError::Invalid(format!("{what}: status {status}")),
        _ => StoreError::Unavailable(format!("{what}: status {status}")),
    }
}
