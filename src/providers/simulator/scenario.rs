//! Scenarios: how the simulated providers behave (latency, limits, faults) and
//! what each ticket's fate is. One TOML file, also read by the handler for its
//! own timeout and rate settings (`[client]`, `[defaults]`, `[providers.*]`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::domain::ProviderName;

/// The scenarios shipped with the binary, by name.
pub const SHIPPED: [(&str, &str); 3] = [
    ("realistic", include_str!("../../../scenarios/realistic.toml")),
    ("zero-latency", include_str!("../../../scenarios/zero-latency.toml")),
    ("faulty", include_str!("../../../scenarios/faulty.toml")),
];

/// The scenario used when none is named.
pub const DEFAULT_SCENARIO: &str = "realistic";

/// A parsed, validated scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// The shipped name, the file stem of a loaded file, or "custom".
    pub name: String,
    pub description: String,
    pub seed: u64,
    pub client: ClientSettings,
    pub outcomes: Outcomes,
    /// The `[defaults]` table as written (missing keys filled in).
    pub defaults: ProviderSettings,
    /// Every provider's effective settings: `[defaults]` overridden by
    /// `[providers.NAME]`. All nine are present.
    pub providers: BTreeMap<ProviderName, ProviderSettings>,
}

/// `[client]`: read by the handler, ignored by the simulator.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSettings {
    /// The handler's per-call timeout.
    pub timeout_ms: u64,
    /// Fraction of `rate_limit` the handler allows itself.
    pub rate_headroom: f64,
}

/// `[outcomes]`: per-ticket fates, drawn deterministically from seed + ticket id.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcomes {
    pub nothing_due: f64,
    pub unknown_ticket: f64,
    /// Inclusive range of the amount due, minor units.
    pub amount_minor: [i64; 2],
    /// Probability that each validator rejects a ticket.
    pub rejected: BTreeMap<ProviderName, f64>,
    /// Probability that each payment step declines a ticket (422).
    pub payment_failure: BTreeMap<ProviderName, f64>,
}

/// Behaviour of one provider.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSettings {
    /// Inclusive range, uniform random per request.
    pub latency_ms: [u64; 2],
    /// Requests per second accepted; 0 = unlimited.
    pub rate_limit: u32,
    /// Requests in flight accepted; 0 = unlimited.
    pub concurrency_limit: u32,
    /// Probability of answering 500 or 503 without applying anything.
    pub error_rate: f64,
    /// Probability of holding the request for `hang_ms`, then answering 504.
    pub timeout_rate: f64,
    /// Probability of answering 429 (Retry-After: 1) whatever the load: a provider
    /// that sheds load on its own terms.
    pub throttle_rate: f64,
    pub hang_ms: u64,
    /// Probability that an operation is applied, then answered 500 (the caller
    /// cannot tell it from an error before applying).
    pub error_after_apply_rate: f64,
    /// Probability that a status query (`GET /operations/{key}`) is answered
    /// 400, 401, 403 or 409 instead of what was applied.
    pub status_error_rate: f64,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self { timeout_ms: 3000, rate_headroom: 0.9 }
    }
}

impl Default for ProviderSettings {
    fn default() -> Self {
        Self {
            latency_ms: [0, 0],
            rate_limit: 0,
            concurrency_limit: 0,
            error_rate: 0.0,
            timeout_rate: 0.0,
            throttle_rate: 0.0,
            hang_ms: 10_000,
            error_after_apply_rate: 0.0,
            status_error_rate: 0.0,
        }
    }
}

/// The validators that may reject a ticket, in the order they are drawn.
pub const REJECTING: [ProviderName; 3] = ProviderName::VALIDATORS;
/// The payment steps that may decline a ticket, in the order they are drawn.
pub const DECLINING: [ProviderName; 4] = [
    ProviderName::Gateway,
    ProviderName::Settlement,
    ProviderName::Ledger,
    ProviderName::Receipt,
];

// ---- raw TOML shapes -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    description: Option<String>,
    seed: Option<u64>,
    client: Option<RawClient>,
    outcomes: Option<RawOutcomes>,
    defaults: Option<RawProvider>,
    providers: Option<BTreeMap<String, RawProvider>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    timeout_ms: Option<u64>,
    rate_headroom: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutcomes {
    nothing_due: Option<f64>,
    unknown_ticket: Option<f64>,
    amount_minor: Option<[i64; 2]>,
    rejected: Option<BTreeMap<String, f64>>,
    payment_failure: Option<BTreeMap<String, f64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    latency_ms: Option<[u64; 2]>,
    rate_limit: Option<u32>,
    concurrency_limit: Option<u32>,
    error_rate: Option<f64>,
    timeout_rate: Option<f64>,
    throttle_rate: Option<f64>,
    hang_ms: Option<u64>,
    error_after_apply_rate: Option<f64>,
    status_error_rate: Option<f64>,
}

fn probability(key: &str, p: f64) -> anyhow::Result<f64> {
    if !(0.0..=1.0).contains(&p) || p.is_nan() {
        bail!("`{key}`: probability {p} is not in [0, 1]");
    }
    Ok(p)
}

impl RawProvider {
    /// Applies the keys present in `self` on top of `base`, validating them.
    fn apply(&self, table: &str, base: &ProviderSettings) -> anyhow::Result<ProviderSettings> {
        let mut s = base.clone();
        if let Some(l) = self.latency_ms {
            if l[0] > l[1] {
                bail!("`{table}.latency_ms`: lower bound {} is above upper bound {}", l[0], l[1]);
            }
            if l[1] > 600_000 {
                bail!("`{table}.latency_ms`: {} ms is more than 10 minutes", l[1]);
            }
            s.latency_ms = l;
        }
        if let Some(r) = self.rate_limit {
            s.rate_limit = r;
        }
        if let Some(c) = self.concurrency_limit {
            s.concurrency_limit = c;
        }
        if let Some(p) = self.error_rate {
            s.error_rate = probability(&format!("{table}.error_rate"), p)?;
        }
        if let Some(p) = self.timeout_rate {
            s.timeout_rate = probability(&format!("{table}.timeout_rate"), p)?;
        }
        if let Some(p) = self.throttle_rate {
            s.throttle_rate = probability(&format!("{table}.throttle_rate"), p)?;
        }
        if let Some(p) = self.error_after_apply_rate {
            s.error_after_apply_rate = probability(&format!("{table}.error_after_apply_rate"), p)?;
        }
        if let Some(p) = self.status_error_rate {
            s.status_error_rate = probability(&format!("{table}.status_error_rate"), p)?;
        }
        if let Some(h) = self.hang_ms {
            if h > 600_000 {
                bail!("`{table}.hang_ms`: {h} ms is more than 10 minutes");
            }
            s.hang_ms = h;
        }
        let faults = s.error_rate + s.timeout_rate + s.error_after_apply_rate;
        if faults > 1.0 {
            bail!("`{table}`: error_rate + timeout_rate + error_after_apply_rate = {faults} is more than 1");
        }
        Ok(s)
    }
}

fn provider_map(
    table: &str,
    raw: Option<BTreeMap<String, f64>>,
    allowed: &[ProviderName],
) -> anyhow::Result<BTreeMap<ProviderName, f64>> {
    let mut out = BTreeMap::new();
    for (k, v) in raw.unwrap_or_default() {
        let p = allowed.iter().copied().find(|p| p.as_str() == k).ok_or_else(|| {
            let names: Vec<&str> = allowed.iter().map(|p| p.as_str()).collect();
            anyhow!("`{table}.{k}`: not one of {}", names.join(", "))
        })?;
        out.insert(p, probability(&format!("{table}.{k}"), v)?);
    }
    Ok(out)
}

/// `[client]`: what the handler keeps to, with the defaults.
fn client_settings(raw: Option<RawClient>) -> anyhow::Result<ClientSettings> {
    let mut client = ClientSettings::default();
    let Some(c) = raw else { return Ok(client) };
    if let Some(t) = c.timeout_ms {
        if t == 0 {
            bail!("`client.timeout_ms`: must be more than 0");
        }
        client.timeout_ms = t;
    }
    if let Some(h) = c.rate_headroom {
        if !(h > 0.0 && h <= 1.0) {
            bail!("`client.rate_headroom`: {h} is not in (0, 1]");
        }
        client.rate_headroom = h;
    }
    Ok(client)
}

/// `[outcomes]`: every ticket's fate, whose probabilities add up to at most 1.
fn outcomes(raw: Option<RawOutcomes>) -> anyhow::Result<Outcomes> {
    let ro = raw.unwrap_or(RawOutcomes { nothing_due: None, unknown_ticket: None, amount_minor: None, rejected: None, payment_failure: None });
    let amount_minor = ro.amount_minor.unwrap_or([500, 20_000]);
    if amount_minor[0] < 1 || amount_minor[0] > amount_minor[1] {
        bail!(
            "`outcomes.amount_minor`: [{}, {}] must be an increasing range of positive amounts",
            amount_minor[0],
            amount_minor[1]
        );
    }
    let outcomes = Outcomes {
        nothing_due: probability("outcomes.nothing_due", ro.nothing_due.unwrap_or(0.0))?,
        unknown_ticket: probability("outcomes.unknown_ticket", ro.unknown_ticket.unwrap_or(0.0))?,
        amount_minor,
        rejected: provider_map("outcomes.rejected", ro.rejected, &REJECTING)?,
        payment_failure: provider_map("outcomes.payment_failure", ro.payment_failure, &DECLINING)?,
    };
    let total = outcomes.nothing_due
        + outcomes.unknown_ticket
        + outcomes.rejected.values().sum::<f64>()
        + outcomes.payment_failure.values().sum::<f64>();
    if total > 1.0 + 1e-9 {
        bail!("`outcomes`: the probabilities add up to {total}, more than 1");
    }
    Ok(outcomes)
}

/// `[providers.NAME]`: each of the nine, its own settings over the defaults.
fn providers(mut overrides: BTreeMap<String, RawProvider>, defaults: &ProviderSettings) -> anyhow::Result<BTreeMap<ProviderName, ProviderSettings>> {
    if let Some(k) = overrides.keys().find(|k| k.parse::<ProviderName>().is_err()) {
        bail!("`providers.{k}`: unknown provider");
    }
    let mut providers = BTreeMap::new();
    for p in ProviderName::ALL {
        let s = match overrides.remove(p.as_str()) {
            Some(raw) => raw.apply(&format!("providers.{p}"), defaults)?,
            None => defaults.clone(),
        };
        providers.insert(p, s);
    }
    Ok(providers)
}

impl Scenario {
    /// `name_or_path`: a shipped scenario name ("realistic", "zero-latency",
    /// "faulty") or a path to a TOML file. `None` = "realistic".
    pub fn load(name_or_path: Option<&str>) -> anyhow::Result<Scenario> {
        let wanted = name_or_path.unwrap_or(DEFAULT_SCENARIO);
        if let Some((name, text)) = SHIPPED.iter().find(|(n, _)| *n == wanted) {
            let mut s = Self::from_toml(text).with_context(|| format!("shipped scenario `{name}`"))?;
            s.name = (*name).to_string();
            return Ok(s);
        }
        let path = Path::new(wanted);
        if !path.exists() {
            let names: Vec<&str> = SHIPPED.iter().map(|(n, _)| *n).collect();
            bail!(
                "no scenario `{wanted}`: not a shipped scenario ({}) and no such file",
                names.join(", ")
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scenario file {}", path.display()))?;
        let mut s = Self::from_toml(&text)
            .with_context(|| format!("scenario file {}", path.display()))?;
        s.name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| wanted.to_string());
        Ok(s)
    }

    /// Parses and validates a scenario. Errors name the offending key.
    pub fn from_toml(text: &str) -> anyhow::Result<Scenario> {
        let raw: RawScenario =
            toml::from_str(text).map_err(|e| anyhow!("invalid scenario: {e}"))?;
        let client = client_settings(raw.client)?;
        let outcomes = outcomes(raw.outcomes)?;
        let defaults = raw
            .defaults
            .unwrap_or_default()
            .apply("defaults", &ProviderSettings::default())?;
        let providers = providers(raw.providers.unwrap_or_default(), &defaults)?;
        Ok(Scenario {
            name: "custom".to_string(),
            description: raw.description.unwrap_or_default(),
            seed: raw.seed.unwrap_or(0),
            client,
            outcomes,
            defaults,
            providers,
        })
    }

    /// The effective settings of one provider.
    pub fn provider(&self, p: ProviderName) -> &ProviderSettings {
        // All nine are always present (see `from_toml`).
        self.providers.get(&p).unwrap_or(&self.defaults)
    }
}

/// What the simulated providers will do with one ticket. Deterministic from
/// the scenario's seed and the ticket id (not the authority or batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketOutcome {
    /// The amount the authority says is due; 0 if nothing is due or unknown.
    pub amount_minor: i64,
    /// The authority answers status `nothing_due`, amount 0.
    pub nothing_due: bool,
    /// The authority answers 404 `unknown_ticket`.
    pub unknown: bool,
    /// This validator answers `decision = reject`.
    pub rejected_by: Option<ProviderName>,
    /// This payment step's forward operation answers 422 `declined`.
    pub fails_at: Option<ProviderName>,
}

impl TicketOutcome {
    /// True if the ticket is meant to pay through every step.
    pub fn pays(&self) -> bool {
        !self.unknown && !self.nothing_due && self.rejected_by.is_none() && self.fails_at.is_none()
    }
}

/// Two uniform draws in [0, 1) and one u64, from seed + ticket id.
fn draws(seed: u64, ticket_id: &str) -> (f64, u64) {
    let mut h = Sha256::new();
    h.update(b"ticketpay-sim\0");
    h.update(seed.to_le_bytes());
    h.update(ticket_id.as_bytes());
    let d = h.finalize();
    let a = u64::from_le_bytes(d[0..8].try_into().expect("8 bytes"));
    let b = u64::from_le_bytes(d[8..16].try_into().expect("8 bytes"));
    ((a >> 11) as f64 / (1u64 << 53) as f64, b)
}

/// The deterministic fate of one ticket under `scenario`.
pub fn outcome_for(scenario: &Scenario, ticket_id: &str) -> TicketOutcome {
    let o = &scenario.outcomes;
    let (u, b) = draws(scenario.seed, ticket_id);
    let [lo, hi] = o.amount_minor;
    let span = (hi - lo) as u64 + 1;
    let amount = lo + (b % span) as i64;
    let mut out = TicketOutcome {
        amount_minor: amount,
        nothing_due: false,
        unknown: false,
        rejected_by: None,
        fails_at: None,
    };
    let mut acc = o.unknown_ticket;
    if u < acc {
        out.unknown = true;
        out.amount_minor = 0;
        return out;
    }
    acc += o.nothing_due;
    if u < acc {
        out.nothing_due = true;
        out.amount_minor = 0;
        return out;
    }
    for (p, pr) in &o.rejected {
        acc += pr;
        if u < acc {
            out.rejected_by = Some(*p);
            return out;
        }
    }
    for (p, pr) in &o.payment_failure {
        acc += pr;
        if u < acc {
            out.fails_at = Some(*p);
            return out;
        }
    }
    out
}
