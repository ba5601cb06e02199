//! `ticketpay bench` reports what it measured, and the promises it checks hold.
//! Correctness only: the figures themselves are for people to read, not for tests to time.

mod common;

use common::{END_STATES, bench};
use serde_json::Value;

fn assert_nothing_lost_or_doubled(report: &Value, tickets: u64) {
    assert_eq!(report["tickets"], tickets);
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicate_charges"], 0, "{report}");
    assert_eq!(report["limits_held"], true, "{report}");
    assert_eq!(report["budget_held"], true, "{report}");
    let ended: u64 = END_STATES.iter().map(|s| report["end_states"][s].as_u64().unwrap()).sum();
    assert_eq!(ended, tickets, "every ticket at an end state: {report}");
    for field in ["seconds", "tickets_per_s", "cpu_ms_per_ticket", "baseline_seconds", "baseline_cpu_ms_per_ticket", "peak_rss_mb"] {
        assert!(report[field].as_f64().is_some_and(|v| v > 0.0), "{field} measured: {report}");
    }
}

#[test]
fn on_zero_latency_the_bench_measures_our_own_overhead_against_the_naive_way() {
    let (table, report) = bench(&["--tickets", "300", "--scenario", "zero-latency"]);
    assert_nothing_lost_or_doubled(&report, 300);
    assert_eq!(report["floor_seconds"], 0.0, "no limits, no latency: no floor");
    assert!(report["ratio_to_floor"].is_null());
    assert_eq!(report["baseline_measured_tickets"], 300, "the naive way pays every ticket when it is quick");
    let ratio = report["cpu_ms_per_ticket"].as_f64().unwrap() / report["baseline_cpu_ms_per_ticket"].as_f64().unwrap();
    assert!((report["overhead_vs_baseline"].as_f64().unwrap() - ratio).abs() < 0.01 * ratio, "{report}");
    assert!(table.contains("naive, one at a time") && table.contains("provider-bound floor"), "{table}");
}

#[test]
fn on_realistic_the_floor_comes_from_the_rate_limits_and_the_naive_way_is_sampled() {
    let (table, report) = bench(&["--tickets", "200", "--scenario", "realistic", "--baseline-tickets", "4"]);
    assert_nothing_lost_or_doubled(&report, 200);
    // 200 tickets each need the authority once, at 100 requests per second.
    let floor = report["floor_seconds"].as_f64().unwrap();
    assert!((1.99..2.5).contains(&floor), "{report}");
    assert_eq!(report["floor_bottleneck"], "authority");
    assert!(report["seconds"].as_f64().unwrap() >= floor, "nothing beats the floor: {report}");
    assert_eq!(report["baseline_measured_tickets"], 4);
    assert_eq!(report["baseline_scaled"], true);
    assert!(table.contains("measured on 4 tickets, scaled to 200"), "{table}");
}

/// Four instances share every provider's limits through leases: a full batch
/// on `realistic` stays within each provider's own counters of requests per
/// second and in flight, and none had to refuse a request.
#[test]
fn four_instances_pay_a_full_batch_within_every_providers_limits() {
    let (table, report) = bench(&["--tickets", "5000", "--scenario", "realistic", "--baseline-tickets", "2", "--instances", "4"]);
    assert_nothing_lost_or_doubled(&report, 5000);
    assert_eq!(report["instances"], 4);
    assert_eq!(report["throttled"], 0, "no provider had to refuse: {report}");
    let ratio = report["ratio_to_floor"].as_f64().expect("realistic has a floor");
    assert!(ratio >= 1.0, "nothing beats the floor: {report}");
    println!("{table}");
}
