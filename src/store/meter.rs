//! What the store's requests cost: Cosmos DB request units, as each response
//! charged them, kept per container, per operation kind, per stage and per
//! logical partition (with each partition's busiest second). The Cosmos store
//! feeds it; the benchmark reads it; every charge is also a span attribute.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

tokio::task_local! {
    /// The pipeline step on whose behalf the current task asks the store.
    static WORKING_FOR: &'static str;
}

/// Runs `work` with its store charges counted against `step` (a stage's name, `api`, `sweep`).
pub async fn working_for<F: Future>(step: &'static str, work: F) -> F::Output {
    WORKING_FOR.scope(step, work).await
}

/// The step the current task works for; `other` outside [`working_for`].
pub fn current_step() -> &'static str {
    WORKING_FOR.try_with(|s| *s).unwrap_or("other")
}

/// One partition's load: its total, and the most it took in any one second.
#[derive(Debug, Default, Clone)]
struct PartitionLoad {
    total: f64,
    second: u64,
    in_second: f64,
    peak: f64,
}

impl PartitionLoad {
    fn add(&mut self, second: u64, ru: f64) {
        if second != self.second {
            self.second = second;
            self.in_second = 0.0;
        }
        self.in_second += ru;
        self.total += ru;
        self.peak = self.peak.max(self.in_second);
    }
}

#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    throttled: u64,
    unanswered: u64,
    total: f64,
    by_operation: BTreeMap<String, f64>,
    by_step: BTreeMap<&'static str, f64>,
    containers: HashMap<String, PartitionLoad>,
    partitions: HashMap<String, PartitionLoad>,
}

/// Request units charged so far, by where they went.
#[derive(Debug, Default)]
pub struct Meter {
    tally: Mutex<Tally>,
}

/// What a [`Meter`] has counted, as the benchmark reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Charges {
    pub requests: u64,
    /// Attempts answered 429 (each retried by the SDK or by a later delivery).
    pub throttled: u64,
    /// Writes whose answer never came, found landed when read back.
    #[serde(default)]
    pub unanswered: u64,
    pub total_ru: f64,
    /// `{container} {operation}` → RU.
    pub by_operation: BTreeMap<String, f64>,
    /// Stage (or `api`, `sweep`) → RU.
    pub by_step: BTreeMap<String, f64>,
    /// Container → the most it took in one second (what its provisioned throughput must cover).
    #[serde(default)]
    pub container_peak_ru_per_s: BTreeMap<String, f64>,
    /// The logical partition that took the most in one second, and that most.
    pub hottest_partition: Option<String>,
    pub hottest_partition_peak_ru_per_s: f64,
    /// The logical partition that took the most over the whole run, and its total.
    pub heaviest_partition: Option<String>,
    pub heaviest_partition_ru: f64,
}

impl Meter {
    /// Counts one request: `operation` on `container` in logical partition `partition`.
    pub fn charge(&self, container: &str, operation: &str, partition: &str, ru: f64, throttled: u64) {
        self.charge_at(container, operation, partition, ru, throttled, unix_second());
    }

    fn charge_at(&self, container: &str, operation: &str, partition: &str, ru: f64, throttled: u64, second: u64) {
        let step = current_step();
        let mut t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        t.requests += 1;
        t.throttled += throttled;
        t.total += ru;
        *t.by_operation.entry(format!("{container} {operation}")).or_default() += ru;
        *t.by_step.entry(step).or_default() += ru;
        load(&mut t.containers, container).add(second, ru);
        load(&mut t.partitions, partition).add(second, ru);
    }

    /// Counts `n` refusals for throughput that no single request's answer showed
    /// (an operation of a transactional batch answered 429).
    pub fn throttled(&self, n: u64) {
        self.tally.lock().unwrap_or_else(|p| p.into_inner()).throttled += n;
    }

    /// Counts a write whose answer never came and that was found landed.
    pub fn unanswered(&self) {
        self.tally.lock().unwrap_or_else(|p| p.into_inner()).unanswered += 1;
    }

    pub fn charges(&self) -> Charges {
        let t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        let hottest = t.partitions.iter().max_by(|a, b| a.1.peak.total_cmp(&b.1.peak));
        let heaviest = t.partitions.iter().max_by(|a, b| a.1.total.total_cmp(&b.1.total));
        Charges {
            requests: t.requests,
            throttled: t.throttled,
            unanswered: t.unanswered,
            total_ru: t.total,
            by_operation: t.by_operation.clone(),
            by_step: t.by_step.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            container_peak_ru_per_s: t.containers.iter().map(|(k, l)| (k.clone(), l.peak)).collect(),
            hottest_partition: hottest.map(|(k, _)| k.clone()),
            hottest_partition_peak_ru_per_s: hottest.map_or(0.0, |(_, l)| l.peak),
            heaviest_partition: heaviest.map(|(k, _)| k.clone()),
            heaviest_partition_ru: heaviest.map_or(0.0, |(_, l)| l.total),
        }
    }
}

fn load<'a>(loads: &'a mut HashMap<String, PartitionLoad>, key: &str) -> &'a mut PartitionLoad {
    if !loads.contains_key(key) {
        loads.insert(key.to_owned(), PartitionLoad::default());
    }
    loads.get_mut(key).expect("inserted above")
}

fn unix_second() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn charges_add_up_by_operation_step_and_partition_with_each_partitions_busiest_second() {
        let m = Meter::default();
        working_for("reserve", async {
            m.charge_at("batches", "replace", "b-1", 10.0, 0, 100);
            m.charge_at("batches", "replace", "b-1", 15.0, 0, 100);
            m.charge_at("batches", "read", "b-2", 1.0, 0, 100);
        })
        .await;
        m.charge_at("batches", "replace", "b-1", 20.0, 1, 101);
        m.charge_at("batches", "read", "b-2", 30.0, 0, 102);

        let c = m.charges();
        assert_eq!((c.requests, c.throttled, c.total_ru), (5, 1, 76.0));
        assert_eq!(c.by_operation["batches replace"], 45.0);
        assert_eq!(c.by_operation["batches read"], 31.0);
        assert_eq!(c.by_step["reserve"], 26.0);
        assert_eq!(c.by_step["other"], 50.0);
        assert_eq!(c.container_peak_ru_per_s["batches"], 30.0, "26 in second 100, 20 in 101, 30 in 102");
        assert_eq!((c.hottest_partition.as_deref(), c.hottest_partition_peak_ru_per_s), (Some("b-2"), 30.0));
        assert_eq!((c.heaviest_partition.as_deref(), c.heaviest_partition_ru), (Some("b-1"), 45.0));
    }
}
