//! The provider-bound floor: the least time any client could take to make the
//! requests a batch needs, given each provider's rate limit, concurrency limit
//! and latency. Pure arithmetic on the scenario and the request counts.

use std::collections::BTreeMap;

use crate::providers::ProviderName;
use crate::providers::simulator::{ProviderSettings, Scenario};

/// The floor and the provider that sets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Floor {
    pub seconds: f64,
    pub bottleneck: Option<ProviderName>,
}

/// The time one provider needs for `requests`: no faster than its rate limit
/// allows, nor than its concurrency limit allows at its mean latency.
pub fn provider_seconds(settings: &ProviderSettings, requests: u64) -> f64 {
    let n = requests as f64;
    // N requests at R per second span (N - 1) / R seconds: the first goes at once.
    let by_rate = if settings.rate_limit > 0 { (n - 1.0).max(0.0) / f64::from(settings.rate_limit) } else { 0.0 };
    let by_concurrency =
        if settings.concurrency_limit > 0 { n * mean_latency(settings) / f64::from(settings.concurrency_limit) } else { 0.0 };
    by_rate.max(by_concurrency)
}

pub fn mean_latency(settings: &ProviderSettings) -> f64 {
    let [lo, hi] = settings.latency_ms;
    (lo + hi) as f64 / 2000.0
}

fn min_latency(settings: &ProviderSettings) -> f64 {
    settings.latency_ms[0] as f64 / 1000.0
}

/// The floor for a batch that needs `requests` per provider: the busiest
/// provider's time, plus the least latency of its last answer and, after it,
/// of the notification every ticket ends with.
pub fn floor(scenario: &Scenario, requests: &BTreeMap<ProviderName, u64>) -> Floor {
    let notify = min_latency(scenario.provider(ProviderName::Notifier));
    let busiest = requests
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(&provider, &n)| {
            let settings = scenario.provider(provider);
            let tail = min_latency(settings) + if provider == ProviderName::Notifier { 0.0 } else { notify };
            (provider, provider_seconds(settings, n) + tail)
        })
        .filter(|(_, seconds)| *seconds > 0.0)
        .max_by(|a, b| a.1.total_cmp(&b.1));
    Floor { seconds: busiest.map_or(0.0, |b| b.1), bottleneck: busiest.map(|b| b.0) }
}

/// The mean time one ticket takes when every call of a full journey is made
/// one after the other: what the naive way costs per ticket.
pub fn sequential_journey_seconds(scenario: &Scenario) -> f64 {
    ProviderName::ALL.into_iter().map(|p| mean_latency(scenario.provider(p))).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests(pairs: &[(ProviderName, u64)]) -> BTreeMap<ProviderName, u64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn the_busiest_provider_at_its_rate_limit_sets_the_floor() {
        let scenario = Scenario::load(Some("realistic")).unwrap();
        let f = floor(&scenario, &requests(&[(ProviderName::Authority, 5001), (ProviderName::Gateway, 4000), (ProviderName::Notifier, 5000)]));
        assert_eq!(f.bottleneck, Some(ProviderName::Authority));
        // 5,000 gaps at 100 req/s, then at least 20 ms for the answer and 10 ms for the notification.
        assert!((f.seconds - 50.03).abs() < 1e-9, "{f:?}");
    }

    #[test]
    fn a_slow_provider_with_few_slots_is_bound_by_concurrency() {
        let scenario = Scenario::from_toml(
            "[defaults]\nlatency_ms = [1000, 1000]\nrate_limit = 100\nconcurrency_limit = 10\n",
        )
        .unwrap();
        let f = floor(&scenario, &requests(&[(ProviderName::Gateway, 100)]));
        // 100 requests of 1 s, 10 at a time: 10 s, then the last answer's 1 s and the notification's 1 s.
        assert!((f.seconds - 12.0).abs() < 1e-9, "{f:?}");
    }

    #[test]
    fn without_limits_or_latency_there_is_no_floor() {
        let scenario = Scenario::load(Some("zero-latency")).unwrap();
        let f = floor(&scenario, &requests(&[(ProviderName::Authority, 5000)]));
        assert_eq!((f.seconds, f.bottleneck), (0.0, None));
        assert_eq!(sequential_journey_seconds(&scenario), 0.0);
    }

    #[test]
    fn a_full_journey_one_call_after_another_sums_the_mean_latencies() {
        let scenario = Scenario::load(Some("realistic")).unwrap();
        // Seven providers at 20-200 ms, the gateway at 50-250 ms, the notifier at 10-60 ms.
        assert!((sequential_journey_seconds(&scenario) - (7.0 * 0.11 + 0.15 + 0.035)).abs() < 1e-9);
    }
}
