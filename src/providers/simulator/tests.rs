use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::*;
use crate::providers::ProviderName;
use crate::providers::wire::{
    CheckResponse, Decision, DueStatus, LookupResponse, OperationResponse, ProviderError,
};

// ---- scenarios ---------------------------------------------------------------

#[test]
fn shipped_scenarios_parse() {
    for (name, _) in SHIPPED {
        let s = Scenario::load(Some(name)).unwrap();
        assert_eq!(s.name, name);
        assert!(!s.description.is_empty());
        assert_eq!(s.providers.len(), 9);
    }
    let default = Scenario::load(None).unwrap();
    assert_eq!(default.name, "realistic");
    assert_eq!(default.provider(ProviderName::Gateway).latency_ms, [50, 250]);
    assert_eq!(default.provider(ProviderName::Ledger).latency_ms, [20, 200]);
    assert_eq!(default.provider(ProviderName::Ledger).rate_limit, 100);
    assert_eq!(default.provider(ProviderName::Ledger).concurrency_limit, 32);
    assert_eq!(default.client.timeout_ms, 3000);

    let zero = Scenario::load(Some("zero-latency")).unwrap();
    for p in ProviderName::ALL {
        let s = zero.provider(p);
        assert_eq!((s.latency_ms, s.rate_limit, s.concurrency_limit), ([0, 0], 0, 0));
    }
    let faulty = Scenario::load(Some("faulty")).unwrap();
    assert_eq!(faulty.client.timeout_ms, 1500);
    assert!(faulty.provider(ProviderName::Authority).error_rate > 0.0);
    assert!(faulty.provider(ProviderName::Fraud).rate_limit < 100);
}

#[test]
fn full_format_parses() {
    let s = Scenario::from_toml(
        r#"
        description = "Realistic latencies and limits"
        seed = 1
        [client]
        timeout_ms = 3000
        rate_headroom = 0.9
        [outcomes]
        nothing_due = 0.02
        unknown_ticket = 0.01
        amount_minor = [500, 20000]
        rejected = { registry = 0.01, fraud = 0.01, sanctions = 0.005 }
        payment_failure = { gateway = 0.01, settlement = 0.005, ledger = 0.002, receipt = 0.002 }
        [defaults]
        latency_ms = [20, 200]
        rate_limit = 100
        concurrency_limit = 32
        error_rate = 0.0
        timeout_rate = 0.0
        hang_ms = 10000
        [providers.gateway]
        latency_ms = [50, 250]
        rate_limit = 7
        "#,
    )
    .unwrap();
    assert_eq!(s.seed, 1);
    assert_eq!(s.client.rate_headroom, 0.9);
    assert_eq!(s.outcomes.rejected[&ProviderName::Sanctions], 0.005);
    assert_eq!(s.outcomes.payment_failure[&ProviderName::Receipt], 0.002);
    let g = s.provider(ProviderName::Gateway);
    assert_eq!((g.latency_ms, g.rate_limit, g.concurrency_limit), ([50, 250], 7, 32));
    assert_eq!(s.provider(ProviderName::Notifier), &s.defaults);
}

#[test]
fn bad_scenarios_name_the_key() {
    let cases = [
        ("colour = 1", "colour"),
        ("[defaults]\nlatncy_ms = [1, 2]", "latncy_ms"),
        ("[client]\ntimeout = 5", "timeout"),
        ("[providers.gateway]\nspeed = 3", "speed"),
        ("[providers.bank]\nrate_limit = 3", "providers.bank"),
        ("[outcomes]\nrejected = { gateway = 0.1 }", "outcomes.rejected.gateway"),
        ("[outcomes]\npayment_failure = { fraud = 0.1 }", "outcomes.payment_failure.fraud"),
        ("[defaults]\nerror_rate = 1.5", "defaults.error_rate"),
        ("[providers.ledger]\ntimeout_rate = -0.1", "providers.ledger.timeout_rate"),
        ("[defaults]\nlatency_ms = [200, 20]", "defaults.latency_ms"),
        ("[outcomes]\namount_minor = [0, 10]", "outcomes.amount_minor"),
        ("[outcomes]\nnothing_due = 0.7\nunknown_ticket = 0.7", "outcomes"),
        ("[client]\nrate_headroom = 0", "client.rate_headroom"),
        ("[defaults]\nrate_limit = \"many\"", "rate_limit"),
    ];
    for (text, key) in cases {
        let err = format!("{:#}", Scenario::from_toml(text).unwrap_err());
        assert!(err.contains(key), "error for {text:?} does not name {key}: {err}");
    }
}

#[test]
fn load_reads_files_and_refuses_unknown_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mine.toml");
    std::fs::write(&path, "seed = 9\n[defaults]\nrate_limit = 5\n").unwrap();
    let s = Scenario::load(Some(path.to_str().unwrap())).unwrap();
    assert_eq!((s.name.as_str(), s.seed), ("mine", 9));
    assert_eq!(s.provider(ProviderName::Fraud).rate_limit, 5);

    let err = Scenario::load(Some("no-such-scenario")).unwrap_err().to_string();
    assert!(err.contains("no-such-scenario") && err.contains("realistic"), "{err}");
}

fn mix_scenario() -> Scenario {
    Scenario::from_toml(
        r#"
        seed = 3
        [outcomes]
        unknown_ticket = 0.1
        nothing_due = 0.1
        amount_minor = [100, 300]
        rejected = { registry = 0.1, fraud = 0.05 }
        payment_failure = { gateway = 0.1, receipt = 0.05 }
        "#,
    )
    .unwrap()
}

#[test]
fn outcomes_are_deterministic_and_follow_the_probabilities() {
    let s = mix_scenario();
    let n = 10_000;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut amount_sum = 0i64;
    let mut paying = 0i64;
    for i in 0..n {
        let id = format!("T-{i}");
        let o = outcome_for(&s, &id);
        assert_eq!(o, outcome_for(&s, &id));
        let kind = match (&o.unknown, &o.nothing_due, o.rejected_by, o.fails_at) {
            (true, ..) => "unknown",
            (_, true, ..) => "nothing_due",
            (_, _, Some(p), None) => p.as_str(),
            (_, _, None, Some(p)) => p.as_str(),
            (false, false, None, None) => "pays",
            _ => panic!("two fates for {id}: {o:?}"),
        };
        *counts.entry(kind).or_default() += 1;
        if o.unknown || o.nothing_due {
            assert_eq!(o.amount_minor, 0);
        } else {
            assert!((100..=300).contains(&o.amount_minor), "{o:?}");
            amount_sum += o.amount_minor;
            paying += 1;
        }
    }
    let expect = [
        ("unknown", 0.1),
        ("nothing_due", 0.1),
        ("registry", 0.1),
        ("fraud", 0.05),
        ("gateway", 0.1),
        ("receipt", 0.05),
        ("pays", 0.5),
    ];
    for (k, p) in expect {
        let got = *counts.get(k).unwrap_or(&0) as f64 / n as f64;
        assert!((got - p).abs() < 0.02, "{k}: {got} vs {p}");
    }
    let mean = amount_sum as f64 / paying as f64;
    assert!((mean - 200.0).abs() < 5.0, "mean amount {mean}");

    // Another seed gives other fates.
    let mut other = s.clone();
    other.seed = 4;
    let differ = (0..200)
        .filter(|i| outcome_for(&s, &format!("T-{i}")) != outcome_for(&other, &format!("T-{i}")))
        .count();
    assert!(differ > 150);
}

// ---- HTTP ----------------------------------------------------------------------

/// A running simulator; stops when dropped.
struct Server {
    base: String,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    http: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start(scenario: Scenario) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(serve(listener, scenario));
        Server { base, task, http: reqwest::Client::new() }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn stats(&self) -> Value {
        self.http.get(self.url("/stats")).send().await.unwrap().json().await.unwrap()
    }

    async fn op(&self, path: &str, key: Option<&str>, body: &Value) -> reqwest::Response {
        let mut r = self.http.post(self.url(path)).json(body);
        if let Some(k) = key {
            r = r.header("Idempotency-Key", k);
        }
        r.send().await.unwrap()
    }
}

fn with_defaults(defaults: &str) -> Scenario {
    let mut text = mix_scenario_text();
    text.push_str("\n[defaults]\n");
    text.push_str(defaults);
    Scenario::from_toml(&text).unwrap()
}

fn mix_scenario_text() -> String {
    r#"
    seed = 3
    [outcomes]
    unknown_ticket = 0.1
    nothing_due = 0.1
    amount_minor = [100, 300]
    rejected = { registry = 0.1, fraud = 0.05 }
    payment_failure = { gateway = 0.1, receipt = 0.05 }
    "#
    .to_string()
}

fn find(s: &Scenario, pred: impl Fn(&TicketOutcome) -> bool) -> String {
    (0..100_000)
        .map(|i| format!("T-{i}"))
        .find(|id| pred(&outcome_for(s, id)))
        .expect("some ticket has that fate")
}

fn op_body(ticket_id: &str, minor: i64) -> Value {
    json!({
        "batch_id": "B-1",
        "ticket_id": ticket_id,
        "client_id": "C-1",
        "authority": "city",
        "amount": { "minor": minor, "currency": "EUR" },
    })
}

#[tokio::test]
async fn root_and_stats_list_all_nine_providers() {
    let sc = with_defaults("rate_limit = 50\nconcurrency_limit = 5\n");
    let srv = Server::start(sc).await;
    let root: Value = srv.http.get(srv.url("/")).send().await.unwrap().json().await.unwrap();
    assert_eq!(root["service"], "ticketpay-providers");
    assert_eq!(root["scenario"], "custom");

    let stats = srv.stats().await;
    let obj = stats.as_object().unwrap();
    assert_eq!(obj.len(), 9);
    for p in ProviderName::ALL {
        let s = &stats[p.as_str()];
        for k in [
            "requests",
            "peak_in_flight",
            "peak_rps",
            "limit_rps",
            "limit_in_flight",
            "throttled",
            "errors",
            "timeouts",
        ] {
            assert!(s[k].is_u64(), "{p}.{k} missing: {s}");
        }
        assert_eq!(s["limit_rps"], 50);
        assert_eq!(s["limit_in_flight"], 5);
        assert_eq!(s["charges"].is_u64(), p.takes_money(), "{p}");
        assert_eq!(s["duplicate_charges"].is_u64(), p.takes_money(), "{p}");
        let keyed = !matches!(
            p,
            ProviderName::Authority
                | ProviderName::Registry
                | ProviderName::Fraud
                | ProviderName::Sanctions
        );
        assert_eq!(s["duplicates"].is_u64(), keyed, "{p}");
    }
}

#[tokio::test]
async fn lookup_answers_amount_and_currency() {
    let sc = with_defaults("");
    let srv = Server::start(sc.clone()).await;
    let due = find(&sc, |o| o.pays());
    let expected = outcome_for(&sc, &due).amount_minor;

    let url = srv.url(&format!("/authority/city-of-x/tickets/{due}"));
    let r = srv.http.get(&url).query(&[("currency", "USD")]).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let l: LookupResponse = r.json().await.unwrap();
    assert_eq!(
        (l.ticket_id.as_str(), l.authority.as_str(), l.status),
        (due.as_str(), "city-of-x", DueStatus::Due)
    );
    assert_eq!((l.amount_due.minor, l.amount_due.currency.as_str()), (expected, "USD"));

    let l: LookupResponse = srv.http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(l.amount_due.currency, "EUR");

    let nothing = find(&sc, |o| o.nothing_due);
    let l: LookupResponse = srv
        .http
        .get(srv.url(&format!("/authority/a/tickets/{nothing}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((l.status, l.amount_due.minor), (DueStatus::NothingDue, 0));

    let unknown = find(&sc, |o| o.unknown);
    let r = srv.http.get(srv.url(&format!("/authority/a/tickets/{unknown}"))).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let e: ProviderError = r.json().await.unwrap();
    assert_eq!(e.error, "unknown_ticket");

    let r = srv.http.get(&url).query(&[("currency", "euros")]).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    assert_eq!(srv.stats().await["authority"]["requests"], 5);
}

#[tokio::test]
async fn validators_reject_their_tickets() {
    let sc = with_defaults("");
    let srv = Server::start(sc.clone()).await;
    let rejected = find(&sc, |o| o.rejected_by == Some(ProviderName::Fraud));
    let body = op_body(&rejected, 100);
    let fraud: CheckResponse =
        srv.op("/fraud/checks", None, &body).await.json().await.unwrap();
    assert_eq!(fraud.decision, Decision::Reject);
    assert!(fraud.reason.is_some());
    let registry: CheckResponse =
        srv.op("/registry/checks", None, &body).await.json().await.unwrap();
    assert_eq!(registry, CheckResponse { decision: Decision::Approve, reason: None });

    let r = srv.op("/sanctions/checks", None, &json!({"ticket_id": 3})).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let e: ProviderError = r.json().await.unwrap();
    assert_eq!(e.error, "bad_request");
}

#[tokio::test]
async fn keyed_operations_are_idempotent_and_count_duplicates() {
    let sc = with_defaults("");
    let srv = Server::start(sc.clone()).await;
    let t = find(&sc, |o| o.pays());
    let body = op_body(&t, 1234);

    let r = srv.http.get(srv.url("/gateway/operations/k-1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let _: ProviderError = r.json().await.unwrap();

    let r = srv.op("/gateway/capture", Some("k-1"), &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let first: OperationResponse = r.json().await.unwrap();
    assert_eq!((first.operation.as_str(), first.idempotency_key.as_str()), ("capture", "k-1"));
    assert_eq!(first.amount.minor, 1234);

    let again: OperationResponse =
        srv.op("/gateway/capture", Some("k-1"), &body).await.json().await.unwrap();
    assert_eq!(again, first);

    let r = srv.http.get(srv.url("/gateway/operations/k-1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<OperationResponse>().await.unwrap(), first);
    // Keys are per provider.
    let r = srv.http.get(srv.url("/ledger/operations/k-1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let r = srv.op("/gateway/capture", Some("k-2"), &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = srv.op("/gateway/refund", Some("k-3"), &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = srv.op("/gateway/refund", Some("k-3"), &body).await;
    assert_eq!(r.status(), StatusCode::OK);

    // The same key for another operation is refused.
    let r = srv.op("/gateway/refund", Some("k-1"), &body).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let g = &srv.stats().await["gateway"];
    assert_eq!(g["charges"], 2);
    assert_eq!(g["duplicate_charges"], 1);
    assert_eq!(g["duplicates"], 3);
    assert_eq!(g["applied"], 3);
    assert_eq!(g["requests"], 8);

    let ledger: OperationResponse =
        srv.op("/ledger/post", Some("k-1"), &body).await.json().await.unwrap();
    assert_ne!(ledger.id, first.id);
    let n = srv.op("/notifier/notify", Some("n-1"), &body).await;
    assert_eq!(n.status(), StatusCode::OK);
}

#[tokio::test]
async fn bad_keyed_requests_are_refused() {
    let sc = with_defaults("");
    let srv = Server::start(sc.clone()).await;
    let t = find(&sc, |o| o.pays());
    let body = op_body(&t, 100);

    let r = srv.op("/gateway/capture", None, &body).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<ProviderError>().await.unwrap().error, "missing_idempotency_key");

    let r = srv
        .http
        .post(srv.url("/settlement/settle"))
        .header("Idempotency-Key", "x")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<ProviderError>().await.unwrap().error, "bad_request");

    for path in ["/gateway/settle", "/bank/capture", "/authority/capture", "/notifier/unnotify"] {
        let r = srv.op(path, Some("x"), &body).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        let _: ProviderError = r.json().await.unwrap();
    }
    let r = srv.http.get(srv.url("/nowhere/at/all/here")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let _: ProviderError = r.json().await.unwrap();
    let r = srv.http.get(srv.url("/gateway/capture")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let _: ProviderError = r.json().await.unwrap();
    let r = srv.http.get(srv.url("/fraud/operations/x")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    assert_eq!(srv.stats().await["settlement"]["charges"], 0);
}

#[tokio::test]
async fn payment_failures_decline_the_forward_step_only() {
    let sc = with_defaults("");
    let srv = Server::start(sc.clone()).await;
    let t = find(&sc, |o| o.fails_at == Some(ProviderName::Gateway));
    let body = op_body(&t, 150);

    let r = srv.op("/gateway/capture", Some("d-1"), &body).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let e: ProviderError = r.json().await.unwrap();
    assert_eq!(e.error, "declined");
    assert!(e.reason.is_some());
    let r = srv.http.get(srv.url("/gateway/operations/d-1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // Compensations and other providers go through.
    assert_eq!(srv.op("/gateway/refund", Some("d-2"), &body).await.status(), StatusCode::OK);
    assert_eq!(srv.op("/settlement/settle", Some("d-3"), &body).await.status(), StatusCode::OK);

    let g = &srv.stats().await["gateway"];
    assert_eq!((g["charges"].as_u64(), g["declined"].as_u64()), (Some(0), Some(1)));
}

#[tokio::test]
async fn rate_limit_answers_429_and_is_measured() {
    let sc = with_defaults("rate_limit = 10\n");
    let srv = Server::start(sc.clone()).await;
    let t = find(&sc, |o| o.pays());
    let body = op_body(&t, 100);

    let sends = (0..30).map(|_| srv.op("/registry/checks", None, &body));
    let responses = futures::future::join_all(sends).await;
    let mut ok = 0;
    let mut throttled = 0;
    for r in &responses {
        match r.status() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(r.headers()["retry-after"], "1");
                throttled += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!(throttled >= 10, "{ok} ok, {throttled} throttled");
    assert!((10..=20).contains(&ok), "{ok} ok");
    let s = &srv.stats().await["registry"];
    assert_eq!(s["requests"], 30);
    assert_eq!(s["throttled"], throttled);
    assert!(s["peak_rps"].as_u64().unwrap() >= 15, "{s}");
    assert_eq!(s["limit_rps"], 10);
    // Other providers are untouched.
    assert_eq!(srv.stats().await["fraud"]["requests"], 0);
}

#[tokio::test]
async fn concurrency_limit_answers_429() {
    let sc = with_defaults("latency_ms = [300, 300]\nconcurrency_limit = 4\n");
    let srv = Server::start(sc.clone()).await;
    let t = find(&sc, |o| o.pays());
    let body = op_body(&t, 100);

    let sends = (0..12).map(|i| {
        let key = format!("c-{i}");
        let body = body.clone();
        let srv = &srv;
        async move { srv.op("/ledger/post", Some(&key), &body).await.status() }
    });
    let statuses = futures::future::join_all(sends).await;
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let throttled = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!((ok, throttled), (4, 8), "{statuses:?}");
    let s = &srv.stats().await["ledger"];
    assert_eq!(s["throttled"], 8);
    assert_eq!(s["applied"], 4);
    assert!(s["peak_in_flight"].as_u64().unwrap() >= 4, "{s}");
    assert_eq!(s["in_flight"], 0);

    // Once they are done, the provider accepts again.
    assert_eq!(srv.op("/ledger/post", Some("c-late"), &body).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn transient_errors_apply_nothing() {
    let sc = with_defaults("error_rate = 1.0\n");
    let srv = Server::start(sc.clone()).await;
    let t = find(&sc, |o| o.pays());
    for i in 0..10 {
        let r = srv.op("/gateway/capture", Some(&format!("e-{i}")), &op_body(&t, 100)).await;
        assert!(
            [StatusCode::INTERNAL_SERVER_ERROR, StatusCode::SERVICE_UNAVAILABLE]
                .contains(&r.status())
        );
        let _: ProviderError = r.json().await.unwrap();
    }
    let g = &srv.stats().await["gateway"];
    assert_eq!((g["errors"].as_u64(), g["charges"].as_u64()), (Some(10), Some(0)));
}

#[tokio::test]
async fn timeouts_hang_and_sometimes_apply() {
    let sc = with_defaults("timeout_rate = 1.0\nhang_ms = 200\n");
    let srv = Server::start(sc.clone()).await;
    let t = find(&sc, |o| o.pays());
    let started = Instant::now();
    let sends = (0..40).map(|i| {
        let body = op_body(&t, 100);
        let srv = &srv;
        async move { srv.op("/settlement/settle", Some(&format!("h-{i}")), &body).await.status() }
    });
    let statuses = futures::future::join_all(sends).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(statuses.iter().all(|s| *s == StatusCode::GATEWAY_TIMEOUT), "{statuses:?}");
    let s = &srv.stats().await["settlement"];
    assert_eq!(s["timeouts"], 40);
    // About half were applied before hanging (all or none: 1 in 2^39).
    let charges = s["charges"].as_u64().unwrap();
    assert!(charges > 0 && charges < 40, "{charges}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_up_without_latency() {
    let srv = Server::start(Scenario::load(Some("zero-latency")).unwrap()).await;
    let sc = Scenario::load(Some("zero-latency")).unwrap();
    let t = find(&sc, |o| o.pays());
    let body = op_body(&t, 100);
    let n = 2000;
    let started = Instant::now();
    let results = futures::stream::iter(0..n)
        .map(|i| {
            let srv = &srv;
            let body = &body;
            async move { srv.op("/ledger/post", Some(&format!("z-{i}")), body).await.status() }
        })
        .buffer_unordered(32);
    let statuses: Vec<_> = results.collect().await;
    let elapsed = started.elapsed();
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    assert_eq!(srv.stats().await["ledger"]["applied"], n);
    assert!(elapsed < Duration::from_secs(10), "{n} requests took {elapsed:?}");
}

/// As at a real provider, a request whose caller hung up is seen through:
/// it keeps its place in flight until it is done.
#[tokio::test]
async fn a_caller_giving_up_does_not_free_its_place_until_the_request_is_done() {
    let sc = with_defaults("timeout_rate = 1.0\nhang_ms = 1500\nconcurrency_limit = 2\n");
    let srv = Server::start(sc.clone()).await;
    let t = find(&sc, |o| o.pays());
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(200)).build().unwrap();
    let started = std::time::Instant::now();
    let r = impatient
        .post(srv.url("/receipt/issue"))
        .header("Idempotency-Key", "gone")
        .json(&op_body(&t, 100))
        .send()
        .await;
    assert!(r.unwrap_err().is_timeout());
    let s = srv.stats().await["receipt"].clone();
    assert_eq!(s["in_flight"].as_u64(), Some(1), "still being worked on: {s}");
    loop {
        let s = srv.stats().await["receipt"].clone();
        if s["in_flight"].as_u64() == Some(0) {
            assert!(started.elapsed() >= Duration::from_millis(1400), "held for its hang: {:?}", started.elapsed());
            assert_eq!(s["timeouts"].as_u64(), Some(1), "{s}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the hung request ends: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_outage_takes_one_provider_down_for_a_while_and_it_comes_back() {
    let sc = with_defaults("hang_ms = 50\n");
    let srv = Server::start(sc.clone()).await;
    let ticket = find(&sc, |o| o.pays());
    let outage = |provider: &str, kind: &str, seconds: u64| {
        let body = json!({"provider": provider, "kind": kind, "seconds": seconds});
        srv.http.post(srv.url("/admin/outages")).json(&body).send()
    };
    let lookup = || srv.http.get(srv.url(&format!("/authority/city/tickets/{ticket}"))).send();

    assert_eq!(outage("authority", "down", 60).await.unwrap().status(), StatusCode::OK);
    assert_eq!(lookup().await.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    let capture = srv.op("/gateway/capture", Some("k-1"), &op_body(&ticket, 200)).await;
    assert_eq!(capture.status(), StatusCode::OK, "only the authority is down");

    assert_eq!(outage("authority", "throttle", 60).await.unwrap().status(), StatusCode::OK);
    let throttled = lookup().await.unwrap();
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(throttled.headers()["retry-after"], "1");

    assert_eq!(outage("authority", "hang", 60).await.unwrap().status(), StatusCode::OK);
    assert_eq!(lookup().await.unwrap().status(), StatusCode::GATEWAY_TIMEOUT);

    assert_eq!(outage("authority", "down", 0).await.unwrap().status(), StatusCode::OK);
    assert_eq!(lookup().await.unwrap().status(), StatusCode::OK, "back once the outage is over");
    let stats = srv.stats().await;
    assert_eq!((stats["authority"]["errors"].as_u64(), stats["authority"]["throttled"].as_u64(), stats["authority"]["timeouts"].as_u64()), (Some(1), Some(1), Some(1)));

    let bad = outage("nobody", "down", 5).await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_key_whose_abandoned_request_may_still_arrive_is_neither_sent_again_nor_asked_about() {
    use crate::domain::Stage;
    use crate::providers::client::{CallError, Caller, ProviderClient, ProviderEndpoints, Providers};
    use crate::providers::limits::ClientConfig;
    use crate::providers::redact::Redactor;
    use crate::providers::wire::{OperationRequest, WireMoney};

    let sc = with_defaults("timeout_rate = 1.0\nhang_ms = 1500\n");
    let srv = Server::start(sc.clone()).await;
    let t = find(&sc, |o| o.pays());
    let config = ClientConfig::from_scenario(&Scenario::from_toml("[client]\ntimeout_ms = 200\n").unwrap());
    let base_urls = ProviderName::ALL.into_iter().map(|p| (p, format!("{}/{p}", srv.base))).collect();
    let client = ProviderClient::new(ProviderEndpoints { base_urls, api_keys: Default::default() }, &config, Redactor::new(&[], &[]));
    let caller = Caller { batch_id: "B-1", ticket_id: &t, client_id: "ops", stage: Stage::Pay, attempt: 0 };
    let request = OperationRequest {
        batch_id: "B-1".into(),
        ticket_id: t.clone(),
        client_id: "ops".into(),
        authority: "CITY-PARKING".into(),
        amount: WireMoney { minor: 100, currency: "EUR".into() },
        message: None,
    };
    let received = || async { srv.stats().await["receipt"]["requests"].as_u64().unwrap() };
    fn not_sent<T>(r: &Result<T, CallError>) -> bool {
        matches!(r, Err(CallError::Transient { error }) if error.contains("may still reach"))
    }

    let first = client.operate(ProviderName::Receipt, "issue", "k-1", &request, &caller).await;
    assert!(matches!(first.result, Err(CallError::Transient { .. })), "{:?}", first.result);
    let again = client.operate(ProviderName::Receipt, "issue", "k-1", &request, &caller).await;
    let asked = client.operation_status(ProviderName::Receipt, "k-1", &caller).await;
    let other = client.operate(ProviderName::Receipt, "issue", "k-2", &request, &caller).await;
    assert!(not_sent(&again.result), "{:?}", again.result);
    assert!(not_sent(&asked.result), "{:?}", asked.result);
    assert!(again.exchange.response.is_none() && asked.exchange.response.is_none(), "recorded as not sent");
    assert!(!not_sent(&other.result), "another key goes out: {:?}", other.result);
    assert_eq!(received().await, 2, "k-1 once, k-2 once");

    let started = Instant::now();
    while srv.stats().await["receipt"]["in_flight"].as_u64() != Some(0) {
        assert!(started.elapsed() < Duration::from_secs(10), "the hung requests end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = client.operation_status(ProviderName::Receipt, "k-1", &caller).await;
    assert!(!not_sent(&after.result), "{:?}", after.result);
    assert_eq!(received().await, 3, "asked once nothing of k-1 is on its way");
}
