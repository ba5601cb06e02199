//! Audit records that happened while the store could not take them (busy,
//! throttled, down). Each group is written to local disk at once, then
//! appended to the store as soon as it answers again, oldest first; a
//! handler that is killed meanwhile finds them there when it starts again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::domain::Event;
use crate::store::Store;

/// How often the spool tries the store again while it holds records.
const RETRY_EVERY: Duration = Duration::from_secs(2);

pub struct AuditSpool {
    dir: PathBuf,
    store: Arc<dyn Store>,
    wake: Notify,
}

impl AuditSpool {
    /// A spool in `dir` (created if missing), draining into `store` in the background.
    pub fn start(dir: &Path, store: Arc<dyn Store>) -> std::io::Result<Arc<AuditSpool>> {
        std::fs::create_dir_all(dir)?;
        let spool = Arc::new(AuditSpool { dir: dir.to_owned(), store, wake: Notify::new() });
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

    /// Appends every spooled group the store takes, oldest first; stops at the
    /// first it does not. Returns how many groups were stored.
    pub async fn drain(&self) -> usize {
        let mut stored = 0;
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

    /// Spooled groups, oldest first (names are time-ordered).
    async fn pending(&self) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        if let Ok(mut dir) = tokio::fs::read_dir(&self.dir).await {
            while let Ok(Some(entry)) = dir.next_entry().await {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "json") {
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
