//! Shared capacity: instances of one deployment, each with its own limiter,
//! spend only the slices of a provider's limits they hold a lease on, so the
//! provider's limits hold for all of them together, and a provider that says
//! "slow down" is left alone by every instance.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ticketpay::domain::Stage;
use ticketpay::leases::Leases;
use ticketpay::leases::sqlite::SqliteLeases;
use ticketpay::providers::ProviderName;
use ticketpay::providers::client::{Caller, ProviderClient, ProviderEndpoints, Providers};
use ticketpay::providers::limits::ClientConfig;
use ticketpay::providers::simulator::Scenario;
use ticketpay::providers::redact::Redactor;

const TIGHT: &str = r#"
description = "One tight provider"
seed = 3
[client]
timeout_ms = 2000
rate_headroom = 0.95
[outcomes]
nothing_due = 0.0
unknown_ticket = 0.0
amount_minor = [500, 20000]
[defaults]
latency_ms = [60, 120]
rate_limit = 20
concurrency_limit = 4
"#;

/// An instance of the deployment: its own client and limiter, leases shared through `leases.db`.
fn instance(providers: &str, config: &ClientConfig, leases_db: &std::path::Path, name: &str) -> Arc<ProviderClient> {
    let base_urls = ProviderName::ALL.into_iter().map(|p| (p, format!("{providers}/{p}"))).collect();
    let endpoints = ProviderEndpoints { base_urls, api_keys: Default::default() };
    let leases: Arc<dyn Leases> = Arc::new(SqliteLeases::open(leases_db).unwrap());
    Arc::new(ProviderClient::new(endpoints, config, Redactor::new(&[], &[])).with_shared_capacity(config, leases, name.to_owned()))
}

/// The simulator on [`TIGHT`] and one instance per name, sharing `leases.db` in a new folder.
fn tight_deployment(names: &[&str]) -> (tempfile::TempDir, Process, String, Vec<Arc<ProviderClient>>) {
    deployment(TIGHT, names)
}

fn deployment(scenario_toml: &str, names: &[&str]) -> (tempfile::TempDir, Process, String, Vec<Arc<ProviderClient>>) {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("scenario.toml");
    std::fs::write(&scenario, scenario_toml).unwrap();
    let (sim, providers) = simulator(scenario.to_str().unwrap());
    let config = ClientConfig::from_scenario(&Scenario::from_toml(scenario_toml).unwrap());
    let db = dir.path().join("leases.db");
    let clients = names.iter().map(|n| instance(&providers, &config, &db, n)).collect();
    (dir, sim, providers, clients)
}

async fn lookups(client: Arc<ProviderClient>, from: usize, n: usize) -> usize {
    tried(client, from, n, 5).await
}

async fn tried(client: Arc<ProviderClient>, from: usize, n: usize, tries: usize) -> usize {
    let calls = (from..from + n).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            let ticket_id = format!("t-{i:05}");
            let caller = Caller { batch_id: "b-1", ticket_id: &ticket_id, client_id: "ops", stage: Stage::Lookup, attempt: 0 };
            // A call that found no capacity in time is tried again, as a stage's retry would.
            for _ in 0..tries {
                if client.lookup("CITY-PARKING", ticketpay::domain::Currency::parse("EUR").unwrap(), &caller).await.result.is_ok() {
                    return true;
                }
            }
            false
        })
    });
    futures::future::join_all(calls).await.into_iter().filter(|r| *r.as_ref().unwrap()).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_together_stay_within_a_providers_limits_and_share_them() {
    let (_dir, _sim, providers, clients) = tight_deployment(&["a", "b", "c"]);

    // 3 instances x 40 lookups at 20/s and 4 in flight: about 6 s if the limit is spent well.
    let started = Instant::now();
    let runs: Vec<_> = clients.iter().enumerate().map(|(i, c)| tokio::spawn(lookups(c.clone(), i * 1000, 40))).collect();
    let mut seen_sharing = false;
    while !runs.iter().all(|r| r.is_finished()) {
        let held: Vec<usize> = clients.iter().map(|c| authority(c).held).collect();
        assert!(held.iter().sum::<usize>() <= 4, "never more slices held than there are: {held:?}");
        seen_sharing |= held.iter().filter(|h| **h > 0).count() >= 2;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done: usize = futures::future::join_all(runs).await.into_iter().map(|r| r.unwrap()).sum();
    let took = started.elapsed();
    assert_eq!(done, 120, "every call was answered");
    let s = sim_stats(&providers).await;
    assert_limits_held(&s);
    assert_eq!(s["authority"]["throttled"].as_u64(), Some(0), "the provider never had to refuse: {}", s["authority"]);
    assert!(seen_sharing, "instances with work hold slices at the same time");
    assert!(took < Duration::from_secs(30), "the shares were spent, not wasted: {took:?}");
}

/// Six instances with work and a provider of four slices: those holding one
/// hand it on after a while, so none waits until the others are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_more_instances_than_slices_each_gets_its_turn() {
    let names = ["a", "b", "c", "d", "e", "f"];
    let (_dir, _sim, providers, clients) = tight_deployment(&names);
    assert_eq!(authority(&clients[0]).slices, 4);

    // Each has 80 lookups: 16 s on one slice, longer than a turn.
    let runs: Vec<_> = clients.iter().enumerate().map(|(i, c)| tokio::spawn(tried(c.clone(), i * 1000, 80, 20))).collect();
    let started = Instant::now();
    let mut first_held: Vec<Option<Duration>> = vec![None; names.len()];
    let mut first_done: Option<Duration> = None;
    let mut last_held = Vec::new();
    while !runs.iter().all(|r| r.is_finished()) {
        let held: Vec<usize> = clients.iter().map(|c| authority(c).held).collect();
        assert!(held.iter().sum::<usize>() <= 4, "never more slices held than there are: {held:?}");
        if held != last_held {
            eprintln!("{:>6.1}s held {held:?}", started.elapsed().as_secs_f64());
            last_held = held.clone();
        }
        for (i, h) in held.iter().enumerate() {
            if *h > 0 && first_held[i].is_none() {
                first_held[i] = Some(started.elapsed());
            }
        }
        if first_done.is_none() && runs.iter().any(|r| r.is_finished()) {
            first_done = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done: usize = futures::future::join_all(runs).await.into_iter().map(|r| r.unwrap()).sum();
    assert_eq!(done, 6 * 80, "every call was answered");
    assert_limits_held(&sim_stats(&providers).await);
    let first_done = first_done.expect("a first instance finished");
    for (name, held) in names.iter().zip(&first_held) {
        let held = held.unwrap_or_else(|| panic!("{name} never held a slice: {first_held:?}"));
        assert!(held < first_done, "{name} waited for its first slice ({held:?}) until another was done ({first_done:?})");
    }
}

/// Two instances with work, one with far less than the other: the light one
/// keeps what it needs and the busy one spends the rest, instead of each
/// holding half and the busy one waiting while the light one's half idles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_little_work_leaves_the_rest_to_one_with_much() {
    let wide = TIGHT.replace("rate_limit = 20", "rate_limit = 40").replace("concurrency_limit = 4", "concurrency_limit = 20");
    let (_dir, _sim, providers, clients) = deployment(&wide, &["busy", "light"]);
    let slices = authority(&clients[0]).slices;
    assert_eq!(slices, 20);

    // The light one asks about 4 lookups a second, a tenth of the limit.
    let (busy, light) = (clients[0].clone(), clients[1].clone());
    let trickle = tokio::spawn(async move {
        let mut answered = 0;
        for i in 0..100 {
            answered += tried(light.clone(), 10_000 + i, 1, 5).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        answered
    });
    let flood = tokio::spawn(tried(busy, 0, 600, 20));
    let started = Instant::now();
    let mut most_held_by_busy = 0;
    while !flood.is_finished() {
        let held: Vec<usize> = clients.iter().map(|c| authority(c).held).collect();
        assert!(held.iter().sum::<usize>() <= slices, "never more slices held than there are: {held:?}");
        if !trickle.is_finished() && authority(&clients[1]).held > 0 {
            most_held_by_busy = most_held_by_busy.max(held[0]);
        }
        assert!(started.elapsed() < Duration::from_secs(90), "the flood is answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(flood.await.unwrap(), 600, "every call of the busy instance was answered");
    assert!(
        most_held_by_busy >= slices * 3 / 4,
        "while the light instance also had work, the busy one held at most {most_held_by_busy} of {slices} slices"
    );
    trickle.abort();
    let s = sim_stats(&providers).await;
    assert_limits_held(&s);
    assert_eq!(s["authority"]["throttled"].as_u64(), Some(0), "the provider never had to refuse: {}", s["authority"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_says_slow_down_hears_nothing_from_any_instance_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("tight.toml");
    std::fs::write(&scenario, TIGHT.replace("rate_limit = 20", "rate_limit = 40").replace("concurrency_limit = 4", "concurrency_limit = 8")).unwrap();
    let (_sim, providers) = simulator(scenario.to_str().unwrap());
    let config = ClientConfig::from_scenario(&Scenario::load(scenario.to_str()).unwrap());
    let db = dir.path().join("leases.db");
    let clients: Vec<_> = ["a", "b"].iter().map(|n| instance(&providers, &config, &db, n)).collect();
    assert_eq!(lookups(clients[0].clone(), 0, 5).await + lookups(clients[1].clone(), 100, 5).await, 10);

    // One instance hears a 429 with Retry-After: 2; then both have work.
    let shared = SqliteLeases::open(&db).unwrap();
    let url = providers.clone();
    tokio::task::spawn_blocking(move || outage(&url, serde_json::json!({"provider": "authority", "kind": "throttle", "seconds": 1})))
        .await
        .unwrap();
    let heard = tried(clients[0].clone(), 200, 1, 1).await;
    assert_eq!(heard, 0, "throttled");
    let shared_at = Instant::now();
    let paused = loop {
        if let Some(until) = shared.paused_until("authority").await.unwrap() {
            break until;
        }
        assert!(shared_at.elapsed() < Duration::from_millis(500), "the pause is shared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // The other instance hears of it within a poll of the shared state.
    let heard_at = Instant::now();
    while authority(&clients[1]).paused_for_ms.is_none() {
        assert!(heard_at.elapsed() < Duration::from_millis(500), "every instance hears of the pause");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = sim_stats(&providers).await["authority"]["requests"].as_u64().unwrap();
    let runs: Vec<_> = clients.iter().enumerate().map(|(i, c)| tokio::spawn(lookups(c.clone(), 300 + i * 100, 10))).collect();
    while chrono::Utc::now() < paused - chrono::Duration::milliseconds(50) {
        let now = sim_stats(&providers).await["authority"]["requests"].as_u64().unwrap();
        assert_eq!(now, before, "no instance calls a provider that asked for a pause");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done: usize = futures::future::join_all(runs).await.into_iter().map(|r| r.unwrap()).sum();
    assert_eq!(done, 20, "after the pause every call goes through");
}

async fn sim_stats(providers: &str) -> serde_json::Value {
    let url = providers.to_owned();
    tokio::task::spawn_blocking(move || stats(&url)).await.unwrap()
}

fn authority(c: &ProviderClient) -> ticketpay::providers::capacity::ShareView {
    c.capacity().unwrap().view().into_iter().find(|v| v.provider == ProviderName::Authority).unwrap()
}
