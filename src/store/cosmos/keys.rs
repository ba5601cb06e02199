//! Idempotency keys (container `idempotency`, partition key `/client_id`): the
//! first write of an upload that carries one, so that two uploads with the
//! same key serialise before anything of either is visible (see
//! `docs/data-model.md`, "create_batch").

use azure_data_cosmos::options::{ItemWriteOptions, Precondition};
use chrono::Utc;

use super::documents::KeyDoc;
use super::{invalid, map_err, CosmosStore, IDEMPOTENCY};
use crate::domain::Batch;
use crate::store::{Result, StoreError};

/// An idempotency key whose batch never appeared may be taken over after this long
/// (the upload that claimed it died between claiming it and committing).
const KEY_TAKEOVER_AFTER: chrono::Duration = chrono::Duration::minutes(10);

/// An idempotency key held by the upload that wrote it, at the version it wrote.
pub(super) struct HeldKey {
    key: String,
    etag: String,
}

pub(super) enum KeyClaim {
    Held(HeldKey),
    /// The key belongs to this committed batch.
    Existing(Batch),
}


impl CosmosStore {
    /// Claims the client's idempotency key for `batch`: held by this upload (at
    /// the version it wrote or read), or already the key of a committed batch.
    pub(super) async fn claim_key(&self, batch: &Batch, key: &str) -> Result<KeyClaim> {
        let client = batch.client_id.as_str();
        let doc = KeyDoc::new(batch, key);
        let what = format!("idempotency key {client}/{key}");
        match self.metered(IDEMPOTENCY, "create", client, self.keys.create_item(client.to_owned(), key, &doc, None)).await {
            Ok(r) => return self.written_key(&doc, r.headers().etag().map(|e| e.to_string())).await.map(KeyClaim::Held),
            Err(e) if e.status().is_conflict() => {}
            Err(e) => return Err(map_err(what, e)),
        }
        let Some(mut held) = self.read_doc::<KeyDoc>(IDEMPOTENCY, client, key).await? else {
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
            None => match self.read_doc::<KeyDoc>(IDEMPOTENCY, &doc.client_id, &doc.id).await? {
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
    pub(super) async fn confirm_key(&self, batch: &Batch, held: &mut HeldKey) -> Result<()> {
        let doc = KeyDoc::new(batch, &held.key);
        *held = self.replace_key(&doc, held.etag.clone()).await?;
        Ok(())
    }

    /// Gives the key up after a failed upload, only if it is still as this upload
    /// wrote it: once taken over, it is another upload's.
    pub(super) async fn release_key(&self, batch: &Batch, held: &HeldKey) {
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

}
