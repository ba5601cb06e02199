//! `ticketpay local --instances 3`: three handler processes share the queues;
//! one killed mid-batch is restarted while the others go on, and nothing is
//! lost or paid twice.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::Value;

const TICKETS: u64 = 300;

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

    // A second batch; instance-1 is killed once it has started on it.
    let victim = instances[1].clone();
    let (old_pid, before) = (pid(&victim).unwrap(), victim["invocations"].as_u64().unwrap());
    let second = stack.submit(TICKETS as usize, "100000.00");
    poll("instance-1 to work on the second batch", Duration::from_secs(60), || {
        (stack.instances()[1]["invocations"].as_u64().unwrap() > before + 20).then_some(())
    });
    unsafe { libc::kill(old_pid as i32, libc::SIGKILL) };

    let restarted = poll("instance-1 restarted with a new pid", Duration::from_secs(60), || {
        let i = stack.instances()[1].clone();
        (i["state"] == "ready" && pid(&i).is_some_and(|p| p != old_pid)).then_some(i)
    });
    println!("instance-1: pid {old_pid} killed, restarted as {}", restarted["pid"]);

    let status = stack.wait_complete(&second, Duration::from_secs(180));
    let s = stats(&providers);
    assert_batch_invariants(&status, &s, TICKETS);
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
/// stay within both limits, each holding slices of them while it has work,
/// and after one is killed the others take its slices once its leases end.
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

    let batch = stack.submit(60, "100000.00");
    let mut holders = HashSet::new();
    let victim = poll("an instance holding slices", Duration::from_secs(60), || {
        let listed = stack.instances();
        holders.extend(listed.iter().filter(|i| !i["slices"].as_array().unwrap().is_empty()).map(|i| i["instance"].as_str().unwrap().to_owned()));
        listed.into_iter().find(|i| !i["slices"].as_array().unwrap().is_empty())
    });
    unsafe { libc::kill(pid(&victim).unwrap() as i32, libc::SIGKILL) };
    let status = stack.wait_complete(&batch, Duration::from_secs(240));
    assert_batch_invariants(&status, &stats(&providers), 60);
    for s in stats(&providers).as_object().unwrap().values() {
        assert_eq!(s.get("duplicates").and_then(Value::as_u64).unwrap_or(0), 0, "nothing applied twice: {s}");
    }
    assert!(!holders.is_empty(), "slices were held");
}

const TIGHT: &str = r#"
description = "Every provider at 20 req/s and 4 in flight"
seed = 5
[client]
timeout_ms = 2000
rate_headroom = 1.0
[outcomes]
nothing_due = 0.02
unknown_ticket = 0.01
amount_minor = [500, 20000]
[defaults]
latency_ms = [20, 60]
rate_limit = 20
concurrency_limit = 4
"#;
