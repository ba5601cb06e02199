//! `ticketpay local --instances 3`: three handler processes share the queues;
//! one killed mid-batch is restarted while the others go on, and nothing is
//! lost or paid twice.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::Value;

const TICKETS: u64 = 300;
const SECOND: u64 = 2_000;

fn pid(i: &Value) -> Option<i64> {
    i["pid"].as_i64()
}

#[test]
fn three_instances_share_the_work_and_survive_one_being_killed() {
    let data = tempfile::tempdir().unwrap();
    let (_sim, providers) = simulator("zero-latency");
    let stack = Stack::start(StackOptions {
        scenario: "zero-latency",
        providers_url: Some(&providers),
        data: data.path(),
        env: &[],
        extra_args: &["--instances", "3"],
    });

    let first = stack.submit(TICKETS as usize, "100000.00");
    let status = stack.wait_complete(&first, Duration::from_secs(180));
    assert_batch_invariants(&status, &stats(&providers), TICKETS);

    let instances = stack.instances();
    assert_eq!(instances.len(), 3, "{instances:?}");
    let names: Vec<&str> = instances.iter().map(|i| i["instance"].as_str().unwrap()).collect();
    assert_eq!(names, ["instance-0", "instance-1", "instance-2"]);
    let pids: HashSet<i64> = instances.iter().map(|i| pid(i).expect("a running handler has a pid")).collect();
    assert_eq!(pids.len(), 3, "three processes: {instances:?}");
    let children: HashSet<i64> = stack.host.children().into_iter().map(i64::from).collect();
    assert_eq!(pids, children, "the pids are the host's handler processes");
    for i in &instances {
        assert_eq!(i["state"], "ready", "{i}");
        assert!(i["invocations"].as_u64().unwrap() > 0, "every instance got work: {instances:?}");
        assert!(i["slices"].is_array(), "{i}");
        assert!(i["url"].as_str().unwrap().starts_with("http://127.0.0.1:"), "{i}");
    }

    // A second, larger batch; instance-1 is killed once it has started on it. Batches
    // of messages make few invocations, so any one of them means it has.
    let victim = instances[1].clone();
    let (old_pid, before) = (pid(&victim).unwrap(), victim["invocations"].as_u64().unwrap());
    let second = stack.submit(SECOND as usize, "1000000.00");
    poll("instance-1 to work on the second batch", Duration::from_secs(60), || {
        (stack.instances()[1]["invocations"].as_u64().unwrap() > before).then_some(())
    });
    unsafe { libc::kill(old_pid as i32, libc::SIGKILL) };

    let restarted = poll("instance-1 restarted with a new pid", Duration::from_secs(60), || {
        let i = stack.instances()[1].clone();
        (i["state"] == "ready" && pid(&i).is_some_and(|p| p != old_pid)).then_some(i)
    });
    println!("instance-1: pid {old_pid} killed, restarted as {}", restarted["pid"]);

    let status = stack.wait_complete(&second, Duration::from_secs(180));
    let s = stats(&providers);
    assert_batch_invariants(&status, &s, SECOND);
    for (name, p) in s.as_object().unwrap() {
        if let Some(d) = p.get("duplicate_charges") {
            assert_eq!(d, 0, "{name} charged twice");
        }
    }
    let after = stack.instances();
    assert_eq!(after.iter().filter_map(pid).collect::<HashSet<_>>().len(), 3, "three processes again: {after:?}");
    assert!(after.iter().all(|i| i["state"] == "ready"), "{after:?}");
}

#[test]
fn instances_outside_one_to_sixteen_are_refused() {
    for n in ["0", "17"] {
        let out = std::process::Command::new(BIN).args(["local", "--instances", n, "--port", "0"]).current_dir(APP_ROOT).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--instances must be between 1 and 16"), "{err}");
    }
}

/// Four instances, every provider at 20 req/s and 4 in flight: together they
/// stay within both limits, each holding slices of them while it has work;
/// one killed while holding slices loses them when their leases end, and the
/// others (or its restarted process) hold them again within one lease period.
#[test]
fn four_instances_together_stay_within_tight_limits() {
    let data = tempfile::tempdir().unwrap();
    let scenario = data.path().join("tight.toml");
    std::fs::write(&scenario, TIGHT).unwrap();
    let scenario = scenario.to_str().unwrap();
    let (_sim, providers) = simulator(scenario);
    let stack = Stack::start(StackOptions {
        scenario,
        providers_url: Some(&providers),
        data: data.path(),
        env: &[],
        extra_args: &["--instances", "4"],
    });

    // 500 tickets at 20 req/s a provider: each provider has work for longer than a lease term.
    let batch = stack.submit(500, "1000000.00");
    let slices = |i: &Value| i["slices"].as_array().unwrap().len();
    let victim = poll("instances sharing the slices", Duration::from_secs(60), || {
        let listed = stack.instances();
        (listed.iter().filter(|i| slices(i) > 0).count() >= 2).then(|| listed.into_iter().max_by_key(slices).unwrap())
    });
    let capacity: Value = stack.http.get(format!("{}/api/capacity", stack.url)).send().unwrap().json().unwrap();
    for p in capacity["providers"].as_array().unwrap() {
        let d = &p["deployment"];
        let by: u64 = d["holders"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum();
        assert_eq!(d["held"], by, "{p}");
        assert!(by <= p["slices"].as_u64().unwrap(), "never more slices held than there are: {p}");
    }
    let leases = Leases(rusqlite::Connection::open(data.path().join("leases.db")).unwrap());
    let name = victim["instance"].as_str().unwrap();
    let before = leases.held_by(name);
    unsafe { libc::kill(pid(&victim).unwrap() as i32, libc::SIGKILL) };
    // As the killed process left them (its restarted process takes leases of its own).
    let mut dead = leases.held_by(name);
    dead.retain(|slice, (lease, _)| before.get(slice).is_some_and(|(l, _)| l == lease));
    assert!(!dead.is_empty(), "the killed instance held leases: {victim}");

    // Each is taken again (a new lease) soon after it ends, while its provider has work.
    let mut reclaimed = 0;
    for (slice, (lease, expires_ms)) in &dead {
        let provider = slice.split('/').next().unwrap();
        let by = expires_ms + RECLAIM_SLACK_MS;
        while leases.now_ms() < by && leases.lease_of(slice).is_none_or(|l| l == *lease) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if leases.lease_of(slice).is_some_and(|l| l != *lease) {
            reclaimed += 1;
            continue;
        }
        let before = stats(&providers)[provider]["requests"].as_u64().unwrap();
        let status = stack.wait_complete(&batch, Duration::from_secs(240));
        assert_eq!(stats(&providers)[provider]["requests"].as_u64().unwrap(), before, "{slice} not taken again within one lease period while {provider} had work: {status}");
    }
    assert!(reclaimed > 0, "the killed instance's slices were taken again: {dead:?}");

    let status = stack.wait_complete(&batch, Duration::from_secs(240));
    assert_batch_invariants(&status, &stats(&providers), 500);
    for s in stats(&providers).as_object().unwrap().values() {
        assert_eq!(s.get("duplicates").and_then(Value::as_u64).unwrap_or(0), 0, "nothing applied twice: {s}");
    }
}

/// A lease ended is taken again on the next look of an instance that wants it.
const RECLAIM_SLACK_MS: i64 = 3_000;

/// The leases as the embedded lease service holds them (`{data}/leases.db`), by its own clock.
struct Leases(rusqlite::Connection);

impl Leases {
    fn now_ms(&self) -> i64 {
        self.0.query_row("SELECT CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)", [], |r| r.get(0)).unwrap()
    }

    /// Slice -> (lease id, end) of the leases `instance` holds now.
    fn held_by(&self, instance: &str) -> std::collections::BTreeMap<String, (String, i64)> {
        let now = self.now_ms();
        let mut stmt = self.0.prepare("SELECT resource, lease_id, expires_ms FROM leases WHERE instance = ?1 AND expires_ms > ?2").unwrap();
        stmt.query_map(rusqlite::params![instance, now], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?)))).unwrap().map(Result::unwrap).collect()
    }

    /// The lease on `slice` in force now, if any.
    fn lease_of(&self, slice: &str) -> Option<String> {
        let now = self.now_ms();
        self.0
            .query_row("SELECT lease_id FROM leases WHERE resource = ?1 AND expires_ms > ?2", rusqlite::params![slice, now], |r| r.get(0))
            .ok()
    }
}

const TIGHT: &str = r#"
description = "Every provider at 20 req/s and 4 in flight"
seed = 5
[client]
timeout_ms = 2000
rate_headroom = 0.95
[outcomes]
nothing_due = 0.02
unknown_ticket = 0.01
amount_minor = [500, 20000]
[defaults]
latency_ms = [20, 60]
rate_limit = 20
concurrency_limit = 4
"#;
