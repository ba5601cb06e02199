//! The figures of one benchmark: a table for people, one JSON line for tools.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;
use serde_json::Value;

use super::PipelineRun;
use super::baseline::BaselineRun;
use super::floor::Floor;
use crate::domain::{Currency, Money, Status};
use crate::host::StoreChoice;
use crate::providers::simulator::Scenario;
use crate::store::cosmos::RECORDS;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub cores: usize,
    /// Handler instances the local host ran.
    pub instances: usize,
    /// Messages per invocation of the queue functions (1: one at a time).
    pub max_batch: usize,
    pub tickets: usize,
    pub seconds: f64,
    pub tickets_per_s: f64,
    pub floor_seconds: f64,
    /// None when the scenario sets no limit and no latency: there is no floor to compare with.
    pub ratio_to_floor: Option<f64>,
    pub floor_bottleneck: Option<String>,
    pub baseline_seconds: f64,
    /// How many tickets the naive way really paid; `baseline_seconds` scales them to `tickets`.
    pub baseline_measured_tickets: usize,
    pub baseline_scaled: bool,
    pub speedup_vs_baseline: f64,
    pub cpu_ms_per_ticket: f64,
    pub handler_cpu_ms_per_ticket: f64,
    pub host_cpu_ms_per_ticket: f64,
    pub baseline_cpu_ms_per_ticket: f64,
    pub overhead_vs_baseline: f64,
    pub peak_rss_mb: f64,
    /// Each process's own peak: `stack` (host and handler), `simulator`, `bench` (this process).
    pub peak_rss_mb_each: BTreeMap<String, f64>,
    pub duplicate_charges: u64,
    pub lost: u64,
    pub limits_held: bool,
    pub budget_held: bool,
    pub end_states: BTreeMap<String, u64>,
    pub throttled: u64,
    /// `embedded` or `cosmos-emulator`.
    pub store: String,
    /// Request units the store was charged, per ticket (a store that charges for requests).
    pub ru_per_ticket: Option<f64>,
    /// The same, by the stage (or `api`, `sweep`) that made the requests.
    pub ru_per_ticket_by_stage: Option<BTreeMap<String, f64>>,
    /// The most request units one logical partition took in one second.
    pub hottest_partition_peak_ru_per_s: Option<f64>,
    /// The most request units the records container took in one second.
    pub records_peak_ru_per_s: Option<f64>,
    /// Store requests answered 429 (retried).
    pub store_throttled: Option<u64>,
    /// Store writes whose answer was lost, found landed.
    pub store_unanswered: Option<u64>,
    /// The simulator's counters after the pipeline run.
    #[serde(skip)]
    pub providers: Value,
}

impl Report {
    pub fn new(scenario: &Scenario, tickets: usize, run: &PipelineRun, naive: &BaselineRun, floor: &Floor) -> Report {
        let n = tickets as f64;
        let per_ticket_ms = |s: f64| round(s * 1000.0 / n, 3);
        let cpu_ms = per_ticket_ms(run.handler_cpu_seconds + run.host_cpu_seconds);
        let baseline_cpu_ms = round(naive.cpu_seconds * 1000.0 / naive.tickets as f64, 3);
        let baseline_seconds = naive.seconds * n / naive.tickets as f64;
        let end_states: BTreeMap<String, u64> =
            Status::END_NAMES.iter().map(|s| (s.to_string(), run.status["counts"][s].as_u64().unwrap_or(0))).collect();
        let ended: u64 = end_states.values().sum();
        let stats = run.stats.as_object().cloned().unwrap_or_default();
        Report {
            scenario: scenario.name.clone(),
            cores: std::thread::available_parallelism().map_or(1, |c| c.get()),
            instances: run.instances,
            max_batch: run.max_batch,
            tickets,
            seconds: round(run.seconds, 2),
            tickets_per_s: round(n / run.seconds, 1),
            floor_seconds: round(floor.seconds, 2),
            ratio_to_floor: (floor.seconds > 0.0).then(|| round(run.seconds / floor.seconds, 3)),
            floor_bottleneck: floor.bottleneck.map(|p| p.to_string()),
            baseline_seconds: round(baseline_seconds, 2),
            baseline_measured_tickets: naive.tickets,
            baseline_scaled: naive.tickets < tickets,
            speedup_vs_baseline: round(baseline_seconds / run.seconds, 2),
            cpu_ms_per_ticket: cpu_ms,
            handler_cpu_ms_per_ticket: per_ticket_ms(run.handler_cpu_seconds),
            host_cpu_ms_per_ticket: per_ticket_ms(run.host_cpu_seconds),
            baseline_cpu_ms_per_ticket: baseline_cpu_ms,
            overhead_vs_baseline: if baseline_cpu_ms > 0.0 { round(cpu_ms / baseline_cpu_ms, 2) } else { 0.0 },
            peak_rss_mb: mb(run.peak_rss_bytes),
            peak_rss_mb_each: ["stack", "simulator", "bench"].iter().map(|s| s.to_string()).zip(run.peak_rss_each.iter().map(|&b| mb(b))).collect(),
            duplicate_charges: stats.values().filter_map(|s| s["duplicate_charges"].as_u64()).sum(),
            lost: (tickets as u64).saturating_sub(ended),
            limits_held: stats.values().all(limits_held),
            budget_held: budget_held(&run.status),
            end_states,
            throttled: stats.values().filter_map(|s| s["throttled"].as_u64()).sum(),
            store: match run.store {
                StoreChoice::Embedded => "embedded".into(),
                StoreChoice::CosmosEmulator(_) => "cosmos-emulator".into(),
            },
            ru_per_ticket: run.charges.as_ref().map(|c| round(c.total_ru / n, 1)),
            ru_per_ticket_by_stage: run.charges.as_ref().map(|c| c.by_step.iter().map(|(k, v)| (k.clone(), round(v / n, 1))).collect()),
            hottest_partition_peak_ru_per_s: run.charges.as_ref().map(|c| round(c.hottest_partition_peak_ru_per_s, 1)),
            records_peak_ru_per_s: run.charges.as_ref().and_then(|c| c.container_peak_ru_per_s.get(RECORDS)).map(|p| round(*p, 1)),
            store_throttled: run.charges.as_ref().map(|c| c.throttled),
            store_unanswered: run.charges.as_ref().map(|c| c.unanswered),
            providers: run.stats.clone(),
        }
    }

    /// The table, then the JSON line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nticketpay bench · scenario {} · {} tickets · {} cores · {} instance(s) · up to {} message(s) per invocation\n",
            self.scenario, self.tickets, self.cores, self.instances, self.max_batch
        );
        let _ = writeln!(out, "{:<24} {:>9} {:>10} {:>14}", "", "seconds", "tickets/s", "CPU ms/ticket");
        let _ = writeln!(
            out,
            "{:<24} {:>9.2} {:>10.1} {:>14.3}   handler {:.3} + host {:.3}",
            "pipeline", self.seconds, self.tickets_per_s, self.cpu_ms_per_ticket, self.handler_cpu_ms_per_ticket, self.host_cpu_ms_per_ticket
        );
        let scaled = if self.baseline_scaled {
            format!("   measured on {} tickets, scaled to {}", self.baseline_measured_tickets, self.tickets)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:<24} {:>9.2} {:>10.1} {:>14.3}{scaled}",
            "naive, one at a time",
            self.baseline_seconds,
            self.tickets as f64 / self.baseline_seconds.max(1e-9),
            self.baseline_cpu_ms_per_ticket
        );
        let bottleneck = self.floor_bottleneck.as_deref().map(|p| format!("   bound by the {p}")).unwrap_or_default();
        let _ = writeln!(out, "{:<24} {:>9.2} {:>10} {:>14}{bottleneck}", "provider-bound floor", self.floor_seconds, "", "-");
        let ratio = self.ratio_to_floor.map_or("none (no limits, no latency)".to_owned(), |r| format!("{r:.3}"));
        let _ = writeln!(
            out,
            "\npipeline / floor {ratio} · speedup over the naive way {:.1}× · CPU overhead over the naive way {:.2}×",
            self.speedup_vs_baseline, self.overhead_vs_baseline
        );
        let _ = writeln!(
            out,
            "peak RSS {:.1} MB (every process: {}) · lost {} · duplicate charges {} · provider limits held: {} · budget held: {}",
            self.peak_rss_mb,
            self.peak_rss_mb_each.iter().map(|(p, m)| format!("{p} {m:.1}")).collect::<Vec<_>>().join(", "),
            self.lost,
            self.duplicate_charges,
            yes(self.limits_held),
            yes(self.budget_held)
        );
        if let (Some(ru), Some(by_stage), Some(peak)) = (self.ru_per_ticket, &self.ru_per_ticket_by_stage, self.hottest_partition_peak_ru_per_s) {
            let stages: Vec<String> = by_stage.iter().map(|(s, r)| format!("{s} {r:.1}")).collect();
            let _ = writeln!(
                out,
                "store {}: {ru:.1} RU per ticket ({}) · hottest partition {peak:.0} RU/s at its peak · records container {:.0} RU/s at its peak · {} requests throttled · {} answers lost, found landed",
                self.store,
                stages.join(", "),
                self.records_peak_ru_per_s.unwrap_or(0.0),
                self.store_throttled.unwrap_or(0),
                self.store_unanswered.unwrap_or(0)
            );
        }
        let ends: Vec<String> = self.end_states.iter().filter(|(_, n)| **n > 0).map(|(s, n)| format!("{s} {n}")).collect();
        let _ = writeln!(out, "end states: {}", ends.join(" · "));
        if let Some(stats) = self.providers.as_object() {
            let _ = writeln!(out, "\n{:<11} {:>8} {:>16} {:>16} {:>9}", "provider", "requests", "peak in flight", "peak req/s", "throttled");
            for (name, s) in stats {
                let n = |k: &str| s[k].as_u64().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "{name:<11} {:>8} {:>9} of {:>4} {:>9} of {:>4} {:>9}",
                    n("requests"),
                    n("peak_in_flight"),
                    limit(n("limit_in_flight")),
                    n("peak_rps"),
                    limit(n("limit_rps")),
                    n("throttled")
                );
            }
        }
        let _ = writeln!(out, "{}", serde_json::to_string(self).expect("a report serialises"));
        out
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn mb(bytes: u64) -> f64 {
    round(bytes as f64 / (1024.0 * 1024.0), 1)
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}

fn limit(n: u64) -> String {
    if n == 0 { "∞".into() } else { n.to_string() }
}

/// No provider saw more requests per second, or in flight, than its limit.
fn limits_held(s: &Value) -> bool {
    let within = |peak: &str, limit: &str| {
        let limit = s[limit].as_u64().unwrap_or(0);
        limit == 0 || s[peak].as_u64().unwrap_or(0) <= limit
    };
    within("peak_rps", "limit_rps") && within("peak_in_flight", "limit_in_flight")
}

/// Paid plus still reserved never went past the budget.
fn budget_held(status: &Value) -> bool {
    let Some(currency) = status["currency"].as_str().and_then(|c| Currency::parse(c).ok()) else { return false };
    let minor = |k: &str| status[k].as_str().and_then(|s| Money::parse_decimal(s, currency).ok()).map(|m| m.minor);
    match (minor("budget"), minor("paid"), minor("reserved")) {
        (Some(budget), Some(paid), Some(reserved)) => paid + reserved <= budget,
        _ => false,
    }
}
