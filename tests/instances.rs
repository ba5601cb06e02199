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
