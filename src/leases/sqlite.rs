//! Leases on the embedded store: one SQLite file in the data folder, shared
//! by every process using that folder. Times are the database's own
//! (`julianday('now')`), so no instance's clock decides who holds a lease.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::{LeaseError, LeaseId, Leases, Member, Result, check_term};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS leases (
    resource TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    lease_id TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS members (
    grp TEXT NOT NULL,
    instance TEXT NOT NULL,
    wants INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (grp, instance)
);
CREATE TABLE IF NOT EXISTS pauses (
    resource TEXT PRIMARY KEY,
    until_ms INTEGER NOT NULL
);
";

/// Milliseconds since the epoch, by the database.
const NOW_MS: &str = "CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)";

pub struct SqliteLeases {
    conn: Arc<Mutex<Connection>>,
}

fn unavailable(e: impl std::fmt::Display) -> LeaseError {
    LeaseError::Unavailable(e.to_string())
}

fn millis(term: Duration) -> i64 {
    term.as_millis() as i64
}

impl SqliteLeases {
    pub fn open(path: &Path) -> Result<SqliteLeases> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(unavailable)?;
        // Short: an instance that cannot reach its leases in time stops spending them.
        conn.busy_timeout(Duration::from_secs(2)).map_err(unavailable)?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;").map_err(unavailable)?;
        conn.execute_batch(SCHEMA).map_err(unavailable)?;
        Ok(SqliteLeases { conn: Arc::new(Mutex::new(conn)) })
    }

    async fn run<R: Send + 'static>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static) -> Result<R> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&guard)
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }
}

#[async_trait]
impl Leases for SqliteLeases {
    async fn acquire(&self, resource: &str, instance: &str, term: Duration) -> Result<Option<LeaseId>> {
        check_term(term)?;
        let (resource, instance, id) = (resource.to_owned(), instance.to_owned(), uuid::Uuid::new_v4().to_string());
        let lease = LeaseId(id.clone());
        let taken = self
            .run(move |c| {
                c.prepare_cached(&format!(
                    "INSERT INTO leases (resource, instance, lease_id, expires_ms) VALUES (?1, ?2, ?3, {NOW_MS} + ?4)
                     ON CONFLICT (resource) DO UPDATE SET instance = excluded.instance, lease_id = excluded.lease_id,
                        expires_ms = excluded.expires_ms
                     WHERE leases.expires_ms <= {NOW_MS}"
                ))?
                .execute(params![resource, instance, id, millis(term)])
            })
            .await?;
        Ok((taken == 1).then_some(lease))
    }

    async fn renew(&self, resource: &str, lease: &LeaseId, term: Duration) -> Result<bool> {
        check_term(term)?;
        let (resource, id) = (resource.to_owned(), lease.0.clone());
        // As in Azure Storage, a lease that ran out may be renewed while no one else took it.
        let renewed = self
            .run(move |c| {
                c.prepare_cached(&format!("UPDATE leases SET expires_ms = {NOW_MS} + ?3 WHERE resource = ?1 AND lease_id = ?2"))?
                    .execute(params![resource, id, millis(term)])
            })
            .await?;
        Ok(renewed == 1)
    }

    async fn release(&self, resource: &str, lease: &LeaseId) -> Result<()> {
        let (resource, id) = (resource.to_owned(), lease.0.clone());
        self.run(move |c| c.prepare_cached("DELETE FROM leases WHERE resource = ?1 AND lease_id = ?2")?.execute(params![resource, id]))
            .await?;
        Ok(())
    }

    async fn holders(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let prefix = prefix.to_owned();
        self.run(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT resource, instance FROM leases
                 WHERE substr(resource, 1, length(?1)) = ?1 AND expires_ms > {NOW_MS} ORDER BY resource"
            ))?;
            let rows = stmt.query_map([prefix], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    async fn announce(&self, group: &str, instance: &str, wants: u32, term: Duration) -> Result<Vec<Member>> {
        check_term(term)?;
        let (group, instance) = (group.to_owned(), instance.to_owned());
        self.run(move |c| {
            c.prepare_cached(&format!(
                "INSERT INTO members (grp, instance, wants, expires_ms) VALUES (?1, ?2, ?3, {NOW_MS} + ?4)
                 ON CONFLICT (grp, instance) DO UPDATE SET wants = excluded.wants, expires_ms = excluded.expires_ms"
            ))?
            .execute(params![group, instance, wants, millis(term)])?;
            let mut stmt = c.prepare_cached(&format!(
                "SELECT instance, wants FROM members WHERE grp = ?1 AND expires_ms > {NOW_MS} ORDER BY instance"
            ))?;
            let rows = stmt.query_map([&group], |r| Ok(Member { instance: r.get(0)?, wants: r.get(1)? }))?;
            rows.collect()
        })
        .await
    }

    async fn leave(&self, group: &str, instance: &str) -> Result<()> {
        let (group, instance) = (group.to_owned(), instance.to_owned());
        self.run(move |c| c.prepare_cached("DELETE FROM members WHERE grp = ?1 AND instance = ?2")?.execute(params![group, instance]))
            .await?;
        Ok(())
    }

    async fn pause(&self, resource: &str, for_: Duration) -> Result<()> {
        let resource = resource.to_owned();
        self.run(move |c| {
            c.prepare_cached(&format!(
                "INSERT INTO pauses (resource, until_ms) VALUES (?1, {NOW_MS} + ?2)
                 ON CONFLICT (resource) DO UPDATE SET until_ms = max(until_ms, excluded.until_ms)"
            ))?
            .execute(params![resource, millis(for_)])
        })
        .await?;
        Ok(())
    }

    async fn paused_until(&self, resource: &str) -> Result<Option<DateTime<Utc>>> {
        let resource = resource.to_owned();
        let until: Option<i64> = self
            .run(move |c| {
                c.prepare_cached(&format!("SELECT until_ms FROM pauses WHERE resource = ?1 AND until_ms > {NOW_MS}"))?
                    .query_row([resource], |r| r.get(0))
                    .optional()
            })
            .await?;
        Ok(until.and_then(DateTime::from_timestamp_millis))
    }
}
