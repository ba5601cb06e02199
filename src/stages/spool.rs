//! Audit records on local disk until the store has them.
//!
//! - Exchanges that happened while the store could not take them (busy,
//!   throttled, down) are written here at once, then appended to the store as
//!   soon as it answers again, oldest first.
//! - Every provider request is noted here just before it is sent (in this
//!   process's [`Journal`]) until its exchange is recorded, and noted again
//!   with its answer when the exchange waits for later calls of the same
//!   invocation. A request left open by a process that was killed in between
//!   enters the ticket's trail as it was noted last (answered, or
//!   `interrupted`), unless the trail has it.
//!
//! A handler that is killed meanwhile finds both here when it starts again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use chrono::Utc;

use crate::domain::{BatchId, Event, EventKind, Exchange, TicketId};
use crate::providers::client::{Caller, RequestJournal};
use crate::store::Store;
use super::journal::{self, Journal, Left};

/// How often the spool tries the store again while it holds records.
const RETRY_EVERY: Duration = Duration::from_secs(2);

pub struct AuditSpool {
    dir: PathBuf,
    store: Arc<dyn Store>,
    wake: Notify,
    journal: Journal,
    /// Notes of the older one-file-per-request kind older than this were left by an earlier process.
    started: SystemTime,
}

/// One file per request, as earlier versions noted them.
const NOTE: &str = "intent";

pub(super) fn event_request_id(event: &Event) -> Option<&str> {
    match &event.kind {
        EventKind::Exchange(x) => request_id(x),
        _ => None,
    }
}

fn request_id(exchange: &Exchange) -> Option<&str> {
    exchange.request.headers.get(&crate::providers::wire::REQUEST_ID.to_ascii_lowercase()).map(String::as_str)
}

impl AuditSpool {
    /// A spool in `dir` (created if missing), draining into `store` in the background.
    pub fn start(dir: &Path, store: Arc<dyn Store>) -> std::io::Result<Arc<AuditSpool>> {
        std::fs::create_dir_all(dir)?;
        let journal = Journal::create(dir)?;
        let spool = Arc::new(AuditSpool { dir: dir.to_owned(), store, wake: Notify::new(), journal, started: SystemTime::now() });
        tokio::spawn(drain_forever(spool.clone()));
        Ok(spool)
    }

    /// Keeps `events` until the store takes them. Only if the disk fails too are they
    /// lost, and then they are logged in full, so the log still holds them.
    pub async fn keep(&self, events: Vec<Event>) {
        let name = format!("{}.json", uuid::Uuid::now_v7().simple());
        let written = match serde_json::to_vec(&events) {
            Ok(bytes) => write_durably(&self.dir, &name, bytes).await,
            Err(e) => Err(std::io::Error::other(e)),
        };
        match written {
            Ok(()) => self.wake.notify_one(),
            Err(e) => {
                let events = serde_json::to_string(&events).unwrap_or_default();
                tracing::error!(error = %e, events, "cannot spool audit records the store did not take");
            }
        }
    }

    /// These exchanges were answered and wait for more calls before they are
    /// recorded: their notes keep the answers, should the process stop first.
    pub fn answered(&self, events: &[Event]) {
        for event in events {
            if let Some(id) = event_request_id(event)
                && let Err(e) = self.journal.note(id, event)
            {
                tracing::warn!(error = %e, "cannot note a provider's answer");
            }
        }
    }

    /// These exchanges are recorded (in the store or here): their notes go.
    pub fn settle(&self, events: &[Event]) {
        self.journal.done(events.iter().filter_map(event_request_id));
    }

    /// Appends every spooled group the store takes, oldest first; stops at the
    /// first it does not. Returns how many groups were stored.
    pub async fn drain(&self) -> usize {
        let mut stored = self.recover_notes().await;
        for path in self.pending().await {
            let events: Vec<Event> = match tokio::fs::read(&path).await.map(|b| serde_json::from_slice(&b)) {
                Ok(Ok(events)) => events,
                Ok(Err(e)) => {
                    tracing::error!(file = %path.display(), error = %e, "a spooled audit file is unreadable; it is kept for an operator");
                    let _ = tokio::fs::rename(&path, path.with_extension("unreadable")).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read a spooled audit file");
                    break;
                }
            };
            if let Err(e) = self.store.append_events(&events).await {
                tracing::debug!(error = %e, "the store still cannot take the spooled audit records");
                break;
            }
            if let Err(e) = tokio::fs::remove_file(&path).await {
                tracing::error!(file = %path.display(), error = %e, "stored a spooled audit file but cannot remove it");
                break;
            }
            stored += 1;
        }
        stored
    }

    /// Journals left by processes that are gone: each open request is recorded
    /// (with its answer if one was noted, else as interrupted) unless its
    /// ticket's trail already has it.
    async fn recover_notes(&self) -> usize {
        let mut recovered = 0;
        let mut left = self.files(journal::EXTENSION).await;
        for path in self.files(NOTE).await {
            if tokio::fs::metadata(&path).await.and_then(|m| m.modified()).is_ok_and(|t| t < self.started) {
                left.push(path);
            }
        }
        for path in left.into_iter().filter(|p| p != self.journal.path()) {
            let Some(journal) = tokio::task::spawn_blocking(move || Left::open(&path)).await.ok().flatten() else { continue };
            let mut all_recorded = true;
            for event in &journal.open {
                match self.record_left(event.clone()).await {
                    Ok(true) => recovered += 1,
                    Ok(false) => {}
                    Err(()) => {
                        all_recorded = false;
                        break;
                    }
                }
            }
            if !all_recorded {
                break;
            }
            journal.finish();
        }
        recovered
    }

    /// Records a request noted as sent and never recorded: as it was answered, or
    /// as interrupted if no answer was noted; `false` if its trail has it
    /// already, `Err` if the store cannot say.
    async fn record_left(&self, mut event: Event) -> Result<bool, ()> {
        let EventKind::Exchange(x) = &mut event.kind else { return Ok(false) };
        let id = request_id(x).unwrap_or_default().to_owned();
        let trail = self.store.events(&event.batch_id, &event.ticket_id).await.map_err(drop)?;
        if trail.iter().any(|e| matches!(&e.kind, EventKind::Exchange(r) if request_id(r) == Some(id.as_str()))) {
            return Ok(false);
        }
        if x.response.is_none() {
            let x = std::sync::Arc::make_mut(x);
            x.outcome = "interrupted".into();
            x.error = Some("the process stopped before the answer was recorded: the provider may have received it".into());
        }
        self.store.append_events(std::slice::from_ref(&event)).await.map_err(drop)?;
        Ok(true)
    }

    async fn pending(&self) -> Vec<PathBuf> {
        self.files("json").await
    }

    /// Files with this extension, oldest first (names of spooled groups are time-ordered).
    async fn files(&self, extension: &str) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        if let Ok(mut dir) = tokio::fs::read_dir(&self.dir).await {
            while let Ok(Some(entry)) = dir.next_entry().await {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == extension) {
                    paths.push(path);
                }
            }
        }
        paths.sort();
        paths
    }
}

async fn drain_forever(spool: Arc<AuditSpool>) {
    loop {
        let stored = spool.drain().await;
        if stored > 0 {
            tracing::info!("stored {stored} group(s) of spooled audit records");
        }
        let _ = tokio::time::timeout(RETRY_EVERY, spool.wake.notified()).await;
    }
}

impl RequestJournal for AuditSpool {
    /// Written without a flush: the note must outlive the process, not the machine.
    fn sending(&self, caller: &Caller<'_>, exchange: std::sync::Arc<Exchange>) {
        let (Ok(batch), Ok(ticket)) = (BatchId::parse(caller.batch_id), TicketId::parse(caller.ticket_id)) else { return };
        let Some(id) = request_id(&exchange).map(str::to_owned) else { return };
        let event = Event::new(&batch, &ticket, caller.stage, EventKind::Exchange(exchange), Utc::now());
        if let Err(e) = self.journal.note(&id, &event) {
            tracing::warn!(error = %e, "cannot note a provider request before sending it");
        }
    }
}

/// Written to a temporary name, flushed, then renamed: a reader never sees half a file.
async fn write_durably(dir: &Path, name: &str, bytes: Vec<u8>) -> std::io::Result<()> {
    let dir = dir.to_owned();
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let tmp = dir.join(format!("{name}.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))?;
        std::fs::File::open(&dir)?.sync_all()
    })
    .await
    .map_err(std::io::Error::other)?
}
