//! The request journal: every provider request, noted on local disk just before
//! it is sent, until its exchange is recorded.
//!
//! One append-only file per process (`{uuid}.intents`), locked with `flock`
//! while the process lives. A line per request about to be sent (its audit
//! event, as it would be recorded unanswered), a line with its answer when the
//! exchange waits for more calls before it is recorded (the later line of a
//! request stands), and a line naming the requests whose exchanges are
//! recorded (`{"done": [ids]}`). Once the file grows past a
//! few megabytes it is rewritten with the open requests only. A process that
//! dies leaves its file unlocked; the next process to start reads it and
//! records every open request as interrupted (see [`super::spool`]).
//!
//! An append is one `write` to an open file: a fraction of what a file per
//! request costs (create, write, close, unlink), which was a sixth of the
//! handler's CPU.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::domain::Event;

pub const EXTENSION: &str = "intents";

/// Past this size the journal is rewritten with only its open requests.
const REWRITE_PAST: u64 = 4 << 20;

pub struct Journal {
    path: PathBuf,
    file: Mutex<Open>,
}

struct Open {
    file: File,
    len: u64,
    /// Request id → its line, for every request not yet recorded.
    pending: HashMap<String, Vec<u8>>,
}

#[derive(Serialize, Deserialize)]
struct Done {
    done: Vec<String>,
}

/// Holds an exclusive lock on `file` for as long as it is open; `false` if another process holds it.
fn lock(file: &File) -> bool {
    // SAFETY: flock on a descriptor this File owns.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

fn create_locked(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    if !lock(&file) {
        return Err(std::io::Error::other(format!("{} is locked by another process", path.display())));
    }
    Ok(file)
}

impl Journal {
    /// A new journal for this process in `dir`.
    pub fn create(dir: &Path) -> std::io::Result<Journal> {
        let path = dir.join(format!("{}.{EXTENSION}", uuid::Uuid::now_v7().simple()));
        let file = create_locked(&path)?;
        Ok(Journal { path, file: Mutex::new(Open { file, len: 0, pending: HashMap::new() }) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Notes a request about to be sent, or its answer, under its request id.
    pub fn note(&self, id: &str, event: &Event) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut open = self.file.lock().unwrap_or_else(|p| p.into_inner());
        open.file.write_all(&line)?;
        open.len += line.len() as u64;
        open.pending.insert(id.to_owned(), line);
        Ok(())
    }

    /// These requests' exchanges are recorded (in the store or the spool).
    pub fn done<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut open = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let done: Vec<String> = ids.into_iter().filter(|id| open.pending.remove(*id).is_some()).map(str::to_owned).collect();
        if done.is_empty() {
            return;
        }
        let mut line = serde_json::to_vec(&Done { done }).expect("ids serialise");
        line.push(b'\n');
        // Should this line be lost, recovery finds the exchanges in the trail and records nothing twice.
        if open.file.write_all(&line).is_ok() {
            open.len += line.len() as u64;
        }
        if open.len > REWRITE_PAST
            && let Err(e) = self.rewrite(&mut open)
        {
            tracing::warn!(error = %e, journal = %self.path.display(), "cannot rewrite the request journal; it keeps growing");
        }
    }

    /// Replaces the file with one holding only the open requests (written
    /// aside, locked, then renamed over it: the path always holds them all).
    fn rewrite(&self, open: &mut Open) -> std::io::Result<()> {
        let aside = self.path.with_extension(format!("{EXTENSION}.new"));
        let mut file = create_locked(&aside)?;
        file.set_len(0)?;
        let mut len = 0;
        for line in open.pending.values() {
            file.write_all(line)?;
            len += line.len() as u64;
        }
        std::fs::rename(&aside, &self.path)?;
        open.file = file;
        open.len = len;
        Ok(())
    }
}

/// A journal left by a process that is gone: the requests it noted and never
/// saw recorded. `None` while its process still holds it. The file goes once
/// `take` returns what is in it; the caller records them first.
pub struct Left {
    path: PathBuf,
    _lock: File,
    pub open: Vec<Event>,
}

impl Left {
    pub fn open(path: &Path) -> Option<Left> {
        let file = File::open(path).ok()?;
        if !lock(&file) {
            return None;
        }
        let mut sent: Vec<(String, Event)> = Vec::new();
        let mut at: HashMap<String, usize> = HashMap::new();
        let mut done: HashSet<String> = HashSet::new();
        for line in std::io::BufReader::new(&file).split(b'\n') {
            let Ok(line) = line else { break };
            if let Ok(d) = serde_json::from_slice::<Done>(&line) {
                done.extend(d.done);
            } else if let Ok(event) = serde_json::from_slice::<Event>(&line)
                && let Some(id) = super::spool::event_request_id(&event)
            {
                match at.get(id) {
                    Some(&i) => sent[i].1 = event,
                    None => {
                        at.insert(id.to_owned(), sent.len());
                        sent.push((id.to_owned(), event));
                    }
                }
            }
            // Anything else is a line cut short by the process dying while writing it:
            // its request was not sent yet.
        }
        let open = sent.into_iter().filter(|(id, _)| !done.contains(id)).map(|(_, e)| e).collect();
        Some(Left { path: path.to_owned(), _lock: file, open })
    }

    /// Every open request is recorded: the journal goes.
    pub fn finish(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::domain::event::HttpRequestRecord;
    use crate::domain::{BatchId, EventKind, Exchange, Stage, TicketId};
    use crate::providers::ProviderName;

    fn sent(id: &str) -> Event {
        let headers = BTreeMap::from([(crate::providers::wire::REQUEST_ID.to_ascii_lowercase(), id.to_owned())]);
        let exchange = Exchange {
            provider: ProviderName::Gateway,
            operation: "capture".into(),
            attempt: 0,
            idempotency_key: None,
            request: HttpRequestRecord { method: "POST".into(), url: "http://p/x".into(), headers, body: serde_json::Value::Null },
            response: None,
            outcome: "transient".into(),
            error: Some("sent; no answer recorded".into()),
            latency_ms: 0,
            trace_id: None,
        };
        let (b, t) = (BatchId::parse("b1").unwrap(), TicketId::parse("t1").unwrap());
        Event::new(&b, &t, Stage::Pay, EventKind::Exchange(std::sync::Arc::new(exchange)), chrono::Utc::now())
    }

    fn open_ids(left: &Left) -> Vec<String> {
        left.open.iter().map(|e| super::super::spool::event_request_id(e).unwrap().to_owned()).collect()
    }

    #[test]
    fn a_journal_is_read_only_once_its_process_is_gone_and_holds_what_was_never_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::create(dir.path()).unwrap();
        for id in ["r1", "r2", "r3"] {
            journal.note(id, &sent(id)).unwrap();
        }
        journal.done(["r1", "r3", "unknown"]);
        assert!(Left::open(journal.path()).is_none(), "a live process's journal is not taken");
        let path = journal.path().to_owned();
        drop(journal);
        let left = Left::open(&path).expect("the process is gone");
        assert_eq!(open_ids(&left), ["r2"]);
        left.finish();
        assert!(!path.exists());
    }

    #[test]
    fn an_answer_noted_after_its_request_is_what_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::create(dir.path()).unwrap();
        let (r1, r2) = (sent("r1"), sent("r2"));
        journal.note("r1", &r1).unwrap();
        journal.note("r2", &r2).unwrap();
        let mut answered = r1.clone();
        let EventKind::Exchange(x) = &mut answered.kind else { unreachable!() };
        let x = std::sync::Arc::make_mut(x);
        x.response = Some(crate::domain::event::HttpResponseRecord { status: 200, headers: BTreeMap::new(), body: serde_json::json!({"applied": true}) });
        x.outcome = "ok".into();
        journal.note("r1", &answered).unwrap();
        let path = journal.path().to_owned();
        drop(journal);
        let left = Left::open(&path).unwrap();
        assert_eq!(open_ids(&left), ["r1", "r2"], "one event per request, in the order they were sent");
        assert_eq!(left.open[0], answered, "the answer stands over the request noted before it");
        assert_eq!(left.open[1], r2, "a request never answered stays as it was sent");
    }

    #[test]
    fn a_line_cut_short_by_a_kill_is_no_request() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::create(dir.path()).unwrap();
        journal.note("r1", &sent("r1")).unwrap();
        let path = journal.path().to_owned();
        drop(journal);
        let whole = serde_json::to_vec(&sent("r2")).unwrap();
        OpenOptions::new().append(true).open(&path).unwrap().write_all(&whole[..whole.len() / 2]).unwrap();
        assert_eq!(open_ids(&Left::open(&path).unwrap()), ["r1"]);
    }

    #[test]
    fn a_rewritten_journal_keeps_every_open_request_and_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::create(dir.path()).unwrap();
        journal.note("keep", &sent("keep")).unwrap();
        let len = |j: &Journal| std::fs::metadata(j.path()).unwrap().len();
        let mut longest = 0;
        for n in 0.. {
            let id = format!("r{n}");
            journal.note(&id, &sent(&id)).unwrap();
            journal.done([id.as_str()]);
            if len(&journal) < longest {
                break;
            }
            longest = len(&journal);
            assert!(longest <= 2 * REWRITE_PAST, "the journal was never rewritten");
        }
        assert!(longest > REWRITE_PAST / 2 && len(&journal) < 4096, "rewritten with the open requests only, {longest} then {}", len(&journal));
        journal.note("last", &sent("last")).unwrap();
        assert!(Left::open(journal.path()).is_none(), "still locked after the rewrite");
        let path = journal.path().to_owned();
        drop(journal);
        let mut open = open_ids(&Left::open(&path).unwrap());
        open.sort();
        assert_eq!(open, ["keep", "last"]);
    }
}
