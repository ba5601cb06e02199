//! Leases on Azure Storage blob leases: one container, shared by every
//! instance. The service decides who holds a lease; times are the service's
//! (the `Date` of its answers), never an instance's clock alone.
//!
//! Layout of the container:
//! - `slices/{resource}`: a zero-byte blob per capacity slice; its blob lease
//!   is the lease, and its metadata `instance` names the holder.
//! - `members/{group}/{instance}`: metadata `wants` (slices it has work for) and `expires_ms`.
//! - `pauses/{resource}`: metadata `until_ms`.
//!
//! In Azure the identity needs Storage Blob Data Contributor on the container.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::http::headers::{HeaderName, Headers};
use azure_core::http::{Etag, RequestContent, StatusCode, Url};
use azure_storage_blob::models::{
    BlobClientAcquireLeaseOptions, BlobClientDeleteOptions, BlobClientGetPropertiesResultHeaders, BlobClientSetMetadataOptions,
    BlobClientUploadOptions, BlobContainerClientListBlobsOptions, BlobItem, LeaseState, ListBlobsIncludeItem,
};
use azure_storage_blob::{BlobClient, BlobContainerClient};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use super::{LeaseError, LeaseId, Leases, Member, Result, check_term};

/// Metadata values travel as HTTP headers: anything but plain ASCII is escaped.
const VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

const DATE: HeaderName = HeaderName::from_static("date");

/// Conditional writes of one pause that lose to another writer before giving up.
const PAUSE_TRIES: usize = 16;

pub struct BlobLeases {
    container: BlobContainerClient,
    /// Service clock minus local clock (ms), as last seen in an answer.
    offset_ms: Mutex<Option<i64>>,
}

impl BlobLeases {
    /// On the container `container` of the account at `account_url`
    /// (`https://{account}.blob.core.windows.net`), as `credential`.
    pub fn new(account_url: &str, container: &str, credential: Arc<dyn TokenCredential>) -> Result<BlobLeases> {
        BlobLeases::on(container_url(account_url, container)?, Some(credential))
    }

    /// As the managed identity of the host (App Service, Functions, IMDS);
    /// `client_id` picks a user-assigned identity.
    pub fn managed_identity(account_url: &str, container: &str, client_id: Option<&str>) -> Result<BlobLeases> {
        let options = client_id.map(|id| azure_identity::ManagedIdentityCredentialOptions {
            user_assigned_id: Some(azure_identity::UserAssignedId::ClientId(id.to_owned())),
            ..Default::default()
        });
        let credential = azure_identity::ManagedIdentityCredential::new(options)
            .map_err(|e| LeaseError::Unavailable(format!("managed identity for Azure Storage: {e}")))?;
        BlobLeases::new(account_url, container, credential)
    }

    /// With a shared access signature (`sv=…&sig=…`, with or without `?`)
    /// instead of an identity: a SAS of the account or of the container, as
    /// the storage emulator (Azurite) accepts. `http` is allowed here.
    pub fn with_sas(account_url: &str, container: &str, sas: &str) -> Result<BlobLeases> {
        let mut url = container_url(account_url, container)?;
        url.set_query(Some(sas.trim_start_matches('?')));
        BlobLeases::on(url, None)
    }

    fn on(url: Url, credential: Option<Arc<dyn TokenCredential>>) -> Result<BlobLeases> {
        let what = url.as_str().split('?').next().unwrap_or_default().to_owned();
        let container = BlobContainerClient::new(url, credential, None)
            .map_err(|e| LeaseError::Unavailable(format!("Azure Storage container {what}: {e}")))?;
        Ok(BlobLeases { container, offset_ms: Mutex::new(None) })
    }

    /// Creates the container if it is missing (needs the right to, which a
    /// container SAS or the data role alone may not give).
    pub async fn create_container_if_missing(&self) -> Result<()> {
        match self.container.create(None).await {
            Ok(rsp) => {
                self.observe(rsp.headers());
                Ok(())
            }
            Err(e) if status(&e) == Some(StatusCode::Conflict) => Ok(()),
            Err(e) => Err(self.fail("create container", e)),
        }
    }

    fn fail(&self, what: &str, e: azure_core::Error) -> LeaseError {
        if let Some(headers) = error_headers(&e) {
            self.observe(headers);
        }
        let container = self.container.url().path().to_owned();
        let hint = match status(&e) {
            Some(StatusCode::Forbidden) => {
                " (refused: does the identity have Storage Blob Data Contributor on the container, or is the SAS valid?)"
            }
            Some(StatusCode::NotFound) => " (does the container exist?)",
            Some(s) if u16::from(s) >= 500 => " (the service is failing)",
            None => " (could not reach the service)",
            _ => "",
        };
        LeaseError::Unavailable(format!("Azure Storage {what} in {container}{hint}: {e}"))
    }

    /// The service's now (ms) from an answer's `Date`: whole seconds, so
    /// the local clock refines it only within that second.
    fn observe(&self, headers: &Headers) -> i64 {
        let local = Utc::now().timestamp_millis();
        let mut offset = self.offset_ms.lock().unwrap_or_else(|p| p.into_inner());
        let date = headers
            .get_optional_str(&DATE)
            .and_then(|d| httpdate::parse_http_date(d).ok())
            .map(|t| DateTime::<Utc>::from(t).timestamp_millis());
        match date {
            Some(date) => {
                let now = local.clamp(date, date + 1_000);
                *offset = Some(now - local);
                now
            }
            None => local + offset.unwrap_or(0),
        }
    }

    /// The service's now (ms): from the last answer's clock, or asked.
    async fn now(&self) -> Result<i64> {
        let known = *self.offset_ms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(offset) = known {
            return Ok(Utc::now().timestamp_millis() + offset);
        }
        match self.container.get_properties(None).await {
            Ok(rsp) => Ok(self.observe(rsp.headers())),
            Err(e) => match error_headers(&e) {
                Some(headers) if status(&e).is_some_and(|s| u16::from(s) < 500 && s != StatusCode::Forbidden) => {
                    Ok(self.observe(headers))
                }
                _ => Err(self.fail("clock", e)),
            },
        }
    }

    /// A zero-byte blob if none is there; never touches one that is (nor its lease).
    async fn create_if_missing(&self, blob: &BlobClient) -> Result<()> {
        let options = BlobClientUploadOptions { if_none_match: Some(Etag::from("*")), ..Default::default() };
        match blob.upload(RequestContent::from(Vec::<u8>::new()), Some(options)).await {
            Ok(rsp) => {
                self.observe(rsp.raw_response.headers());
                Ok(())
            }
            Err(e) if matches!(status(&e), Some(StatusCode::Conflict | StatusCode::PreconditionFailed)) => Ok(()),
            Err(e) => Err(self.fail(&format!("create {}", name(blob)), e)),
        }
    }

    /// Every blob under `prefix`, with metadata, and the service's now.
    async fn list(&self, prefix: &str) -> Result<(Vec<BlobItem>, i64)> {
        let options = BlobContainerClientListBlobsOptions {
            prefix: Some(prefix.to_owned()),
            include: Some(vec![ListBlobsIncludeItem::Metadata]),
            ..Default::default()
        };
        let what = format!("list {prefix}");
        let mut pages = self.container.list_blobs(Some(options)).map_err(|e| self.fail(&what, e))?.into_pages();
        let (mut items, mut now) = (Vec::new(), None);
        while let Some(page) = pages.try_next().await.map_err(|e| self.fail(&what, e))? {
            now.get_or_insert(self.observe(page.headers()));
            items.extend(page.into_model().map_err(|e| self.fail(&what, e))?.blob_items);
        }
        let now = match now {
            Some(now) => now,
            None => self.now().await?,
        };
        Ok((items, now))
    }
}

fn container_url(account_url: &str, container: &str) -> Result<Url> {
    let mut url = Url::parse(account_url).map_err(|e| LeaseError::Unavailable(format!("Azure Storage account URL {account_url}: {e}")))?;
    url.set_query(None);
    url.path_segments_mut()
        .map_err(|()| LeaseError::Unavailable(format!("Azure Storage account URL {account_url} cannot have a path")))?
        .pop_if_empty()
        .push(container);
    Ok(url)
}

fn status(e: &azure_core::Error) -> Option<StatusCode> {
    match e.kind() {
        ErrorKind::HttpResponse { status, .. } => Some(*status),
        _ => None,
    }
}

fn error_headers(e: &azure_core::Error) -> Option<&Headers> {
    match e.kind() {
        ErrorKind::HttpResponse { raw_response: Some(raw), .. } => Some(raw.headers()),
        _ => None,
    }
}

fn name(blob: &BlobClient) -> String {
    let path = blob.url().path();
    percent_decode_str(path).decode_utf8_lossy().into_owned()
}

fn encode(value: &str) -> String {
    utf8_percent_encode(value, VALUE).to_string()
}

fn decode(value: &str) -> String {
    percent_decode_str(value).decode_utf8_lossy().into_owned()
}

fn metadata(item: &BlobItem) -> Option<&HashMap<String, String>> {
    item.metadata.as_ref()?.values.as_ref()
}

fn slice_blob(resource: &str) -> String {
    format!("slices/{resource}")
}

fn members_prefix(group: &str) -> String {
    format!("members/{group}/")
}

fn pause_blob(resource: &str) -> String {
    format!("pauses/{resource}")
}

fn millis(d: Duration) -> i64 {
    d.as_millis() as i64
}

#[async_trait]
impl Leases for BlobLeases {
    async fn acquire(&self, resource: &str, instance: &str, term: Duration) -> Result<Option<LeaseId>> {
        check_term(term)?;
        let blob = self.container.blob_client(&slice_blob(resource));
        let id = uuid::Uuid::new_v4().to_string();
        let mut created = false;
        loop {
            let options = BlobClientAcquireLeaseOptions { proposed_lease_id: Some(id.clone()), ..Default::default() };
            match blob.acquire_lease(term.as_secs() as i32, Some(options)).await {
                Ok(rsp) => {
                    self.observe(rsp.headers());
                    break;
                }
                // LeaseAlreadyPresent (or breaking): someone holds it.
                Err(e) if status(&e) == Some(StatusCode::Conflict) => return Ok(None),
                Err(e) if status(&e) == Some(StatusCode::NotFound) && !created => {
                    self.create_if_missing(&blob).await?;
                    created = true;
                }
                Err(e) => return Err(self.fail(&format!("acquire lease on {resource}"), e)),
            }
        }
        // Who holds it, for `holders`: written under the lease, so no one else can.
        let meta = HashMap::from([("instance".to_owned(), encode(instance))]);
        let options = BlobClientSetMetadataOptions { lease_id: Some(id.clone()), ..Default::default() };
        if let Err(e) = blob.set_metadata(&meta, Some(options)).await {
            let _ = blob.release_lease(id, None).await;
            return Err(self.fail(&format!("name the holder of {resource}"), e));
        }
        Ok(Some(LeaseId(id)))
    }

    /// Azure Storage renews a lease for the term it was taken with.
    async fn renew(&self, resource: &str, lease: &LeaseId, term: Duration) -> Result<bool> {
        check_term(term)?;
        let blob = self.container.blob_client(&slice_blob(resource));
        match blob.renew_lease(lease.0.clone(), None).await {
            Ok(rsp) => {
                self.observe(rsp.headers());
                Ok(true)
            }
            // Lease id mismatch / not present, or no such blob: lost.
            Err(e) if matches!(status(&e), Some(StatusCode::Conflict | StatusCode::NotFound | StatusCode::PreconditionFailed)) => {
                Ok(false)
            }
            Err(e) => Err(self.fail(&format!("renew lease on {resource}"), e)),
        }
    }

    async fn release(&self, resource: &str, lease: &LeaseId) -> Result<()> {
        let blob = self.container.blob_client(&slice_blob(resource));
        match blob.release_lease(lease.0.clone(), None).await {
            Ok(rsp) => {
                self.observe(rsp.headers());
                Ok(())
            }
            Err(e) if matches!(status(&e), Some(StatusCode::Conflict | StatusCode::NotFound | StatusCode::PreconditionFailed)) => Ok(()),
            Err(e) => Err(self.fail(&format!("release lease on {resource}"), e)),
        }
    }

    async fn holders(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let (items, _) = self.list(&slice_blob(prefix)).await?;
        let mut held: Vec<(String, String)> = items
            .iter()
            .filter(|item| item.properties.as_ref().and_then(|p| p.lease_state) == Some(LeaseState::Leased))
            .filter_map(|item| {
                let resource = item.name.as_deref()?.strip_prefix("slices/")?.to_owned();
                let instance = decode(metadata(item)?.get("instance")?);
                Some((resource, instance))
            })
            .collect();
        held.sort();
        Ok(held)
    }

    async fn announce(&self, group: &str, instance: &str, wants: u32, term: Duration) -> Result<Vec<Member>> {
        check_term(term)?;
        let prefix = members_prefix(group);
        let blob = self.container.blob_client(&format!("{prefix}{instance}"));
        let expires = self.now().await? + millis(term);
        let meta = HashMap::from([("wants".to_owned(), wants.to_string()), ("expires_ms".to_owned(), expires.to_string())]);
        let options = BlobClientUploadOptions { metadata: Some(meta), ..Default::default() };
        match blob.upload(RequestContent::from(Vec::<u8>::new()), Some(options)).await {
            Ok(rsp) => {
                self.observe(rsp.raw_response.headers());
            }
            Err(e) => return Err(self.fail(&format!("announce {instance} in {group}"), e)),
        }
        let (items, now) = self.list(&prefix).await?;
        let mut members = Vec::new();
        for item in &items {
            let Some(name) = item.name.as_deref().and_then(|n| n.strip_prefix(&prefix)) else { continue };
            let meta = metadata(item);
            let expires_ms = meta.and_then(|m| m.get("expires_ms")).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
            if expires_ms > now {
                let wants = meta.and_then(|m| m.get("wants")).map_or(0, |v| wanted_slices(v));
                members.push(Member { instance: name.to_owned(), wants });
            } else if let Some(etag) = item.properties.as_ref().and_then(|p| p.etag.clone()) {
                // Gone for a term: tidy up, unless it announced itself again meanwhile.
                let options = BlobClientDeleteOptions { if_match: Some(etag), ..Default::default() };
                let _ = self.container.blob_client(&format!("{prefix}{name}")).delete(Some(options)).await;
            }
        }
        members.sort_by(|a, b| a.instance.cmp(&b.instance));
        Ok(members)
    }

    async fn leave(&self, group: &str, instance: &str) -> Result<()> {
        let blob = self.container.blob_client(&format!("{}{instance}", members_prefix(group)));
        match blob.delete(None).await {
            Ok(rsp) => {
                self.observe(rsp.headers());
                Ok(())
            }
            Err(e) if status(&e) == Some(StatusCode::NotFound) => Ok(()),
            Err(e) => Err(self.fail(&format!("leave {group} as {instance}"), e)),
        }
    }

    async fn pause(&self, resource: &str, for_: Duration) -> Result<()> {
        let blob = self.container.blob_client(&pause_blob(resource));
        let what = format!("pause {resource}");
        for _ in 0..PAUSE_TRIES {
            let (current, etag, now) = match blob.get_properties(None).await {
                Ok(rsp) => {
                    let now = self.observe(rsp.headers());
                    let until = rsp.metadata().ok().and_then(|m| m.get("until_ms").and_then(|v| v.parse::<i64>().ok()));
                    (until, rsp.etag().ok().flatten(), now)
                }
                Err(e) if status(&e) == Some(StatusCode::NotFound) => {
                    let now = match error_headers(&e) {
                        Some(headers) => self.observe(headers),
                        None => self.now().await?,
                    };
                    (None, None, now)
                }
                Err(e) => return Err(self.fail(&what, e)),
            };
            let until = now + millis(for_);
            if current.is_some_and(|c| c >= until) {
                return Ok(());
            }
            let meta = HashMap::from([("until_ms".to_owned(), until.to_string())]);
            let options = match etag {
                Some(etag) => BlobClientUploadOptions { metadata: Some(meta), if_match: Some(etag), ..Default::default() },
                None => BlobClientUploadOptions { metadata: Some(meta), if_none_match: Some(Etag::from("*")), ..Default::default() },
            };
            match blob.upload(RequestContent::from(Vec::<u8>::new()), Some(options)).await {
                Ok(rsp) => {
                    self.observe(rsp.raw_response.headers());
                    return Ok(());
                }
                // Another instance wrote first: read its pause and compare again.
                Err(e) if matches!(status(&e), Some(StatusCode::PreconditionFailed | StatusCode::Conflict)) => continue,
                Err(e) => return Err(self.fail(&what, e)),
            }
        }
        Err(LeaseError::Unavailable(format!("Azure Storage {what}: {PAUSE_TRIES} writers raced, try again")))
    }

    async fn paused_until(&self, resource: &str) -> Result<Option<DateTime<Utc>>> {
        let blob = self.container.blob_client(&pause_blob(resource));
        match blob.get_properties(None).await {
            Ok(rsp) => {
                let now = self.observe(rsp.headers());
                let until = rsp.metadata().ok().and_then(|m| m.get("until_ms").and_then(|v| v.parse::<i64>().ok()));
                Ok(until.filter(|u| *u > now).and_then(DateTime::from_timestamp_millis))
            }
            Err(e) if status(&e) == Some(StatusCode::NotFound) => {
                if let Some(headers) = error_headers(&e) {
                    self.observe(headers);
                }
                Ok(None)
            }
            Err(e) => Err(self.fail(&format!("read pause of {resource}"), e)),
        }
    }
}

/// A member's `wants`: a count of slices, or as instances of an older release
/// wrote it, `true` (as many as it can get) or `false`.
fn wanted_slices(v: &str) -> u32 {
    match v {
        "true" => u32::MAX,
        other => other.parse().unwrap_or(0),
    }
}
