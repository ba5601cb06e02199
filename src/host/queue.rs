//! The durable queues: one SQLite file holding every queue's messages, their
//! locks, the dead-letter sub-queues and the duplicate-detection history, with
//! Service Bus semantics. All times are milliseconds since the Unix epoch and
//! are passed in, so the semantics can be tested without waiting.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::{Map, Value};

/// A message as sent (before the broker has given it a sequence number).
#[derive(Debug, Clone, Default)]
pub struct NewMessage {
    pub message_id: Option<String>,
    pub session_id: Option<String>,
    pub correlation_id: Option<String>,
    pub label: Option<String>,
    pub content_type: Option<String>,
    pub reply_to: Option<String>,
    pub to: Option<String>,
    pub reply_to_session_id: Option<String>,
    pub partition_key: Option<String>,
    pub time_to_live: Option<Duration>,
    /// ScheduledEnqueueTimeUtc, ms since epoch.
    pub scheduled_at: Option<i64>,
    /// Application (custom) properties.
    pub properties: Map<String, Value>,
    pub body: Vec<u8>,
}

/// A message delivered under a peek-lock.
#[derive(Debug, Clone)]
pub struct Message {
    pub sequence_number: i64,
    pub queue: String,
    pub message_id: String,
    pub session_id: Option<String>,
    pub correlation_id: Option<String>,
    pub label: Option<String>,
    pub content_type: Option<String>,
    pub reply_to: Option<String>,
    pub to: Option<String>,
    pub reply_to_session_id: Option<String>,
    pub partition_key: Option<String>,
    pub properties: Map<String, Value>,
    pub body: Vec<u8>,
    pub enqueued_at: i64,
    pub expires_at: Option<i64>,
    /// Deliveries so far, this one included (1 on the first delivery).
    pub delivery_count: u32,
    pub lock_token: String,
    pub locked_until: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendOutcome {
    pub accepted: usize,
    /// Dropped by duplicate detection (still answered 201, as Service Bus does).
    pub duplicates: usize,
}

#[derive(Debug, Default)]
pub struct Received {
    pub messages: Vec<Message>,
    /// Visible messages left for the queue's other receivers.
    pub left: bool,
    /// Expired messages moved to the dead-letter queue while looking.
    pub expired: usize,
    /// When the next scheduled message becomes visible, if any.
    pub next_due: Option<i64>,
}

/// How many messages one receive may lock.
#[derive(Debug, Clone, Copy)]
pub struct Take {
    pub max: usize,
    /// Receivers waiting on the queue now, this one included: each takes its part.
    pub among: usize,
}

impl Take {
    /// Up to `max`, for a receiver alone on its queue.
    pub fn up_to(max: usize) -> Take {
        Take { max, among: 1 }
    }
}

/// How a delivery ended.
#[derive(Debug, Clone)]
pub enum Settlement {
    /// Success: the message is deleted.
    Complete,
    /// Failure: visible again at once, or dead-lettered once `max_delivery_count` deliveries failed.
    Abandon { max_delivery_count: u32, reason: String },
    /// Not delivered after all (the handler was not there): unlock without counting the delivery.
    Release,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Completed,
    Abandoned,
    DeadLettered,
    Released,
    /// The lock was no longer held (already settled or released).
    LockLost,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct QueueCounts {
    pub active: u64,
    pub scheduled: u64,
    pub locked: u64,
    pub dead_lettered: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub sequence_number: i64,
    pub message_id: String,
    pub session_id: Option<String>,
    pub delivery_count: u32,
    pub reason: String,
    pub description: Option<String>,
    pub enqueued_time: String,
    pub dead_lettered_time: String,
    pub properties: Map<String, Value>,
    pub body: String,
}

/// The queue store. Cheap to clone; one connection behind a mutex, so every
/// method is a short synchronous section (call from `spawn_blocking`).
#[derive(Clone)]
pub struct QueueStore {
    conn: Arc<Mutex<Connection>>,
}

const COLUMNS: &str = "seq, queue, message_id, session_id, correlation_id, label, content_type, reply_to, to_, \
     reply_to_session_id, partition_key, props, body, enqueued_at, expires_at, delivery_count, lock_token, locked_until";

const AVAILABLE: &str = "dead_letter = 0 AND lock_token IS NULL";

impl QueueStore {
    pub fn open(path: &Path) -> Result<QueueStore> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let conn = Connection::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS messages (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                queue TEXT NOT NULL,
                message_id TEXT NOT NULL,
                session_id TEXT,
                correlation_id TEXT,
                label TEXT,
                content_type TEXT,
                reply_to TEXT,
                to_ TEXT,
                reply_to_session_id TEXT,
                partition_key TEXT,
                props TEXT NOT NULL DEFAULT '{{}}',
                body BLOB NOT NULL,
                enqueued_at INTEGER NOT NULL,
                visible_at INTEGER NOT NULL,
                expires_at INTEGER,
                delivery_count INTEGER NOT NULL DEFAULT 0,
                lock_token TEXT,
                locked_until INTEGER,
                last_error TEXT,
                dead_letter INTEGER NOT NULL DEFAULT 0,
                dl_reason TEXT,
                dl_description TEXT,
                dl_at INTEGER
            );
            CREATE INDEX IF NOT EXISTS messages_ready ON messages(queue, visible_at, seq) WHERE {AVAILABLE};
            CREATE INDEX IF NOT EXISTS messages_ready_session ON messages(queue, session_id, visible_at, seq) WHERE {AVAILABLE};
            CREATE INDEX IF NOT EXISTS messages_locked ON messages(queue, session_id) WHERE lock_token IS NOT NULL;
            CREATE TABLE IF NOT EXISTS dedup (
                queue TEXT NOT NULL,
                message_id TEXT NOT NULL,
                seen_at INTEGER NOT NULL,
                PRIMARY KEY (queue, message_id)
            ) WITHOUT ROWID;"
        ))?;
        Ok(QueueStore { conn: Arc::new(Mutex::new(conn)) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts messages for one queue in one transaction (durable when this returns).
    /// A MessageId already seen on the queue within `dedup_window` is dropped.
    pub fn send(&self, queue: &str, dedup_window: Duration, msgs: Vec<NewMessage>, now: i64) -> Result<SendOutcome> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut out = SendOutcome::default();
        {
            let mut seen = tx.prepare_cached("SELECT seen_at FROM dedup WHERE queue = ?1 AND message_id = ?2")?;
            let mut remember = tx.prepare_cached("INSERT OR REPLACE INTO dedup (queue, message_id, seen_at) VALUES (?1, ?2, ?3)")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (queue, message_id, session_id, correlation_id, label, content_type, reply_to, to_,
                    reply_to_session_id, partition_key, props, body, enqueued_at, visible_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?;
            let window = dedup_window.as_millis() as i64;
            for m in msgs {
                let id = m.message_id.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
                let last: Option<i64> = seen.query_row(params![queue, id], |r| r.get(0)).optional()?;
                if matches!(last, Some(t) if now - t < window) {
                    out.duplicates += 1;
                    continue;
                }
                remember.execute(params![queue, id, now])?;
                let visible_at = m.scheduled_at.unwrap_or(now).max(now);
                let expires_at = m.time_to_live.map(|ttl| visible_at.saturating_add(ttl.as_millis() as i64));
                insert.execute(params![
                    queue,
                    id,
                    m.session_id,
                    m.correlation_id,
                    m.label,
                    m.content_type,
                    m.reply_to,
                    m.to,
                    m.reply_to_session_id,
                    m.partition_key,
                    Value::Object(m.properties).to_string(),
                    m.body,
                    now,
                    visible_at,
                    expires_at,
                ])?;
                out.accepted += 1;
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Locks visible messages of `queue`, oldest first, for `lock_for`: up to
    /// `take.max`, and no more than this receiver's part of them when others
    /// wait too. With `sessions = Some(busy)`, takes at most one message per
    /// session and none from the sessions in `busy` (those with a delivery in
    /// flight). Expired messages met on the way are dead-lettered
    /// (`TTLExpiredException`).
    pub fn receive(
        &self,
        queue: &str,
        take: Take,
        sessions: Option<&HashSet<String>>,
        lock_for: Duration,
        now: i64,
    ) -> Result<Received> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut out = Received::default();
        let lock = Lock { until: now + lock_for.as_millis() as i64, now };
        {
            match sessions {
                None => take_visible(&tx, queue, take, lock, &mut out)?,
                Some(busy) => take_session_heads(&tx, queue, take.max, busy, lock, &mut out)?,
            }
            let mut due = tx.prepare_cached(&format!(
                "SELECT MIN(visible_at) FROM messages WHERE queue = ?1 AND {AVAILABLE} AND visible_at > ?2"
            ))?;
            out.next_due = due.query_row(params![queue, now], |r| r.get(0))?;
        }
        tx.commit()?;
        Ok(out)
    }

    /// For a batch-triggered session queue: locks up to `max` visible messages
    /// of one session, in order. The session `held` (the one this receiver had)
    /// is taken again while it has messages, as a session receiver keeps its
    /// session until it idles; otherwise the first session after it with
    /// visible messages and none locked, unless `others` is false. Expired
    /// messages met on the way are dead-lettered.
    pub fn receive_session_batch(
        &self,
        queue: &str,
        max: usize,
        held: Option<&str>,
        others: bool,
        lock_for: Duration,
        now: i64,
    ) -> Result<Received> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut out = Received::default();
        let locked_until = now + lock_for.as_millis() as i64;
        {
            let mut free = tx.prepare_cached(&format!(
                "SELECT seq, expires_at FROM messages WHERE queue = ?1 AND {AVAILABLE} AND session_id = ?2
                 AND visible_at <= ?3 AND NOT EXISTS (SELECT 1 FROM messages AS l
                     WHERE l.queue = ?1 AND l.session_id = ?2 AND l.lock_token IS NOT NULL)
                 ORDER BY visible_at, seq LIMIT ?4"
            ))?;
            let mut next_session = tx.prepare_cached(&format!(
                "SELECT session_id FROM messages WHERE queue = ?1 AND {AVAILABLE} AND session_id > ?2
                 ORDER BY session_id LIMIT 1"
            ))?;
            // The held session first, then the others in order after it, wrapping round once.
            let start = held.unwrap_or_default().to_owned();
            let mut candidates: Vec<String> = held.map(str::to_owned).into_iter().collect();
            let mut after = start.clone();
            let mut wrapped = false;
            'sessions: loop {
                for sid in candidates.drain(..) {
                    let rows: Vec<(i64, Option<i64>)> = free
                        .query_map(params![queue, sid, now, max as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<rusqlite::Result<_>>()?;
                    for (seq, expires_at) in rows {
                        lock_or_expire(&tx, seq, expires_at, locked_until, now, &mut out)?;
                    }
                    if !out.messages.is_empty() {
                        break 'sessions;
                    }
                }
                if !others {
                    break;
                }
                let next: Option<String> = next_session.query_row(params![queue, after], |r| r.get(0)).optional()?;
                match next {
                    Some(sid) if wrapped && sid >= start => break,
                    Some(sid) => {
                        after = sid.clone();
                        if held != Some(sid.as_str()) {
                            candidates.push(sid);
                        }
                    }
                    None if !wrapped && !start.is_empty() => {
                        wrapped = true;
                        after = String::new();
                    }
                    None => break,
                }
            }
            let mut due = tx.prepare_cached(&format!(
                "SELECT MIN(visible_at) FROM messages WHERE queue = ?1 AND {AVAILABLE} AND visible_at > ?2"
            ))?;
            out.next_due = due.query_row(params![queue, now], |r| r.get(0))?;
        }
        tx.commit()?;
        Ok(out)
    }

    /// Settles deliveries, all in one transaction.
    pub fn settle(&self, ops: &[(i64, String, Settlement)], now: i64) -> Result<Vec<Settled>> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut out = Vec::with_capacity(ops.len());
        {
            let mut complete = tx.prepare_cached("DELETE FROM messages WHERE seq = ?1 AND lock_token = ?2")?;
            let mut count = tx.prepare_cached("SELECT delivery_count FROM messages WHERE seq = ?1 AND lock_token = ?2")?;
            let mut unlock = tx.prepare_cached(
                "UPDATE messages SET lock_token = NULL, locked_until = NULL, last_error = ?3 WHERE seq = ?1 AND lock_token = ?2",
            )?;
            let mut dead = tx.prepare_cached(
                "UPDATE messages SET lock_token = NULL, locked_until = NULL, last_error = ?3, dead_letter = 1,
                    dl_reason = 'MaxDeliveryCountExceeded', dl_description = ?3, dl_at = ?4
                 WHERE seq = ?1 AND lock_token = ?2",
            )?;
            let mut release = tx.prepare_cached(
                "UPDATE messages SET lock_token = NULL, locked_until = NULL, delivery_count = MAX(delivery_count - 1, 0)
                 WHERE seq = ?1 AND lock_token = ?2",
            )?;
            for (seq, token, how) in ops {
                let r = match how {
                    Settlement::Complete => {
                        if complete.execute(params![seq, token])? == 1 { Settled::Completed } else { Settled::LockLost }
                    }
                    Settlement::Release => {
                        if release.execute(params![seq, token])? == 1 { Settled::Released } else { Settled::LockLost }
                    }
                    Settlement::Abandon { max_delivery_count, reason } => {
                        match count.query_row(params![seq, token], |r| r.get::<_, u32>(0)).optional()? {
                            None => Settled::LockLost,
                            Some(dc) if dc >= *max_delivery_count => {
                                let why = format!("delivery {dc} of {max_delivery_count} failed: {reason}");
                                dead.execute(params![seq, token, why, now])?;
                                Settled::DeadLettered
                            }
                            Some(_) => {
                                unlock.execute(params![seq, token, reason])?;
                                Settled::Abandoned
                            }
                        }
                    }
                };
                out.push(r);
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// At startup: every lock still recorded was held by a receiver that is
    /// gone. Release them as lock expiry would: the delivery counts (it was
    /// counted when the message was locked), and a message whose last allowed
    /// delivery was lost goes to the dead-letter queue.
    pub fn release_stale_locks(&self, max_delivery: &HashMap<String, u32>, now: i64) -> Result<usize> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut n = 0;
        for (queue, max) in max_delivery {
            n += tx.execute(
                "UPDATE messages SET lock_token = NULL, locked_until = NULL, dead_letter = 1,
                    dl_reason = 'MaxDeliveryCountExceeded',
                    dl_description = 'lock lost on the last allowed delivery (the host stopped)', dl_at = ?3
                 WHERE queue = ?1 AND lock_token IS NOT NULL AND delivery_count >= ?2",
                params![queue, max, now],
            )?;
        }
        n += tx.execute(
            "UPDATE messages SET lock_token = NULL, locked_until = NULL, last_error = 'lock lost (the host stopped)'
             WHERE lock_token IS NOT NULL",
            [],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Forgets duplicate-detection records older than `window`.
    pub fn prune_dedup(&self, window: Duration, now: i64) -> Result<usize> {
        let conn = self.lock();
        Ok(conn.execute("DELETE FROM dedup WHERE seen_at < ?1", params![now - window.as_millis() as i64])?)
    }

    /// Counts per queue (only queues that hold messages appear).
    pub fn counts(&self, now: i64) -> Result<BTreeMap<String, QueueCounts>> {
        let conn = self.lock();
        let mut q = conn.prepare_cached(
            "SELECT queue,
                SUM(dead_letter = 0 AND lock_token IS NULL AND visible_at <= ?1),
                SUM(dead_letter = 0 AND lock_token IS NULL AND visible_at > ?1),
                SUM(dead_letter = 0 AND lock_token IS NOT NULL),
                SUM(dead_letter = 1)
             FROM messages GROUP BY queue",
        )?;
        let rows = q.query_map(params![now], |r| {
            Ok((
                r.get::<_, String>(0)?,
                QueueCounts {
                    active: r.get::<_, i64>(1)? as u64,
                    scheduled: r.get::<_, i64>(2)? as u64,
                    locked: r.get::<_, i64>(3)? as u64,
                    dead_lettered: r.get::<_, i64>(4)? as u64,
                },
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The dead-letter queue of `queue`, oldest first.
    pub fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        let conn = self.lock();
        let mut q = conn.prepare_cached(
            "SELECT seq, message_id, session_id, delivery_count, dl_reason, dl_description, enqueued_at, dl_at, props, body
             FROM messages WHERE queue = ?1 AND dead_letter = 1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = q.query_map(params![queue, limit as i64], |r| {
            let body: Vec<u8> = r.get(9)?;
            Ok(DeadLetter {
                sequence_number: r.get(0)?,
                message_id: r.get(1)?,
                session_id: r.get(2)?,
                delivery_count: r.get(3)?,
                reason: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                description: r.get(5)?,
                enqueued_time: rfc3339(r.get(6)?),
                dead_lettered_time: rfc3339(r.get::<_, Option<i64>>(7)?.unwrap_or(0)),
                properties: parse_props(&r.get::<_, String>(8)?),
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// Locks one available message for a receiver until `locked_until`, or
/// dead-letters it if it has expired (`TTLExpiredException`). `true` if it was locked.
/// A receive's lock: until when, taken when.
#[derive(Debug, Clone, Copy)]
struct Lock {
    until: i64,
    now: i64,
}

/// Takes this receiver's part of what is visible on `queue`, oldest first, as
/// Service Bus hands messages to the receivers waiting for them.
fn take_visible(tx: &rusqlite::Transaction<'_>, queue: &str, Take { max, among }: Take, lock: Lock, out: &mut Received) -> Result<()> {
    if max == 0 {
        return Ok(());
    }
    let mut q = tx.prepare_cached(&format!(
        "SELECT seq, expires_at FROM messages WHERE queue = ?1 AND {AVAILABLE} AND visible_at <= ?2
         ORDER BY visible_at, seq LIMIT ?3"
    ))?;
    let mut part = max;
    let mut first = true;
    // Expired ones do not count: look a little further if some were.
    loop {
        let look = (part - out.messages.len()) * among.max(1);
        let rows: Vec<(i64, Option<i64>)> =
            q.query_map(params![queue, lock.now, look as i64], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
        let n = rows.len();
        if std::mem::take(&mut first) {
            part = part.min(n.div_ceil(among.max(1)));
            out.left = n > part;
        }
        let before = out.expired;
        for (seq, exp) in rows {
            if out.messages.len() >= part {
                break;
            }
            lock_or_expire(tx, seq, exp, lock.until, lock.now, out)?;
        }
        if out.expired == before || n == 0 || out.messages.len() >= part {
            return Ok(());
        }
    }
}

/// Takes the head of each session with a message visible, up to `max`, none
/// from the sessions in `busy` (those with a delivery in flight). Walks the
/// distinct sessions that have available messages, one index seek each.
fn take_session_heads(tx: &rusqlite::Transaction<'_>, queue: &str, max: usize, busy: &HashSet<String>, lock: Lock, out: &mut Received) -> Result<()> {
    let mut next_session = tx.prepare_cached(&format!(
        "SELECT session_id FROM messages WHERE queue = ?1 AND {AVAILABLE} AND session_id > ?2
         ORDER BY session_id LIMIT 1"
    ))?;
    let mut head = tx.prepare_cached(&format!(
        "SELECT seq, expires_at FROM messages WHERE queue = ?1 AND {AVAILABLE} AND session_id = ?2
         AND visible_at <= ?3 AND NOT EXISTS (SELECT 1 FROM messages AS l
             WHERE l.queue = ?1 AND l.session_id = ?2 AND l.lock_token IS NOT NULL)
         ORDER BY visible_at, seq LIMIT 1"
    ))?;
    let mut after = String::new();
    while out.messages.len() < max {
        let Some(sid): Option<String> = next_session.query_row(params![queue, after], |r| r.get(0)).optional()? else {
            break;
        };
        after = sid.clone();
        if busy.contains(&sid) {
            continue;
        }
        loop {
            let h: Option<(i64, Option<i64>)> = head.query_row(params![queue, sid, lock.now], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
            let Some((seq, exp)) = h else { break };
            if lock_or_expire(tx, seq, exp, lock.until, lock.now, out)? {
                break;
            }
        }
    }
    Ok(())
}

fn lock_or_expire(tx: &rusqlite::Transaction<'_>, seq: i64, expires_at: Option<i64>, locked_until: i64, now: i64, out: &mut Received) -> Result<bool> {
    if matches!(expires_at, Some(t) if t <= now) {
        tx.prepare_cached(
            "UPDATE messages SET dead_letter = 1, dl_reason = 'TTLExpiredException',
                dl_description = 'The message expired and was dead lettered.', dl_at = ?2 WHERE seq = ?1",
        )?
        .execute(params![seq, now])?;
        out.expired += 1;
        return Ok(false);
    }
    static LOCK_ONE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "UPDATE messages SET lock_token = ?2, locked_until = ?3, delivery_count = delivery_count + 1
             WHERE seq = ?1 AND {AVAILABLE} RETURNING {COLUMNS}"
        )
    });
    let token = uuid::Uuid::new_v4().to_string();
    let locked = tx
        .prepare_cached(&LOCK_ONE)?
        .query_row(params![seq, token, locked_until], row_to_message)
        .optional()?;
    match locked {
        Some(m) => {
            out.messages.push(m);
            Ok(true)
        }
        None => Ok(false),
    }
}

fn parse_props(s: &str) -> Map<String, Value> {
    match serde_json::from_str(s) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn row_to_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        sequence_number: r.get(0)?,
        queue: r.get(1)?,
        message_id: r.get(2)?,
        session_id: r.get(3)?,
        correlation_id: r.get(4)?,
        label: r.get(5)?,
        content_type: r.get(6)?,
        reply_to: r.get(7)?,
        to: r.get(8)?,
        reply_to_session_id: r.get(9)?,
        partition_key: r.get(10)?,
        properties: parse_props(&r.get::<_, String>(11)?),
        body: r.get(12)?,
        enqueued_at: r.get(13)?,
        expires_at: r.get(14)?,
        delivery_count: r.get(15)?,
        lock_token: r.get(16)?,
        locked_until: r.get(17)?,
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(600);
    const LOCK: Duration = Duration::from_secs(60);

    fn msg(id: &str) -> NewMessage {
        NewMessage { message_id: Some(id.into()), body: id.as_bytes().to_vec(), ..Default::default() }
    }
    fn in_session(id: &str, s: &str) -> NewMessage {
        NewMessage { session_id: Some(s.into()), ..msg(id) }
    }
    fn ids(r: &Received) -> Vec<&str> {
        r.messages.iter().map(|m| m.message_id.as_str()).collect()
    }
    fn open() -> (tempfile::TempDir, QueueStore) {
        let d = tempfile::tempdir().unwrap();
        let s = QueueStore::open(&d.path().join("queues.db")).unwrap();
        (d, s)
    }

    #[test]
    fn fifo_and_duplicate_detection_survive_reopen() {
        let (d, s) = open();
        let t = 1_000_000;
        assert_eq!(s.send("q", W, vec![msg("a"), msg("b"), msg("a")], t).unwrap(), SendOutcome { accepted: 2, duplicates: 1 });
        assert_eq!(s.send("other", W, vec![msg("a")], t).unwrap().accepted, 1, "dedup is per queue");
        let r = s.receive("q", Take::up_to(10), None, LOCK, t).unwrap();
        assert_eq!(ids(&r), ["a", "b"]);
        assert!(r.messages.iter().all(|m| m.delivery_count == 1));
        let done: Vec<_> = r.messages.iter().map(|m| (m.sequence_number, m.lock_token.clone(), Settlement::Complete)).collect();
        assert_eq!(s.settle(&done, t).unwrap(), vec![Settled::Completed; 2]);
        drop(s);

        let s = QueueStore::open(&d.path().join("queues.db")).unwrap();
        // Still a duplicate after completion and reopen, within the window…
        assert_eq!(s.send("q", W, vec![msg("a")], t + 599_000).unwrap().duplicates, 1);
        // …and accepted again once the window has passed.
        assert_eq!(s.send("q", W, vec![msg("a")], t + 601_000).unwrap().accepted, 1);
        assert_eq!(s.prune_dedup(W, t + 601_000 + 1).unwrap(), 2);
    }

    /// Receivers waiting together each take their part of what is visible, as
    /// Service Bus spreads messages over the receivers asking for them; one
    /// alone, or one whose part is more than it has room for, takes what fits.
    #[test]
    fn receivers_waiting_together_share_the_visible_messages() {
        let (_d, s) = open();
        let t = 1_000_000;
        s.send("q", W, (0..10).map(|i| msg(&format!("m{i}"))).collect(), t).unwrap();
        let first = s.receive("q", Take { max: 64, among: 4 }, None, LOCK, t).unwrap();
        assert_eq!((ids(&first), first.left), (vec!["m0", "m1", "m2"], true));
        let second = s.receive("q", Take { max: 2, among: 3 }, None, LOCK, t).unwrap();
        assert_eq!((ids(&second), second.left), (vec!["m3", "m4"], true));
        let last = s.receive("q", Take { max: 64, among: 1 }, None, LOCK, t).unwrap();
        assert_eq!((last.messages.len(), last.left), (5, false));
    }

    #[test]
    fn scheduled_messages_are_invisible_until_due() {
        let (_d, s) = open();
        let t = 1_000_000;
        let later = NewMessage { scheduled_at: Some(t + 5_000), ..msg("later") };
        s.send("q", W, vec![later, msg("now")], t).unwrap();
        let r = s.receive("q", Take::up_to(10), None, LOCK, t).unwrap();
        assert_eq!(ids(&r), ["now"]);
        assert_eq!(r.next_due, Some(t + 5_000));
        let c = s.counts(t).unwrap()["q"];
        assert_eq!((c.active, c.scheduled, c.locked), (0, 1, 1));
        assert!(s.receive("q", Take::up_to(10), None, LOCK, t + 4_999).unwrap().messages.is_empty());
        assert_eq!(ids(&s.receive("q", Take::up_to(10), None, LOCK, t + 5_000).unwrap()), ["later"]);
    }

    #[test]
    fn abandon_counts_deliveries_then_dead_letters() {
        let (_d, s) = open();
        let t = 1_000_000;
        s.send("q", W, vec![msg("a"), msg("b")], t).unwrap();
        for n in 1..=3u32 {
            let r = s.receive("q", Take::up_to(1), None, LOCK, t).unwrap();
            let m = &r.messages[0];
            assert_eq!((m.message_id.as_str(), m.delivery_count), ("a", n), "abandoned message keeps its place");
            let how = Settlement::Abandon { max_delivery_count: 3, reason: "boom".into() };
            let want = if n < 3 { Settled::Abandoned } else { Settled::DeadLettered };
            assert_eq!(s.settle(&[(m.sequence_number, m.lock_token.clone(), how.clone())], t).unwrap(), vec![want]);
            // Settling twice with the same token finds the lock gone.
            assert_eq!(s.settle(&[(m.sequence_number, m.lock_token.clone(), how)], t).unwrap(), vec![Settled::LockLost]);
        }
        assert_eq!(ids(&s.receive("q", Take::up_to(10), None, LOCK, t).unwrap()), ["b"]);
        let c = s.counts(t).unwrap()["q"];
        assert_eq!((c.active, c.locked, c.dead_lettered), (0, 1, 1));
        let dl = s.dead_letters("q", 10).unwrap();
        assert_eq!(dl[0].message_id, "a");
        assert_eq!(dl[0].reason, "MaxDeliveryCountExceeded");
        assert!(dl[0].description.as_deref().unwrap().contains("boom"));
    }

    #[test]
    fn release_does_not_count_the_delivery() {
        let (_d, s) = open();
        s.send("q", W, vec![msg("a")], 0).unwrap();
        let m = s.receive("q", Take::up_to(1), None, LOCK, 0).unwrap().messages.remove(0);
        assert_eq!(s.settle(&[(m.sequence_number, m.lock_token, Settlement::Release)], 0).unwrap(), vec![Settled::Released]);
        assert_eq!(s.receive("q", Take::up_to(1), None, LOCK, 0).unwrap().messages[0].delivery_count, 1);
    }

    #[test]
    fn sessions_one_in_flight_each() {
        let (_d, s) = open();
        s.send("q", W, vec![in_session("a1", "A"), in_session("a2", "A"), in_session("b1", "B"), in_session("c1", "C")], 0)
            .unwrap();
        let busy: HashSet<String> = ["C".to_string()].into();
        let r = s.receive("q", Take::up_to(10), Some(&busy), LOCK, 0).unwrap();
        assert_eq!(ids(&r), ["a1", "b1"]);
        // A and B are now in flight too: nothing else may be taken.
        let busy: HashSet<String> = ["A", "B", "C"].map(String::from).into();
        assert!(s.receive("q", Take::up_to(10), Some(&busy), LOCK, 0).unwrap().messages.is_empty());
        // a1's lock is still held, so A's next message waits even if A is not marked busy.
        let busy: HashSet<String> = ["B", "C"].map(String::from).into();
        assert!(s.receive("q", Take::up_to(10), Some(&busy), LOCK, 0).unwrap().messages.is_empty());
        let a1 = &r.messages[0];
        s.settle(&[(a1.sequence_number, a1.lock_token.clone(), Settlement::Complete)], 0).unwrap();
        assert_eq!(ids(&s.receive("q", Take::up_to(10), Some(&busy), LOCK, 0).unwrap()), ["a2"]);
        // Limited by max.
        s.send("q", W, vec![in_session("d1", "D"), in_session("e1", "E")], 0).unwrap();
        assert_eq!(ids(&s.receive("q", Take::up_to(1), Some(&HashSet::new()), LOCK, 0).unwrap()), ["c1"]);
    }

    #[test]
    fn stale_locks_are_released_on_reopen() {
        let (d, s) = open();
        s.send("q", W, vec![msg("a"), msg("b")], 0).unwrap();
        let r = s.receive("q", Take::up_to(1), None, LOCK, 0).unwrap();
        assert_eq!(ids(&r), ["a"]);
        // b delivered twice already with max 2: its lock loss dead-letters it.
        let b = s.receive("q", Take::up_to(1), None, LOCK, 0).unwrap().messages.remove(0);
        s.settle(&[(b.sequence_number, b.lock_token, Settlement::Abandon { max_delivery_count: 9, reason: "x".into() })], 0)
            .unwrap();
        assert_eq!(ids(&s.receive("q", Take::up_to(1), None, LOCK, 0).unwrap()), ["b"]);
        drop(s); // as if killed: the locks stay recorded

        let s = QueueStore::open(&d.path().join("queues.db")).unwrap();
        assert!(s.receive("q", Take::up_to(10), None, LOCK, 0).unwrap().messages.is_empty(), "locks persist until released");
        let max: HashMap<String, u32> = [("q".to_string(), 2)].into();
        assert_eq!(s.release_stale_locks(&max, 0).unwrap(), 2);
        let r = s.receive("q", Take::up_to(10), None, LOCK, 0).unwrap();
        assert_eq!(ids(&r), ["a"]);
        assert_eq!(r.messages[0].delivery_count, 2, "the lost delivery counted");
        assert_eq!(s.counts(0).unwrap()["q"].dead_lettered, 1);
    }

    #[test]
    fn expired_messages_are_dead_lettered() {
        let (_d, s) = open();
        let short = NewMessage { time_to_live: Some(Duration::from_secs(1)), ..msg("short") };
        s.send("q", W, vec![short, msg("long")], 0).unwrap();
        let r = s.receive("q", Take::up_to(1), None, LOCK, 2_000).unwrap();
        assert_eq!((ids(&r), r.expired), (vec!["long"], 1));
        assert_eq!(s.dead_letters("q", 10).unwrap()[0].reason, "TTLExpiredException");
    }
}
