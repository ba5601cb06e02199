//! The fault-schedule suite: each run draws, from a seed, a schedule of the
//! faults an unlucky day brings (provider timeouts applied or not, errors after
//! applying, refused status queries, refusals that are no decline, 429 storms,
//! outages, the bus unreachable, the store locked for over a minute, kill -9
//! of the handler or the host, duplicate deliveries, redrives at random
//! moments, part of the batch uploaded again) over a batch of a few hundred
//! tickets on the real local stack, then checks every promise from the
//! outside: the API, and what the simulator applied and received.
//!
//! `CHAOS_SEED=… scripts/test --profile long --test chaos` replays one run;
//! `CHAOS_SEEDS=N` runs N random seeds. By default the seeds are chosen so that
//! every fault kind comes up at least once.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const TICKETS: usize = 200;
const PROVIDERS: [&str; 9] = ["authority", "registry", "fraud", "sanctions", "gateway", "settlement", "ledger", "receipt", "notifier"];
const PAYMENT: [&str; 4] = ["gateway", "settlement", "ledger", "receipt"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Timeout,
    TimeoutAfterApply,
    ErrorAfterApply,
    StatusQueryRefused,
    Refusal,
    Throttle,
    Down,
    BusUnreachable,
    StoreLocked,
    KillHandler,
    KillHost,
    DuplicateDeliveries,
    Redrive,
    Reupload,
}

const KINDS: [Kind; 14] = [
    Kind::Timeout,
    Kind::TimeoutAfterApply,
    Kind::ErrorAfterApply,
    Kind::StatusQueryRefused,
    Kind::Refusal,
    Kind::Throttle,
    Kind::Down,
    Kind::BusUnreachable,
    Kind::StoreLocked,
    Kind::KillHandler,
    Kind::KillHost,
    Kind::DuplicateDeliveries,
    Kind::Redrive,
    Kind::Reupload,
];

/// Fault kinds every run is sure to contain; the default seeds cover them all.
const SURE_PER_RUN: usize = 3;

#[derive(Debug, Clone)]
struct Fault {
    at: Duration,
    kind: Kind,
    provider: &'static str,
    status: u16,
    seconds: u64,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at {:>5.1}s {:?}", self.at.as_secs_f64(), self.kind)?;
        match self.kind {
            Kind::StoreLocked | Kind::BusUnreachable => write!(f, " for {}s", self.seconds),
            Kind::KillHandler | Kind::KillHost | Kind::DuplicateDeliveries | Kind::Redrive | Kind::Reupload => Ok(()),
            _ => write!(f, " {} for {}s (status {})", self.provider, self.seconds, self.status),
        }
    }
}

struct Schedule {
    seed: u64,
    duplicate_deliveries: bool,
    faults: Vec<Fault>,
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "CHAOS_SEED={} (duplicate deliveries: {})", self.seed, self.duplicate_deliveries)?;
        self.faults.iter().try_for_each(|x| writeln!(f, "  {x}"))
    }
}

impl Schedule {
    fn draw(seed: u64) -> Schedule {
        let mut rng = StdRng::seed_from_u64(seed);
        let start = (seed % KINDS.len() as u64) as usize * SURE_PER_RUN % KINDS.len();
        let mut kinds: Vec<Kind> = (0..SURE_PER_RUN).map(|i| KINDS[(start + i) % KINDS.len()]).collect();
        for _ in 0..rng.random_range(2..=4) {
            let extra = *KINDS.choose(&mut rng).unwrap();
            // One long store lock and one second upload per run are enough to make the point.
            if !matches!(extra, Kind::StoreLocked | Kind::Reupload) {
                kinds.push(extra);
            }
        }
        let duplicate_deliveries = kinds.contains(&Kind::DuplicateDeliveries);
        let faults = kinds
            .into_iter()
            .filter(|k| *k != Kind::DuplicateDeliveries)
            .map(|kind| {
                let provider = match kind {
                    Kind::TimeoutAfterApply | Kind::ErrorAfterApply | Kind::StatusQueryRefused | Kind::Refusal => {
                        *PAYMENT.choose(&mut rng).unwrap()
                    }
                    _ => *PROVIDERS.choose(&mut rng).unwrap(),
                };
                let status = match kind {
                    Kind::StatusQueryRefused | Kind::Refusal => *[400, 401, 403, 409].choose(&mut rng).unwrap(),
                    _ => 0,
                };
                let seconds = match kind {
                    Kind::StoreLocked => 62,
                    _ => rng.random_range(1..=6),
                };
                Fault { at: Duration::from_millis(rng.random_range(0..6000)), kind, provider, status, seconds }
            })
            .collect::<Vec<_>>();
        let mut faults = faults;
        faults.sort_by_key(|f| f.at);
        Schedule { seed, duplicate_deliveries, faults }
    }
}

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    if let Some(n) = std::env::var("CHAOS_SEEDS").ok().and_then(|s| s.parse::<usize>().ok()) {
        return (0..n).map(|_| rand::random()).collect();
    }
    (0..KINDS.len().div_ceil(SURE_PER_RUN) as u64).collect()
}

#[test]
fn every_promise_holds_under_a_random_fault_schedule() {
    let seeds = seeds();
    let covered: HashSet<String> = seeds.iter().flat_map(|s| Schedule::draw(*s).kinds()).collect();
    println!("chaos: {} seed(s) {seeds:?}, covering {} of {} fault kinds", seeds.len(), covered.len(), KINDS.len());
    for seed in seeds {
        let schedule = Schedule::draw(seed);
        println!("chaos run\n{schedule}");
        if let Err(e) = std::panic::catch_unwind(|| run(&schedule)) {
            eprintln!("chaos: a promise broke under this schedule; replay it with the seed\n{schedule}");
            std::panic::resume_unwind(e);
        }
    }
}

impl Schedule {
    fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.faults.iter().map(|f| format!("{:?}", f.kind)).collect();
        if self.duplicate_deliveries {
            kinds.push(format!("{:?}", Kind::DuplicateDeliveries));
        }
        kinds
    }
}

/// A scenario with small latencies, some declines and limits, quick 504s.
fn scenario(dir: &std::path::Path) -> String {
    let text = r#"description = "chaos"
seed = 5
[client]
timeout_ms = 1000
rate_headroom = 0.9
[outcomes]
nothing_due = 0.03
unknown_ticket = 0.02
amount_minor = [500, 20000]
rejected = { registry = 0.02, fraud = 0.02, sanctions = 0.01 }
payment_failure = { gateway = 0.03, settlement = 0.03, ledger = 0.02, receipt = 0.02 }
[defaults]
latency_ms = [1, 10]
rate_limit = 300
concurrency_limit = 24
hang_ms = 1500
"#;
    let path = dir.join("chaos.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn post(url: &str, body: Value) {
    let r = reqwest::blocking::Client::new().post(url).json(&body).send().unwrap();
    assert!(r.status().is_success(), "POST {url} {body}: {}", r.status());
}

fn provider_fault(providers: &str, fault: &Fault) {
    let kind = match fault.kind {
        Kind::Timeout => "hang",
        Kind::TimeoutAfterApply => "hang_after_apply",
        Kind::ErrorAfterApply => "error_after_apply",
        Kind::StatusQueryRefused => "status_error",
        Kind::Refusal => "refuse",
        Kind::Throttle => "throttle",
        Kind::Down => "down",
        _ => unreachable!("not a provider fault"),
    };
    let mut body = json!({"provider": fault.provider, "kind": kind, "seconds": fault.seconds});
    if fault.status != 0 {
        body["status"] = json!(fault.status);
    }
    common::outage(providers, body);
}

fn run(schedule: &Schedule) {
    let dir = tempfile::tempdir().unwrap();
    let scenario = scenario(dir.path());
    let (_sim, providers) = simulator(&scenario);
    let data = dir.path().join("data");
    let env = [
        ("TICKETPAY_MAX_ATTEMPTS", "6"),
        ("TICKETPAY_RETRY_BASE_MS", "100"),
        ("TICKETPAY_RETRY_CAP_MS", "2000"),
        ("TICKETPAY_SWEEP_OVERDUE_SECS", "5"),
    ];
    let extra: &[&str] = if schedule.duplicate_deliveries { &["--duplicate-deliveries"] } else { &[] };
    let opts = || StackOptions { scenario: &scenario, providers_url: Some(&providers), data: &data, env: &env, extra_args: extra };
    let mut stack = Stack::start(opts());
    // The budget covers about two thirds of what is owed: reservations run out.
    let batch = stack.submit(TICKETS, "13500.00");
    let mut batches = vec![batch.clone()];
    let started = Instant::now();
    let mut lock: Option<(rusqlite::Connection, Instant)> = None;
    for fault in &schedule.faults {
        std::thread::sleep(fault.at.saturating_sub(started.elapsed()));
        match fault.kind {
            Kind::KillHandler => {
                for pid in stack.host.children() {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            Kind::KillHost => {
                stack.host.kill();
                stack = Stack::start(opts());
            }
            Kind::StoreLocked => {
                let conn = rusqlite::Connection::open(data.join("store.db")).unwrap();
                conn.busy_timeout(Duration::from_secs(30)).unwrap();
                conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
                lock = Some((conn, Instant::now() + Duration::from_secs(fault.seconds)));
            }
            Kind::Redrive => {
                // The handler may be restarting: a redrive that finds it down is simply not made.
                let _ = stack.http.post(format!("{}/api/batches/{batch}/redrive", stack.url)).json(&json!({})).send();
            }
            Kind::BusUnreachable => post(&format!("{}/admin/faults", stack.url), json!({"bus_unreachable_seconds": fault.seconds})),
            Kind::Reupload => {
                // The first half of the same tickets, again, in a batch of its own with room for all of them.
                // Stored while the bus is down, it is answered 503 `not-queued` and still paid: followed too.
                let r = stack.upload_json(&batch_json("ops", TICKETS / 2, "100000.00"), None);
                let stored = matches!(r.status().as_u16(), 202 | 503);
                if let Some(id) = r.json::<Value>().ok().filter(|_| stored).and_then(|v| v["batch_id"].as_str().map(str::to_owned)) {
                    batches.push(id);
                }
            }
            Kind::DuplicateDeliveries => {}
            _ => provider_fault(&providers, fault),
        }
    }
    if let Some((conn, until)) = lock.take() {
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
        conn.execute_batch("ROLLBACK").unwrap();
    }

    let applied: Vec<Value> = batches
        .iter()
        .map(|b| {
            let status = stack.wait_complete(b, Duration::from_secs(240));
            check(&stack, &providers, b, &status)
        })
        .collect::<Vec<_>>()
        .concat();
    assert_paid_once(&applied, &batches);
    assert_audit_matches(&stack, &batches, &providers);
}

/// A ticket (authority and id) is paid in at most one batch.
fn assert_paid_once(tickets: &[Value], batches: &[String]) {
    let mut paid: HashMap<(String, String), &str> = HashMap::new();
    for t in tickets.iter().filter(|t| t["status"] == "paid") {
        let key = (t["authority"].as_str().unwrap().to_owned(), t["ticket_id"].as_str().unwrap().to_owned());
        if let Some(other) = paid.insert(key, t["batch_id"].as_str().unwrap()) {
            panic!("paid in two batches ({other} and {}): {t}", t["batch_id"]);
        }
    }
    for t in tickets.iter().filter(|t| t["status"] == "duplicate") {
        let key = (t["authority"].as_str().unwrap().to_owned(), t["ticket_id"].as_str().unwrap().to_owned());
        let named = t["duplicate_of"].as_str().unwrap_or_else(|| panic!("a duplicate of the same client names the batch: {t}"));
        assert!(batches.iter().any(|b| b == named), "{t}");
        assert!(paid.get(&key) == Some(&named) || !paid.contains_key(&key), "the batch it names pays it: {t}");
    }
}

/// Every promise about one batch, from the outside; returns its tickets as the API shows them.
fn check(stack: &Stack, providers: &str, batch: &str, status: &Value) -> Vec<Value> {
    let size = status["tickets"].as_u64().unwrap();
    assert_batch_invariants(status, &stats(providers), size);
    assert!(status["completed_at"].is_string(), "a completed batch says when: {status}");
    let listed = stack.get("/api/batches");
    let item = listed["batches"].as_array().unwrap().iter().find(|b| b["batch_id"] == batch).unwrap().clone();
    assert_eq!(item["status"], "completed", "the list agrees with the view: {item}");

    let tickets: Vec<Value> = stack
        .all_tickets(batch)
        .iter()
        .map(|t| stack.get(&format!("/api/batches/{batch}/tickets/{}", t["ticket_id"].as_str().unwrap())))
        .collect();
    assert_eq!(tickets.len() as u64, size, "no ticket lost");
    let paid: i64 = tickets.iter().map(|t| cents(&t["paid"])).sum();
    assert_eq!(paid, cents(&status["paid"]), "the batch's paid is its tickets' sum");
    for t in &tickets {
        assert!(END_STATES.contains(&t["status"].as_str().unwrap()), "ended: {t}");
        assert_eq!(t["notified"], true, "told: {t}");
    }

    for (name, s) in stats(providers).as_object().unwrap() {
        assert_eq!(s.get("duplicates").and_then(Value::as_u64).unwrap_or(0), 0, "{name} was sent an applied operation again: {s}");
    }
    let applied: Value = reqwest::blocking::get(format!("{providers}/operations")).unwrap().json().unwrap();
    let applied: Vec<&Value> = applied["operations"].as_array().unwrap().iter().filter(|op| op["batch_id"] == batch).collect();
    assert_money_matches(&tickets, &applied, status);
    tickets
}

/// Per ticket, what the providers applied is what
/// the ticket records; captured minus refunded never above the budget, at any point.
fn assert_money_matches(tickets: &[Value], applied: &[&Value], status: &Value) {
    let mut by_ticket: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut net = 0i64;
    for op in applied {
        by_ticket.entry(op["ticket_id"].as_str().unwrap()).or_default().push(op["operation"].as_str().unwrap());
        match op["operation"].as_str().unwrap() {
            "capture" => net += op["amount"]["minor"].as_i64().unwrap(),
            "refund" => net -= op["amount"]["minor"].as_i64().unwrap(),
            _ => {}
        }
        assert!(net <= cents(&status["budget"]), "captured minus refunded {net} went past the budget: {status}");
    }
    const FORWARD: [&str; 4] = ["capture", "settle", "post", "issue"];
    const BACK: [&str; 4] = ["refund", "cancel", "reverse", "void"];
    for t in tickets {
        let ops: BTreeMap<&str, usize> = by_ticket.get(t["ticket_id"].as_str().unwrap()).into_iter().flatten().fold(BTreeMap::new(), |mut m, op| {
            *m.entry(*op).or_default() += 1;
            m
        });
        let forward = FORWARD.iter().filter(|op| ops.contains_key(*op)).count();
        let back = BACK.iter().filter(|op| ops.contains_key(*op)).count();
        let done = t["payment"]["steps_done"].as_u64().unwrap_or(0) as usize;
        let undone = t["payment"]["steps_undone"].as_u64().unwrap_or(0) as usize;
        match t["status"].as_str().unwrap() {
            "paid" => assert_eq!((forward, back), (4, 0), "a paid ticket's four steps, nothing undone: {ops:?} {t}"),
            "failed" => assert_eq!(forward, back, "a failed ticket's done steps are all undone: {ops:?} {t}"),
            "parked" => {
                let unknown = t["payment"]["outcome_unknown"] == true || t["payment"]["in_flight"].is_string();
                let undoing = t["payment"]["failure"].is_string();
                // An unknown outcome covers the operation named and those after it, in its direction.
                let (forward_most, back_most) = match (unknown, undoing) {
                    (false, _) => (done, undone),
                    (true, false) => (FORWARD.len(), undone),
                    (true, true) => (done, done),
                };
                assert!(forward >= done && forward <= forward_most, "parked: {ops:?} {t}");
                assert!(back >= undone && back <= back_most, "parked: {ops:?} {t}");
            }
            _ => assert_eq!((forward, back), (0, 0), "no money moved for this ticket: {ops:?} {t}"),
        }
        let reserved = cents(&t["reserved"]);
        assert!(t["status"] == "parked" || reserved == 0, "only a parked ticket keeps a reservation: {t}");
    }
}

/// Every request a provider received is in its ticket's audit trail, and
/// every exchange recorded as answered was received. Exchanges that happened
/// while the store was locked reach it from the handler's spool a little after
/// the store is back, which may be after the batch completed: waited for, within
/// a bound.
fn assert_audit_matches(stack: &Stack, batches: &[String], providers: &str) {
    let deadline = Instant::now() + SPOOL_DRAINED_WITHIN;
    loop {
        match audit_gaps(stack, batches, providers) {
            Ok(()) => return,
            Err(gap) if Instant::now() >= deadline => panic!("{gap}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// The spool tries the store again every 2 s; an outage's records are all in well within this.
const SPOOL_DRAINED_WITHIN: Duration = Duration::from_secs(30);
