//! The Cosmos store on the SDK's in-memory emulator (a build with the
//! `cosmos-emulator` feature): the account it stands for, what its writes
//! would cost, and the faults of a real account it is asked to show.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use azure_core::credentials::Secret;
use azure_core::http::StatusCode;
use azure_data_cosmos::{AccountReference, CosmosClient, CosmosRuntimeBuilder, RoutingStrategy};
use azure_data_cosmos_driver::fault_injection::{
    CustomResponseBuilder, FaultInjectionConditionBuilder, FaultInjectionErrorType, FaultInjectionResult, FaultInjectionResultBuilder,
    FaultInjectionRule, FaultInjectionRuleBuilder, FaultOperationType,
};
use azure_data_cosmos_driver::in_memory_emulator::{
    ContainerConfig, InMemoryEmulatorHttpClient, RequestUnitChargingModel, VirtualAccountConfig, VirtualRegion,
};

use super::transaction::Write;
use super::{map_err, CosmosStore, CONTAINERS, RECORDS};
use crate::config::Emulation;
use crate::store::{Result, StoreError};

impl CosmosStore {
    /// The store on the SDK's in-memory Cosmos emulator, in this process: a new, empty
    /// account with the database and both containers, charging request units by the
    /// emulator's model and, given a throughput, holding each container to it
    /// ([`Provisioned`]), with the faults `emulation` names injected by the SDK
    /// (throttled transactional batches, answers lost after the write applied).
    pub async fn emulated(emulation: Emulation) -> Result<CosmosStore> {
        const URL: &str = "https://local.emulator.local";
        const DATABASE: &str = "ticketpay";
        const REGION: &str = "East US";
        let unavailable = |e: &dyn std::fmt::Display| StoreError::Unavailable(format!("cosmos emulator: {e}"));
        let regions = vec![VirtualRegion::new(REGION, URL.parse().map_err(|e| unavailable(&e))?)];
        let ru_per_second = emulation.ru_per_second;
        let account = VirtualAccountConfig::new(regions).map_err(|e| unavailable(&e))?;
        let emulator = Arc::new(InMemoryEmulatorHttpClient::new(account));
        emulator.store().create_database(DATABASE);
        for (name, path) in CONTAINERS {
            // The emulator copies a physical partition's documents to run a transactional batch
            // on it: enough of them that a batch's ticket partitions rarely share one.
            let partitions = if name == RECORDS { EMULATED_PARTITIONS } else { 1 };
            let mut config = ContainerConfig::new().with_partition_count(partitions);
            if let Some(ru) = ru_per_second {
                // The offer, as the account shows it; held to by `Provisioned`, not the emulator.
                config = config.with_throughput(ru);
            }
            let config = config.build().map_err(|e| unavailable(&e))?;
            let pk = serde_json::from_value(serde_json::json!({"paths": [path], "kind": "Hash", "version": 2})).map_err(|e| unavailable(&e))?;
            emulator.store().create_container_with_config(DATABASE, name, pk, config);
        }
        let provisioned: Vec<Arc<Provisioned>> = ru_per_second.map(|ru| CONTAINERS.iter().map(|(name, _)| Provisioned::new(name, ru)).collect()).unwrap_or_default();
        let mut faults: Vec<_> = provisioned.iter().flat_map(|p| p.refusals()).collect();
        faults.extend(self::faults(emulation));
        let runtime = if faults.is_empty() { emulator.runtime_builder() } else { emulator.runtime_builder_with_fault_rules(faults) };
        let runtime = CosmosRuntimeBuilder::from(runtime).build().await.map_err(|e| unavailable(&e))?;
        let account = AccountReference::with_authentication_key(URL.parse().map_err(|e| unavailable(&e))?, Secret::new("bG9jYWw="));
        let client = CosmosClient::builder()
            .with_runtime(runtime)
            .build(account, RoutingStrategy::ProximityTo(REGION.into()))
            .await
            .map_err(|e| map_err("cosmos emulator", e))?;
        let store = Self::new(client, DATABASE).await?;
        let spent = (!provisioned.is_empty()).then(|| -> super::Spent {
            Arc::new(move |container, ru| {
                if let Some(p) = provisioned.iter().find(|p| p.container == container) {
                    p.spend(ru);
                }
            })
        });
        Ok(CosmosStore { pricer: Some(emulator_price), spent, ..store })
    }
}

/// The physical partitions of the emulated records container: as many as a
/// cross-partition query may fan out to (the SDK refuses more than 100).
const EMULATED_PARTITIONS: u32 = 100;

/// How long a throttled transactional batch is told to wait: as the service says
/// when a partition's second is spent, a fraction of a second.
const THROTTLED_RETRY_AFTER_MS: u64 = 25;

/// A container's provisioned throughput, held to as the service holds it: every
/// request's charge counts against it, second by second. Once a second's
/// throughput is spent, every data request to the container is answered 429
/// (sub-status 3200) by the SDK's fault rules before it reaches the emulator,
/// told to retry once the container has throughput again. What a second's
/// requests took past its throughput is taken from the next seconds', so the
/// container never runs above its rate for long.
///
/// The emulator's own enforcement (`with_throughput`) is not used for it: it
/// counts single-document writes only, not the transactional batches, reads and
/// queries that are most of what the store asks, and splits the throughput over
/// the emulator's physical partitions, which it needs many of to run
/// transactional batches fast. In Azure a container has one physical partition
/// per 10,000 RU/s; this count is the whole container's, as one partition's is up
/// to that.
struct Provisioned {
    container: &'static str,
    ru_per_second: f64,
    usage: Mutex<Usage>,
    /// One refusal per retry-after, shortest first; at most one enabled at a time.
    refusals: Vec<(Duration, Vec<Arc<FaultInjectionRule>>)>,
}

struct Usage {
    /// The start of the current second.
    second: Instant,
    /// Request units taken in it, with what earlier seconds took past theirs.
    ru: f64,
    /// Whether a refusal is enabled (and a task will lift it).
    refusing: bool,
}

/// The retry-afters a throttled request may be told, in milliseconds: the
/// shortest at or past the time the container has throughput again.
const RETRY_AFTERS_MS: [u64; 13] = [10, 25, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000];

/// The requests a container's throughput is charged for.
const DATA_REQUESTS: [FaultOperationType; 8] = [
    FaultOperationType::ReadItem,
    FaultOperationType::QueryItem,
    FaultOperationType::CreateItem,
    FaultOperationType::UpsertItem,
    FaultOperationType::ReplaceItem,
    FaultOperationType::DeleteItem,
    FaultOperationType::PatchItem,
    FaultOperationType::BatchItem,
];

const SECOND: Duration = Duration::from_secs(1);

impl Provisioned {
    fn new(container: &'static str, ru_per_second: u64) -> Arc<Provisioned> {
        let refusals = RETRY_AFTERS_MS
            .iter()
            .map(|&ms| {
                let refuse = |op| fault(container, &format!("over-throughput-{ms}ms"), op, throttled(100, ms));
                let rules = DATA_REQUESTS.iter().map(|&op| refuse(op)).collect::<Vec<_>>();
                rules.iter().for_each(|r| r.disable());
                (Duration::from_millis(ms), rules)
            })
            .collect();
        let usage = Mutex::new(Usage { second: Instant::now(), ru: 0.0, refusing: false });
        Arc::new(Provisioned { container, ru_per_second: ru_per_second as f64, usage, refusals })
    }

    /// Every rule, for the SDK's fault injection. They go before any other, so
    /// that a container out of throughput refuses first.
    fn refusals(&self) -> Vec<Arc<FaultInjectionRule>> {
        self.refusals.iter().flat_map(|(_, rules)| rules.iter().cloned()).collect()
    }

    /// Counts a request's charge, and starts refusing once the second's throughput is spent.
    fn spend(self: &Arc<Self>, ru: f64) {
        let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        self.roll(&mut usage, Instant::now());
        usage.ru += ru;
        if !usage.refusing && usage.ru >= self.ru_per_second {
            usage.refusing = true;
            let wait = self.refuse(&usage, Instant::now());
            let gate = Arc::clone(self);
            tokio::spawn(async move { gate.lift_after(wait).await });
        }
    }

    /// Moves to the current second, each second past paying back its throughput.
    fn roll(&self, usage: &mut Usage, now: Instant) {
        let seconds = now.saturating_duration_since(usage.second).as_secs();
        if seconds > 0 {
            usage.ru = (usage.ru - seconds as f64 * self.ru_per_second).max(0.0);
            usage.second += SECOND * u32::try_from(seconds).unwrap_or(u32::MAX);
        }
    }

    /// Refuses with the retry-after that ends at or just past the second in
    /// which the container has throughput again; the time until then.
    fn refuse(&self, usage: &Usage, now: Instant) -> Duration {
        let seconds_owed = (usage.ru / self.ru_per_second).floor();
        let open_at = usage.second + SECOND.mul_f64(seconds_owed);
        let wait = open_at.saturating_duration_since(now);
        let chosen = self.refusals.iter().position(|(after, _)| *after >= wait).unwrap_or(self.refusals.len() - 1);
        for (i, (_, rules)) in self.refusals.iter().enumerate() {
            rules.iter().for_each(|r| if i == chosen { r.enable() } else { r.disable() });
        }
        wait
    }

    /// Lifts the refusal once the container has throughput again, moving it to
    /// shorter retry-afters as that time comes nearer.
    async fn lift_after(&self, mut wait: Duration) {
        const RECHOOSE: Duration = Duration::from_millis(100);
        loop {
            tokio::time::sleep(wait.min(RECHOOSE).max(Duration::from_millis(1))).await;
            let now = Instant::now();
            let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
            self.roll(&mut usage, now);
            if usage.ru < self.ru_per_second {
                usage.refusing = false;
                self.refusals.iter().flat_map(|(_, rules)| rules).for_each(|r| r.disable());
                return;
            }
            wait = self.refuse(&usage, now);
        }
    }
}

/// The SDK's fault-injection rules for what `emulation` asks of the account.
fn faults(emulation: Emulation) -> Vec<Arc<FaultInjectionRule>> {
    let mut rules = Vec::new();
    if emulation.throttled_batches_percent > 0 {
        let throttled = throttled(emulation.throttled_batches_percent, THROTTLED_RETRY_AFTER_MS);
        rules.push(records_fault("throttled-batches", FaultOperationType::BatchItem, throttled));
    }
    if emulation.lost_answers_percent > 0 {
        let writes = [
            FaultOperationType::BatchItem,
            FaultOperationType::CreateItem,
            FaultOperationType::ReplaceItem,
            FaultOperationType::UpsertItem,
            FaultOperationType::DeleteItem,
            FaultOperationType::PatchItem,
        ];
        for write in writes {
            // Applied by the service, its answer then lost: the SDK reports a response timeout.
            let lost = FaultInjectionResultBuilder::new()
                .with_error(FaultInjectionErrorType::ResponseTimeoutAfterService)
                .with_probability(share(emulation.lost_answers_percent))
                .build();
            rules.push(records_fault("lost-answers", write, lost));
        }
    }
    rules
}

fn share(percent: u8) -> f32 {
    f32::from(percent) / 100.0
}

/// A fault on one kind of request to the records container.
fn records_fault(name: &str, operation: FaultOperationType, result: FaultInjectionResult) -> Arc<FaultInjectionRule> {
    fault(RECORDS, name, operation, result)
}

/// A fault on one kind of request to `container`.
fn fault(container: &str, name: &str, operation: FaultOperationType, result: FaultInjectionResult) -> Arc<FaultInjectionRule> {
    let condition = FaultInjectionConditionBuilder::new().with_operation_type(operation).with_container_id(container).build();
    Arc::new(FaultInjectionRuleBuilder::new(format!("{container}-{name}-{}", operation.as_str()), result).with_condition(condition).build())
}

/// `percent` of requests answered as the service answers one past its partition's
/// throughput: 429, sub-status 3200 (request rate too large), retry after
/// `retry_after_ms`, nothing applied.
fn throttled(percent: u8, retry_after_ms: u64) -> FaultInjectionResult {
    let answer = CustomResponseBuilder::new(StatusCode::TooManyRequests)
        .with_sub_status(3200)
        .with_header("x-ms-retry-after-ms", retry_after_ms.to_string())
        .with_header("x-ms-request-charge", "0")
        .with_body(br#"{"code":"TooManyRequests","message":"Request rate is large. Please retry after sometime."}"#.to_vec())
        .build();
    FaultInjectionResultBuilder::new().with_custom_response(answer).with_probability(share(percent)).build()
}

/// What the SDK's emulator would charge for a write sent on its own: its own
/// request-unit model, which it applies to single requests but not to the
/// operations of a transactional batch.
fn emulator_price(write: Write, size: usize, properties: usize) -> f64 {
    let model = RequestUnitChargingModel::default();
    match write {
        Write::Create => model.compute_create_ru(size, properties),
        Write::Replace | Write::Delete => model.compute_replace_or_delete_ru(size, properties),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled(p: &Provisioned) -> Vec<Duration> {
        p.refusals.iter().filter(|(_, rules)| rules.iter().all(|r| r.is_enabled())).map(|(after, _)| *after).collect()
    }

    #[test]
    fn a_spent_second_refuses_until_the_container_has_throughput_again_and_what_it_overran_is_paid_back_after() {
        let p = Provisioned::new(RECORDS, 1000);
        let start = Instant::now();
        let mut usage = Usage { second: start, ru: 2500.0, refusing: true };
        // 2,500 RU taken in the first second: the third second is the first with throughput left.
        let wait = p.refuse(&usage, start + Duration::from_millis(300));
        assert_eq!(wait, Duration::from_millis(1700));
        assert_eq!(enabled(&p), [Duration::from_millis(1000)], "the longest retry-after, then shorter ones as the time comes");
        p.roll(&mut usage, start + Duration::from_millis(1950));
        assert_eq!((usage.ru, usage.second), (1500.0, start + SECOND));
        assert_eq!(p.refuse(&usage, start + Duration::from_millis(1950)), Duration::from_millis(50));
        assert_eq!(enabled(&p), [Duration::from_millis(50)]);
        p.roll(&mut usage, start + Duration::from_millis(2001));
        assert_eq!((usage.ru, usage.second), (500.0, start + 2 * SECOND), "half of this second's throughput went to the first");
    }
}
