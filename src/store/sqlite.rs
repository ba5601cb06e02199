//! The embedded store: SQLite on local disk, in WAL mode.
//!
//! Ticket rows keep the whole ticket as a JSON document plus the columns
//! queries need, and a version number that plays the ETag. One writer
//! connection and one reader connection: readers never wait for writers.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::schema::{self, decode_ticket, encode_ticket};
use super::{BatchSummary, BudgetChange, Created, PaymentClaim, Result, Store, StoreError, TicketPage, TicketUpdate, Versioned};
use crate::domain::reconciliation::ReconciliationRun;
use crate::domain::{AuthorityCode, Batch, BatchId, Budget, ClientId, Currency, Event, Status, Ticket, TicketId};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    currency TEXT NOT NULL,
    budget INTEGER NOT NULL,
    committed INTEGER NOT NULL CHECK (committed >= 0 AND committed <= budget),
    tickets INTEGER NOT NULL,
    idempotency_key TEXT,
    request_digest TEXT NOT NULL,
    enqueued INTEGER NOT NULL,
    completed_at TEXT,
    created_at TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS batches_idempotency ON batches(client_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS batches_client ON batches(client_id, batch_id);
CREATE TABLE IF NOT EXISTS tickets (
    batch_id TEXT NOT NULL,
    ticket_id TEXT NOT NULL,
    status TEXT NOT NULL,
    notified INTEGER NOT NULL,
    reference TEXT,
    paid INTEGER NOT NULL,
    reserved INTEGER NOT NULL,
    version INTEGER NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (batch_id, ticket_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tickets_status ON tickets(batch_id, status, ticket_id);
CREATE INDEX IF NOT EXISTS tickets_open ON tickets(batch_id) WHERE notified = 0;
CREATE INDEX IF NOT EXISTS tickets_reference ON tickets(reference) WHERE reference IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL,
    ticket_id TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ticket ON events(batch_id, ticket_id, seq);
CREATE TABLE IF NOT EXISTS reconciliations (
    batch_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    at_us INTEGER NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (batch_id, run_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reconciliations_newest ON reconciliations(batch_id, at_us);
CREATE TABLE IF NOT EXISTS payment_claims (
    authority TEXT NOT NULL,
    ticket_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    claimed_at TEXT NOT NULL,
    etag TEXT NOT NULL,
    PRIMARY KEY (authority, ticket_id)
) WITHOUT ROWID;
";

/// The version of this file's tables, in `PRAGMA user_version`. 0 is a file
/// made before they had one, with the same tables as version 1.
const FILE_SCHEMA: i64 = 1;

/// Brings a store file made by an earlier release up to this one's tables; a
/// file made by a newer release is refused, never guessed at.
fn upgrade(conn: &Connection, path: &Path) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(unavailable)?;
    if version > FILE_SCHEMA {
        return Err(invalid(format!(
            "{} was written by a newer release (tables version {version}; this one knows up to {FILE_SCHEMA})",
            path.display()
        )));
    }
    conn.execute_batch(SCHEMA).map_err(unavailable)?;
    if version < FILE_SCHEMA {
        conn.pragma_update(None, "user_version", FILE_SCHEMA).map_err(unavailable)?;
    }
    Ok(())
}

/// Every write (and every read that must see the last write) runs on one
/// writer thread. What callers hand it while it is busy goes in the next
/// transaction together (group commit): concurrent stages, the messages of a
/// batch invocation among them, share one commit instead of one each. Each
/// operation is one statement or holds its own savepoint, so one that fails
/// undoes only itself; its answer is given once the whole group is committed.
#[derive(Clone)]
pub struct SqliteStore {
    writer: std::sync::mpsc::Sender<Job>,
    reader: Arc<Mutex<Connection>>,
}

/// An operation for the writer thread; what it returns delivers its answer
/// once the group it ran in is committed (`true`) or lost (`false`).
type Job = Box<dyn FnOnce(&mut Connection) -> Box<dyn FnOnce(bool) + Send> + Send>;

/// How long a write waits for another process's lock on the store.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The most operations one group transaction takes.
const GROUP_MAX: usize = 512;

/// Runs `sql` (BEGIN, COMMIT, ROLLBACK) as a cached statement.
fn run_cached(conn: &Connection, sql: &str) -> bool {
    conn.prepare_cached(sql).and_then(|mut s| s.execute([])).is_ok()
}

fn write_groups(mut conn: Connection, jobs: std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < GROUP_MAX {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        // Should BEGIN fail, each operation is a transaction of its own. It failed
        // because another process held the write lock for the whole busy timeout:
        // the group's writes fail at once rather than wait that long again each,
        // one after the other, and its reads are answered.
        let grouped = run_cached(&conn, "BEGIN IMMEDIATE");
        if !grouped {
            let _ = conn.busy_timeout(std::time::Duration::ZERO);
        }
        let answers: Vec<_> = group
            .into_iter()
            .filter_map(|job| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut conn))).ok())
            .collect();
        let committed = !grouped || run_cached(&conn, "COMMIT");
        if !committed {
            run_cached(&conn, "ROLLBACK");
        }
        if !grouped {
            let _ = conn.busy_timeout(BUSY_TIMEOUT);
        }
        for answer in answers {
            answer(committed);
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn invalid(e: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid(e.to_string())
}

fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).map_err(unavailable)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(unavailable)?;
    // WAL with NORMAL sync survives a killed process (only a power cut may lose the last commits).
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;")
        .map_err(unavailable)?;
    Ok(conn)
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
        }
        let writer = open_connection(path)?;
        upgrade(&writer, path)?;
        let reader = open_connection(path)?;
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_groups(writer, queue))
            .map_err(unavailable)?;
        Ok(SqliteStore { writer: jobs, reader: Arc::new(Mutex::new(reader)) })
    }

    /// Runs `f` on the writer thread, in the next group transaction. `f` is
    /// one statement, or makes a savepoint of its own for more.
    async fn write<R: Send + 'static>(&self, f: impl FnOnce(&mut Connection) -> Result<R> + Send + 'static) -> Result<R> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn: &mut Connection| {
            let result = f(conn);
            Box::new(move |committed: bool| {
                let _ = answer.send(if committed { result } else { Err(unavailable("the store could not commit the write")) });
            })
        });
        self.writer.send(job).map_err(|_| unavailable("the store's writer has stopped"))?;
        answered.await.map_err(|_| unavailable("the store's writer dropped the write"))?
    }

    async fn read<R: Send + 'static>(&self, f: impl FnOnce(&mut Connection) -> Result<R> + Send + 'static) -> Result<R> {
        run(self.reader.clone(), f).await
    }
}

async fn run<R: Send + 'static>(
    conn: Arc<Mutex<Connection>>,
    f: impl FnOnce(&mut Connection) -> Result<R> + Send + 'static,
) -> Result<R> {
    tokio::task::spawn_blocking(move || {
        let mut guard = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    })
    .await
    .map_err(unavailable)?
}

/// A value read back that does not parse: the row is invalid data, never filled in.
fn unreadable(column: &str, error: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, format!("column {column}: {error}").into())
}

/// A row that cannot be read is invalid data; anything else the database says is its being unavailable.
fn read_error(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::FromSqlConversionFailure(..) | rusqlite::Error::InvalidColumnType(..) => invalid(e),
        e => unavailable(e),
    }
}

fn batch_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Batch, String)> {
    let currency: String = row.get("currency")?;
    let batch_id: String = row.get("batch_id")?;
    let client_id: String = row.get("client_id")?;
    let completed: Option<String> = row.get("completed_at")?;
    let created: String = row.get("created_at")?;
    let parse_time = |column: &str, s: &str| s.parse::<DateTime<Utc>>().map_err(|e| unreadable(column, e));
    let batch = Batch {
        batch_id: BatchId::parse(&batch_id).map_err(|e| unreadable("batch_id", e))?,
        client_id: ClientId::parse(&client_id).map_err(|e| unreadable("client_id", e))?,
        currency: Currency::parse(&currency).map_err(|e| unreadable("currency", e))?,
        budget: row.get("budget")?,
        committed: row.get("committed")?,
        tickets: row.get("tickets")?,
        idempotency_key: row.get("idempotency_key")?,
        request_digest: row.get("request_digest")?,
        enqueued: row.get("enqueued")?,
        completed_at: completed.as_deref().map(|c| parse_time("completed_at", c)).transpose()?,
        created_at: parse_time("created_at", &created)?,
    };
    Ok((batch, batch_id))
}

const BATCH_COLUMNS: &str = "batch_id, client_id, currency, budget, committed, tickets, idempotency_key, request_digest, enqueued, completed_at, created_at";

fn insert_events(tx: &Connection, events: &[Event]) -> Result<()> {
    let mut stmt = tx
        .prepare_cached("INSERT INTO events (batch_id, ticket_id, doc) VALUES (?1, ?2, ?3)")
        .map_err(unavailable)?;
    for e in events {
        let doc = schema::encode_event(e)?;
        stmt.execute(params![e.batch_id.as_str(), e.ticket_id.as_str(), doc]).map_err(unavailable)?;
    }
    Ok(())
}

/// A fresh version for a claim: never one it had before, so a claim released
/// and taken again is not mistaken for the one read earlier.
fn claim_etag() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn claim_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, String, String, String)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
}

fn decode_claim((authority, ticket_id, batch_id, claimed_at, etag): (String, String, String, String, String)) -> Result<Versioned<PaymentClaim>> {
    let what = format!("payment claim {authority}/{ticket_id}");
    let claim = PaymentClaim {
        authority: AuthorityCode::parse(&authority).map_err(|e| invalid(format!("{what}: {e}")))?,
        ticket_id: TicketId::parse(&ticket_id).map_err(|e| invalid(format!("{what}: {e}")))?,
        batch_id: BatchId::parse(&batch_id).map_err(|e| invalid(format!("{what}: {e}")))?,
        claimed_at: claimed_at.parse().map_err(|e| invalid(format!("{what}: claimed_at `{claimed_at}`: {e}")))?,
    };
    Ok(Versioned { value: claim, etag })
}

/// A conditional ticket change with its budget change and events, in a savepoint of its own.
fn apply(conn: &mut Connection, update: TicketUpdate) -> Result<Versioned<Ticket>> {
    let TicketUpdate { ticket, etag, budget, events } = update;
    let version: i64 = etag.parse().map_err(|_| StoreError::Conflict(format!("ticket {} (etag {etag})", ticket.ticket_id)))?;
    let tx = conn.savepoint().map_err(unavailable)?;
    // What the ticket holds of the budget as it stands, before this change.
    let held = ticket.money(match budget {
        Some(BudgetChange::Release(_)) => tx
            .prepare_cached("SELECT reserved FROM tickets WHERE batch_id = ?1 AND ticket_id = ?2 AND version = ?3")
            .map_err(unavailable)?
            .query_row(params![ticket.batch_id.as_str(), ticket.ticket_id.as_str(), version], |r| r.get(0))
            .optional()
            .map_err(unavailable)?
            .unwrap_or(0),
        _ => 0,
    });
    let doc = encode_ticket(&ticket)?;
    let changed = tx
        .prepare_cached(
            "UPDATE tickets SET status = ?3, notified = ?4, paid = ?5, reserved = ?6, doc = ?7, version = version + 1
             WHERE batch_id = ?1 AND ticket_id = ?2 AND version = ?8",
        )
        .map_err(unavailable)?
        .execute(params![
            ticket.batch_id.as_str(),
            ticket.ticket_id.as_str(),
            ticket.status().as_str(),
            ticket.notified,
            ticket.paid().minor,
            ticket.reserved().minor,
            doc,
            version
        ])
        .map_err(unavailable)?;
    if changed == 0 {
        return Err(StoreError::Conflict(format!("ticket {}/{}", ticket.batch_id, ticket.ticket_id)));
    }
    if let Some(change) = budget {
        let batch_id = ticket.batch_id.as_str();
        let (total, committed): (i64, i64) = tx
            .prepare_cached("SELECT budget, committed FROM batches WHERE batch_id = ?1")
            .map_err(unavailable)?
            .query_row(params![batch_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(unavailable)?;
        let now = Budget { total: ticket.money(total), committed: ticket.money(committed) };
        let next = match change {
            BudgetChange::Reserve(amount) => now.reserve(amount)?,
            BudgetChange::Release(amount) => now.release(held, amount)?,
        };
        tx.prepare_cached("UPDATE batches SET committed = ?2 WHERE batch_id = ?1")
            .map_err(unavailable)?
            .execute(params![batch_id, next.committed.minor])
            .map_err(unavailable)?;
    }
    insert_events(&tx, &events)?;
    tx.commit().map_err(unavailable)?;
    Ok(Versioned { value: ticket, etag: (version + 1).to_string() })
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_batch(&self, batch: &Batch, tickets: &[Ticket], events: &[Event]) -> Result<Created> {
        let batch = batch.clone();
        let tickets = tickets.to_vec();
        let events = events.to_vec();
        self.write(move |conn| {
            let tx = conn.savepoint().map_err(unavailable)?;
            if let Some(key) = &batch.idempotency_key {
                let existing = tx
                    .query_row(
                        &format!("SELECT {BATCH_COLUMNS} FROM batches WHERE client_id = ?1 AND idempotency_key = ?2"),
                        params![batch.client_id.as_str(), key],
                        batch_from_row,
                    )
                    .optional()
                    .map_err(read_error)?;
                if let Some((existing, _)) = existing {
                    return Ok(Created::Existing(existing));
                }
            }
            tx.execute(
                &format!("INSERT INTO batches ({BATCH_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
                params![
                    batch.batch_id.as_str(),
                    batch.client_id.as_str(),
                    batch.currency.code(),
                    batch.budget,
                    batch.committed,
                    batch.tickets,
                    batch.idempotency_key,
                    batch.request_digest,
                    batch.enqueued,
                    batch.completed_at.map(|t| t.to_rfc3339()),
                    batch.created_at.to_rfc3339(),
                ],
            )
            .map_err(|e| if is_unique_violation(&e) { StoreError::Conflict(format!("batch {}", batch.batch_id)) } else { unavailable(e) })?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO tickets (batch_id, ticket_id, status, notified, reference, paid, reserved, version, doc)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, ?8)",
                    )
                    .map_err(unavailable)?;
                for t in &tickets {
                    let doc = encode_ticket(t)?;
                    stmt.execute(params![
                        t.batch_id.as_str(),
                        t.ticket_id.as_str(),
                        t.status().as_str(),
                        t.notified,
                        t.reference.as_ref().map(|r| r.as_str()),
                        t.paid().minor,
                        t.reserved().minor,
                        doc
                    ])
                    .map_err(|e| if is_unique_violation(&e) { StoreError::Conflict(format!("ticket {}", t.ticket_id)) } else { unavailable(e) })?;
                }
            }
            insert_events(&tx, &events)?;
            tx.commit().map_err(unavailable)?;
            Ok(Created::New)
        })
        .await
    }

    async fn batch(&self, batch_id: &BatchId) -> Result<Option<Batch>> {
        let id = batch_id.to_string();
        self.read(move |conn| {
            conn.query_row(&format!("SELECT {BATCH_COLUMNS} FROM batches WHERE batch_id = ?1"), [id], batch_from_row)
                .optional()
                .map(|b| b.map(|(b, _)| b))
                .map_err(read_error)
        })
        .await
    }

    async fn mark_enqueued(&self, batch_id: &BatchId) -> Result<()> {
        let id = batch_id.to_string();
        self.write(move |conn| {
            let n = conn.execute("UPDATE batches SET enqueued = 1 WHERE batch_id = ?1", [&id]).map_err(unavailable)?;
            if n == 0 { Err(StoreError::NotFound(format!("batch {id}"))) } else { Ok(()) }
        })
        .await
    }

    async fn mark_completed(&self, batch_id: &BatchId, at: DateTime<Utc>) -> Result<bool> {
        let id = batch_id.to_string();
        self.write(move |conn| {
            let n = conn
                .execute(
                    "UPDATE batches SET completed_at = ?2 WHERE batch_id = ?1 AND completed_at IS NULL",
                    params![id, at.to_rfc3339()],
                )
                .map_err(unavailable)?;
            Ok(n == 1)
        })
        .await
    }

    async fn reopen(&self, batch_id: &BatchId) -> Result<()> {
        let id = batch_id.to_string();
        self.write(move |conn| {
            conn.execute("UPDATE batches SET completed_at = NULL WHERE batch_id = ?1", params![id]).map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn batches(&self, client: Option<&ClientId>, limit: usize) -> Result<Vec<Batch>> {
        let client = client.map(ClientId::to_string);
        self.read(move |conn| {
            let limit = limit as i64;
            let mut out = Vec::new();
            let mut push = |row: &rusqlite::Row<'_>| -> rusqlite::Result<()> {
                out.push(batch_from_row(row)?.0);
                Ok(())
            };
            match client {
                Some(c) => {
                    let mut stmt = conn
                        .prepare_cached(&format!("SELECT {BATCH_COLUMNS} FROM batches WHERE client_id = ?1 ORDER BY created_at DESC, batch_id DESC LIMIT ?2"))
                        .map_err(unavailable)?;
                    let mut rows = stmt.query(params![c, limit]).map_err(unavailable)?;
                    while let Some(row) = rows.next().map_err(unavailable)? {
                        push(row).map_err(read_error)?;
                    }
                }
                None => {
                    let mut stmt = conn
                        .prepare_cached(&format!("SELECT {BATCH_COLUMNS} FROM batches ORDER BY created_at DESC, batch_id DESC LIMIT ?1"))
                        .map_err(unavailable)?;
                    let mut rows = stmt.query(params![limit]).map_err(unavailable)?;
                    while let Some(row) = rows.next().map_err(unavailable)? {
                        push(row).map_err(read_error)?;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn ticket(&self, batch_id: &BatchId, ticket_id: &TicketId) -> Result<Option<Versioned<Ticket>>> {
        let (b, t) = (batch_id.to_string(), ticket_id.to_string());
        // Read through the writer so a stage always sees its own last write.
        self.write(move |conn| {
            let row: Option<(String, i64)> = conn
                .prepare_cached("SELECT doc, version FROM tickets WHERE batch_id = ?1 AND ticket_id = ?2")
                .map_err(unavailable)?
                .query_row(params![b, t], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(unavailable)?;
            row.map(|(doc, version)| Ok(Versioned { value: decode_ticket(&doc)?, etag: version.to_string() }))
                .transpose()
        })
        .await
    }

    async fn update_ticket(&self, update: TicketUpdate) -> Result<Versioned<Ticket>> {
        self.write(move |conn| apply(conn, update)).await
    }

    /// Applied one after the other, in one transaction.
    async fn update_tickets(&self, updates: Vec<TicketUpdate>) -> Vec<Result<Versioned<Ticket>>> {
        let n = updates.len();
        match self.write(move |conn| Ok(updates.into_iter().map(|u| apply(conn, u)).collect::<Vec<_>>())).await {
            Ok(results) => results,
            Err(e) => vec![Err(e); n],
        }
    }

    async fn append_events(&self, events: &[Event]) -> Result<()> {
        let events = events.to_vec();
        self.write(move |conn| {
            let tx = conn.savepoint().map_err(unavailable)?;
            insert_events(&tx, &events)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn events(&self, batch_id: &BatchId, ticket_id: &TicketId) -> Result<Vec<Event>> {
        let (b, t) = (batch_id.to_string(), ticket_id.to_string());
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT doc FROM events WHERE batch_id = ?1 AND ticket_id = ?2 ORDER BY seq")
                .map_err(unavailable)?;
            let docs = stmt
                .query_map(params![b, t], |r| r.get::<_, String>(0))
                .map_err(unavailable)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(unavailable)?;
            let currency = || {
                let code: String = conn.query_row("SELECT currency FROM batches WHERE batch_id = ?1", [&b], |r| r.get(0)).map_err(read_error)?;
                Currency::parse(&code).map_err(StoreError::Invalid)
            };
            docs.iter().map(|d| schema::decode_events(d.as_bytes(), schema::event_shape(d)?, currency)).collect()
        })
        .await
    }

    async fn tickets(&self, batch_id: &BatchId, status: Option<Status>, limit: usize, cursor: Option<&str>) -> Result<TicketPage> {
        let b = batch_id.to_string();
        let cursor = cursor.unwrap_or("").to_owned();
        self.read(move |conn| {
            let fetch = limit as i64 + 1;
            let docs: Vec<String> = match status {
                Some(s) => conn
                    .prepare_cached("SELECT doc FROM tickets WHERE batch_id = ?1 AND status = ?2 AND ticket_id > ?3 ORDER BY ticket_id LIMIT ?4")
                    .map_err(unavailable)?
                    .query_map(params![b, s.as_str(), cursor, fetch], |r| r.get(0))
                    .map_err(unavailable)?
                    .collect::<rusqlite::Result<_>>(),
                None => conn
                    .prepare_cached("SELECT doc FROM tickets WHERE batch_id = ?1 AND ticket_id > ?2 ORDER BY ticket_id LIMIT ?3")
                    .map_err(unavailable)?
                    .query_map(params![b, cursor, fetch], |r| r.get(0))
                    .map_err(unavailable)?
                    .collect::<rusqlite::Result<_>>(),
            }
            .map_err(unavailable)?;
            let tickets = docs.iter().map(|d| decode_ticket(d)).collect::<Result<Vec<_>>>()?;
            Ok(TicketPage::from_fetched(tickets, limit))
        })
        .await
    }

    async fn summary(&self, batch_id: &BatchId, overdue_before: DateTime<Utc>) -> Result<BatchSummary> {
        let b = batch_id.to_string();
        let before = overdue_before.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        self.read(move |conn| {
            // The due time is read from the document only for tickets not yet told.
            let mut stmt = conn
                .prepare_cached(
                    "SELECT status, COUNT(*), SUM(notified = 0), SUM(paid), SUM(reserved),
                            SUM(CASE WHEN notified = 0 THEN MAX(json_extract(doc, '$.updated_at'), COALESCE(json_extract(doc, '$.retry_at'), '')) < ?2 ELSE 0 END)
                     FROM tickets WHERE batch_id = ?1 GROUP BY status",
                )
                .map_err(unavailable)?;
            let mut rows = stmt.query(params![b, before]).map_err(unavailable)?;
            let mut summary = BatchSummary::default();
            while let Some(row) = rows.next().map_err(unavailable)? {
                let status: Status = row.get::<_, String>(0).map_err(unavailable)?.parse().map_err(invalid)?;
                let count: i64 = row.get(1).map_err(unavailable)?;
                let unnotified: i64 = row.get(2).map_err(unavailable)?;
                summary.counts.insert(status, count as u64);
                if status.is_end() {
                    summary.awaiting_notification += unnotified as u64;
                }
                summary.paid += row.get::<_, i64>(3).map_err(unavailable)?;
                summary.reserved += row.get::<_, i64>(4).map_err(unavailable)?;
                summary.overdue += row.get::<_, i64>(5).map_err(unavailable)? as u64;
            }
            Ok(summary)
        })
        .await
    }

    async fn has_open_tickets(&self, batch_id: &BatchId) -> Result<bool> {
        let b = batch_id.to_string();
        self.write(move |conn| {
            conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM tickets WHERE batch_id = ?1 AND notified = 0)")
                .map_err(unavailable)?
                .query_row([b], |r| r.get::<_, bool>(0))
                .map_err(unavailable)
        })
        .await
    }

    async fn overdue_tickets(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<Versioned<Ticket>>> {
        self.read(move |conn| {
            // Due is the later of the ticket's last change and its scheduled retry (RFC 3339 in UTC sorts as text, to the second).
            let mut stmt = conn
                .prepare_cached(
                    "SELECT doc, version FROM (
                         SELECT doc, version,
                                MAX(json_extract(doc, '$.updated_at'), COALESCE(json_extract(doc, '$.retry_at'), '')) AS due
                         FROM tickets WHERE notified = 0)
                     WHERE due < ?1 ORDER BY due LIMIT ?2",
                )
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(params![before.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true), limit as i64], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })
                .map_err(unavailable)?;
            let mut out = Vec::new();
            for row in rows {
                let (doc, version) = row.map_err(unavailable)?;
                let value: Ticket = serde_json::from_str(&doc).map_err(invalid)?;
                out.push(Versioned { value, etag: version.to_string() });
            }
            Ok(out)
        })
        .await
    }

    async fn incomplete_batches(&self, limit: usize) -> Result<Vec<Batch>> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!("SELECT {BATCH_COLUMNS} FROM batches WHERE completed_at IS NULL ORDER BY created_at LIMIT ?1"))
                .map_err(unavailable)?;
            let mut rows = stmt.query(params![limit as i64]).map_err(unavailable)?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(unavailable)? {
                out.push(batch_from_row(row).map_err(read_error)?.0);
            }
            Ok(out)
        })
        .await
    }

    async fn find_by_reference(&self, reference: &str, client: Option<&ClientId>, limit: usize) -> Result<Vec<Ticket>> {
        let r = reference.to_owned();
        let client = client.map(ClientId::to_string);
        self.read(move |conn| {
            let docs: Vec<String> = conn
                .prepare_cached(
                    "SELECT doc FROM tickets WHERE reference = ?1 AND (?2 IS NULL OR json_extract(doc, '$.client_id') = ?2) LIMIT ?3",
                )
                .map_err(unavailable)?
                .query_map(params![r, client, limit as i64], |row| row.get(0))
                .map_err(unavailable)?
                .collect::<rusqlite::Result<_>>()
                .map_err(unavailable)?;
            docs.iter().map(|d| decode_ticket(d)).collect()
        })
        .await
    }

    async fn record_reconciliation(&self, run: &ReconciliationRun) -> Result<()> {
        let doc = serde_json::to_string(run).map_err(invalid)?;
        let (batch_id, run_id, at_us) = (run.batch_id.to_string(), run.run_id.clone(), run.at.timestamp_micros());
        self.write(move |conn| {
            conn.execute("INSERT INTO reconciliations (batch_id, run_id, at_us, doc) VALUES (?1, ?2, ?3, ?4)", params![batch_id, run_id, at_us, doc])
                .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn reconciliations(&self, batch_id: &BatchId, limit: usize) -> Result<Vec<ReconciliationRun>> {
        let batch_id = batch_id.to_string();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT doc FROM reconciliations WHERE batch_id = ?1 ORDER BY at_us DESC, run_id DESC LIMIT ?2")
                .map_err(unavailable)?;
            let docs = stmt
                .query_map(params![batch_id, limit as i64], |row| row.get::<_, String>(0))
                .map_err(read_error)?
                .collect::<rusqlite::Result<Vec<String>>>()
                .map_err(read_error)?;
            docs.iter().map(|d| serde_json::from_str(d).map_err(invalid)).collect()
        })
        .await
    }

    async fn payment_claim(&self, authority: &AuthorityCode, ticket_id: &TicketId) -> Result<Option<Versioned<PaymentClaim>>> {
        let (a, t) = (authority.to_string(), ticket_id.to_string());
        self.write(move |conn| {
            conn.prepare_cached(
                "SELECT authority, ticket_id, batch_id, claimed_at, etag FROM payment_claims WHERE authority = ?1 AND ticket_id = ?2",
            )
            .map_err(unavailable)?
            .query_row(params![a, t], claim_from_row)
            .optional()
            .map_err(unavailable)?
            .map(decode_claim)
            .transpose()
        })
        .await
    }

    async fn take_payment_claim(&self, claim: &PaymentClaim, over: Option<&str>) -> Result<Versioned<PaymentClaim>> {
        let claim = claim.clone();
        let over = over.map(str::to_owned);
        self.write(move |conn| {
            let etag = claim_etag();
            let (a, t, b, at) = (claim.authority.as_str(), claim.ticket_id.as_str(), claim.batch_id.as_str(), claim.claimed_at.to_rfc3339());
            let changed = match &over {
                None => conn.execute(
                    "INSERT INTO payment_claims (authority, ticket_id, batch_id, claimed_at, etag) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT DO NOTHING",
                    params![a, t, b, at, etag],
                ),
                Some(read) => conn.execute(
                    "UPDATE payment_claims SET batch_id = ?3, claimed_at = ?4, etag = ?5
                     WHERE authority = ?1 AND ticket_id = ?2 AND etag = ?6",
                    params![a, t, b, at, etag, read],
                ),
            }
            .map_err(unavailable)?;
            if changed == 0 {
                return Err(StoreError::Conflict(format!("payment claim {}/{}", claim.authority, claim.ticket_id)));
            }
            Ok(Versioned { value: claim, etag })
        })
        .await
    }

    async fn release_payment_claim(&self, claim: &Versioned<PaymentClaim>) -> Result<bool> {
        let (a, t, etag) = (claim.value.authority.to_string(), claim.value.ticket_id.to_string(), claim.etag.clone());
        self.write(move |conn| {
            let n = conn
                .execute("DELETE FROM payment_claims WHERE authority = ?1 AND ticket_id = ?2 AND etag = ?3", params![a, t, etag])
                .map_err(unavailable)?;
            Ok(n == 1)
        })
        .await
    }
}
