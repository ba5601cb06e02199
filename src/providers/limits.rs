//! Provider protection: each provider's rate and concurrency limits, never
//! exceeded by this process, and a pause when a provider says "slow down".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::ProviderName;

/// What the handler knows of a provider's contract (read from the same TOML
/// file as a simulator scenario: `[client]`, `[defaults]`, `[providers.NAME]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderLimits {
    /// Requests per second allowed (0 = unlimited).
    pub rate_limit: f64,
    /// Requests in flight allowed (0 = unlimited).
    pub concurrency_limit: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    pub timeout: Duration,
    /// Fraction of a provider's rate limit we allow ourselves, so network jitter
    /// never pushes us over it.
    pub rate_headroom: f64,
    pub providers: HashMap<ProviderName, ProviderLimits>,
}

fn number(table: Option<&toml::Value>, key: &str) -> Result<Option<f64>, String> {
    match table.and_then(|t| t.get(key)) {
        None => Ok(None),
        Some(toml::Value::Integer(i)) if *i >= 0 => Ok(Some(*i as f64)),
        Some(toml::Value::Float(f)) if *f >= 0.0 => Ok(Some(*f)),
        Some(v) => Err(format!("`{key}` must be a non-negative number, found {v}")),
    }
}

impl ClientConfig {
    pub fn from_toml(text: &str) -> Result<ClientConfig, String> {
        let doc: toml::Table = text.parse().map_err(|e| format!("invalid TOML: {e}"))?;
        let client = doc.get("client");
        let defaults = doc.get("defaults");
        let timeout_ms = number(client, "timeout_ms")?.unwrap_or(5_000.0);
        let rate_headroom = number(client, "rate_headroom")?.unwrap_or(0.9);
        if !(0.0 < rate_headroom && rate_headroom <= 1.0) {
            return Err("`client.rate_headroom` must be in (0, 1]".into());
        }
        let mut providers = HashMap::new();
        let overrides = doc.get("providers");
        for name in ProviderName::ALL {
            let own = overrides.and_then(|p| p.get(name.as_str()));
            let pick = |key: &str| -> Result<f64, String> {
                let value = number(own, key).map_err(|e| format!("providers.{name}: {e}"))?;
                Ok(value.or(number(defaults, key)?).unwrap_or(0.0))
            };
            let limits = ProviderLimits {
                rate_limit: pick("rate_limit")?,
                concurrency_limit: pick("concurrency_limit")? as u32,
            };
            providers.insert(name, limits);
        }
        Ok(ClientConfig { timeout: Duration::from_millis(timeout_ms as u64), rate_headroom, providers })
    }
}

/// How late past its slot a caller may still go.
const LATE_TOLERANCE: Duration = Duration::from_millis(20);

/// Spaces one provider's requests evenly at the allowed rate and caps how many
/// are in flight. Waiting callers queue in order; nobody spins.
pub struct Limiter {
    interval: Option<Duration>,
    next_slot: Mutex<Instant>,
    in_flight: Option<Arc<Semaphore>>,
}

impl Limiter {
    pub fn new(limits: &ProviderLimits, headroom: f64) -> Limiter {
        let rate = limits.rate_limit * headroom;
        Limiter {
            interval: (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate)),
            next_slot: Mutex::new(Instant::now()),
            in_flight: (limits.concurrency_limit > 0).then(|| Arc::new(Semaphore::new(limits.concurrency_limit as usize))),
        }
    }

    /// Waits for a place in flight and then for the next free slot in time.
    /// The permit is held until the provider is done with the request, which
    /// may be after its caller stopped waiting for the answer.
    pub async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        let permit = match &self.in_flight {
            Some(s) => Some(s.clone().acquire_owned().await.expect("the semaphore is never closed")),
            None => None,
        };
        if let Some(interval) = self.interval {
            // A caller that wakes well after its slot (the machine was busy) takes a
            // new one: late callers going all at once would be a burst past the limit.
            let tolerance = interval.max(LATE_TOLERANCE);
            loop {
                let slot = self.take_slot(interval);
                tokio::time::sleep_until(slot).await;
                if Instant::now().duration_since(slot) <= tolerance {
                    break;
                }
            }
        }
        permit
    }

    fn take_slot(&self, interval: Duration) -> Instant {
        let mut next = self.next_slot.lock().unwrap_or_else(|p| p.into_inner());
        let slot = (*next).max(Instant::now());
        *next = slot + interval;
        slot
    }

    /// The provider asked us to wait (429 Retry-After): nobody calls it before then.
    pub fn pause(&self, for_: Duration) {
        let mut next = self.next_slot.lock().unwrap_or_else(|p| p.into_inner());
        *next = (*next).max(Instant::now() + for_);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_come_from_defaults_and_overrides() {
        let cfg = ClientConfig::from_toml(
            "[client]\ntimeout_ms = 1500\n[defaults]\nrate_limit = 100\nconcurrency_limit = 32\nlatency_ms = [1, 2]\n[providers.gateway]\nrate_limit = 20\n",
        )
        .unwrap();
        assert_eq!(cfg.timeout, Duration::from_millis(1500));
        assert_eq!(cfg.providers[&ProviderName::Gateway], ProviderLimits { rate_limit: 20.0, concurrency_limit: 32 });
        assert_eq!(cfg.providers[&ProviderName::Fraud].rate_limit, 100.0);
        let err = ClientConfig::from_toml("[providers.ledger]\nrate_limit = \"fast\"\n").unwrap_err();
        assert!(err.contains("providers.ledger") && err.contains("rate_limit"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_are_spaced_at_the_allowed_rate() {
        let limiter = Limiter::new(&ProviderLimits { rate_limit: 10.0, concurrency_limit: 0 }, 1.0);
        let start = Instant::now();
        for _ in 0..11 {
            let _ = limiter.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::from_secs(1), "11 requests at 10/s take one second");
        limiter.pause(Duration::from_secs(5));
        let before = Instant::now();
        let _ = limiter.acquire().await;
        assert!(before.elapsed() >= Duration::from_secs(5));
    }

    #[tokio::test]
    async fn no_more_than_the_concurrency_limit_are_in_flight() {
        let limiter = Limiter::new(&ProviderLimits { rate_limit: 0.0, concurrency_limit: 2 }, 1.0);
        let a = limiter.acquire().await;
        let b = limiter.acquire().await;
        assert!(tokio::time::timeout(Duration::from_millis(50), limiter.acquire()).await.is_err());
        drop(a);
        assert!(tokio::time::timeout(Duration::from_millis(50), limiter.acquire()).await.is_ok());
        drop(b);
    }
}
