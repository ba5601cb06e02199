//! The crash suite: the local host and its handler are killed without warning
//! (SIGKILL) at random points of a 5,000-ticket batch, again and again, and
//! started on the same data each time. Nothing may be lost, nothing paid
//! twice, and the budget may never be exceeded, not even for a moment.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const TICKETS: u64 = 5000;
const KILLS: usize = 6;

/// Paid plus reserved within budget, at any moment the API can be asked.
fn assert_budget_held(status: &Value) {
    let (budget, paid, reserved) = (cents(&status["budget"]), cents(&status["paid"]), cents(&status["reserved"]));
    assert!(paid + reserved <= budget, "budget exceeded: paid {paid} + reserved {reserved} > {budget}");
}

/// Watches the batch for `wait`, checking the budget at every look.
fn watch(stack: &Stack, batch: &str, wait: Duration) {
    let until = Instant::now() + wait;
    while Instant::now() < until {
        if let Some(status) = stack.try_get(&format!("/api/batches/{batch}")) {
            assert_budget_held(&status);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn killing_the_host_and_the_handler_at_random_loses_nothing_and_pays_nothing_twice() {
    let seed = std::env::var("CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    println!("crash suite seed {seed} (CRASH_SEED={seed} repeats these kill points)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let data = tempfile::tempdir().unwrap();
    let (_sim, providers) = simulator("realistic");
    let opts = || StackOptions { scenario: "realistic", providers_url: Some(&providers), data: data.path(), env: &[], extra_args: &[] };
    let mut stack = Stack::start(opts());
    // Less than the payable tickets owe: reservations race for the last of it.
    let batch = stack.submit(TICKETS as usize, "400000.00");

    for kill in 0..KILLS {
        watch(&stack, &batch, Duration::from_millis(rng.random_range(1500..7000)));
        if kill % 2 == 0 {
            let handlers = stack.host.children();
            assert_eq!(handlers.len(), 1, "the host runs one handler: {handlers:?}");
            println!("kill {}: the handler ({})", kill + 1, handlers[0]);
            unsafe { libc::kill(handlers[0], libc::SIGKILL) };
        } else {
            println!("kill {}: the host and its handler", kill + 1);
            stack.host.kill();
            stack = Stack::start(opts());
        }
    }

    let status = stack.wait_complete(&batch, Duration::from_secs(900));
    assert_batch_invariants(&status, &stats(&providers), TICKETS);
    assert_budget_held(&status);
    assert!(status["counts"]["over_budget"].as_u64().unwrap() > 0, "the budget ran out: {status}");

    let tickets = stack.all_tickets(&batch);
    assert_eq!(tickets.len() as u64, TICKETS, "no ticket lost");
    for t in &tickets {
        assert!(END_STATES.contains(&t["status"].as_str().unwrap()), "every ticket at an end state: {t}");
        assert_eq!(t["notified"], true, "{t}");
    }
    let paid: i64 = tickets.iter().map(|t| cents(&t["paid"])).sum();
    assert_eq!(paid, cents(&status["paid"]), "the batch total is the sum of its tickets");

    // The providers agree: every operation applied at most once, a capture for
    // each paid ticket, and other captures only for payments declined later and refunded.
    let stats = stats(&providers);
    for (name, s) in stats.as_object().unwrap() {
        if let Some(d) = s.get("duplicates") {
            assert_eq!(d, 0, "{name} saw an operation applied twice: {s}");
        }
    }
    let paid_tickets = tickets.iter().filter(|t| t["status"] == "paid").count() as u64;
    let failed_tickets = tickets.iter().filter(|t| t["status"] == "failed").count() as u64;
    let captures = stats["gateway"]["charges"].as_u64().unwrap();
    assert!(captures >= paid_tickets && captures <= paid_tickets + failed_tickets, "captures {captures} for {paid_tickets} paid: {stats}");
}
