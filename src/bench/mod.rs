//! `ticketpay bench`: how close the pipeline comes to what the providers allow,
//! and what it costs.
//!
//! It starts the provider simulator and the local stack (host and handler) as
//! separate processes, pays one batch through the pipeline, then pays the same
//! tickets the naive way (one at a time, every call after the other, no
//! queues: [`baseline`]) against the same simulator, and compares both with
//! the provider-bound [`floor`]. CPU is counted for the stack's processes
//! only, the simulator excluded; memory for every process.

pub mod baseline;
pub mod floor;
mod procs;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::client::ApiClient;
use crate::sample::sample_csv;
use crate::host::StoreChoice;
use crate::providers::ProviderName;
use crate::store::meter::Charges;
use crate::providers::simulator::Scenario;
use procs::{PeakRss, Spawned};
pub use report::Report;

pub struct BenchOptions {
    pub tickets: usize,
    pub scenario: String,
    pub app_root: PathBuf,
    /// How many tickets the naive way pays (default: all, or a sample of about 45 s on a scenario with latency).
    pub baseline_tickets: Option<usize>,
    pub data: Option<PathBuf>,
    /// Handler instances the local host runs.
    pub instances: usize,
    /// Messages per invocation, in place of host.json's (1: one at a time).
    pub max_batch: Option<usize>,
    /// Where the handler keeps its state.
    pub store: StoreChoice,
}

/// Messages per invocation in this run: `--max-batch`, else what the app's
/// host.json and function.json files say (1 when no queue function takes batches).
fn max_batch(opts: &BenchOptions) -> Result<usize> {
    let mut config = crate::host::config::HostConfig::load(&opts.app_root)?;
    if let Some(n) = opts.max_batch {
        config.set_max_batch(n);
    }
    let batched = config.queue_functions().any(|(_, q)| q.cardinality == crate::host::config::Cardinality::Many);
    Ok(if batched { config.batches.max_size } else { 1 })
}

/// The naive way gets about this long; past it, a sample is scaled.
const BASELINE_BUDGET: Duration = Duration::from_secs(45);

pub async fn run(opts: BenchOptions) -> Result<Report> {
    let scenario = Scenario::load(Some(&opts.scenario))?;
    let data = match &opts.data {
        Some(d) => d.clone(),
        None => PathBuf::from(".ticketpay").join(format!("bench-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S"))),
    };
    std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
    let max_batch = max_batch(&opts)?;
    eprintln!(
        "ticketpay bench: {} tickets, scenario {}, {} instance(s), up to {} message(s) per invocation, data and logs in {}",
        opts.tickets,
        scenario.name,
        opts.instances,
        max_batch,
        data.display()
    );

    let (simulator, found) =
        Spawned::start(&["providers", "--port", "0", "--scenario", &opts.scenario], &data.join("providers.log"), &["ticketpay providers: listening on"])?;
    let providers_url = found[0].split_whitespace().next().context("the simulator printed no URL")?.to_owned();
    let pipeline = pipeline_run(&opts, max_batch, &data, &providers_url, simulator.pid()).await?;

    let sample = opts.baseline_tickets.unwrap_or_else(|| baseline_sample(&scenario, opts.tickets)).clamp(1, opts.tickets);
    eprintln!("ticketpay bench: the naive way, one ticket at a time, on {sample} tickets");
    let tickets = sample_tickets(sample);
    let url = providers_url.clone();
    let timeout = Duration::from_millis(scenario.client.timeout_ms);
    let naive = tokio::task::spawn_blocking(move || baseline::run(&url, "baseline", tickets, timeout)).await??;
    simulator.stop();

    let requests = accepted_requests(&pipeline.stats);
    let floor = floor::floor(&scenario, &requests);
    Ok(Report::new(&scenario, opts.tickets, &pipeline, &naive, &floor))
}

/// What one run of the pipeline measured.
pub struct PipelineRun {
    pub seconds: f64,
    pub handler_cpu_seconds: f64,
    pub host_cpu_seconds: f64,
    pub peak_rss_bytes: u64,
    /// Each process's own peak: the host with its handler, the simulator, this process.
    pub peak_rss_each: Vec<u64>,
    pub status: Value,
    pub stats: Value,
    /// Handler instances the local host ran.
    pub instances: usize,
    /// Messages per invocation (1: one at a time).
    pub max_batch: usize,
    pub store: StoreChoice,
    /// What the store's requests cost, for a store that charges for them.
    pub charges: Option<Charges>,
}

async fn pipeline_run(opts: &BenchOptions, max_batch: usize, data: &Path, providers_url: &str, simulator_pid: i32) -> Result<PipelineRun> {
    let app_root = opts.app_root.to_str().context("the app root is not UTF-8")?;
    let store = data.join("stack");
    let store = store.to_str().context("the data folder is not UTF-8")?;
    let instances = opts.instances.to_string();
    let batch = max_batch.to_string();
    let mut args = vec![
        "local", "--instances", &instances, "--port", "0", "--providers-port", "0", "--providers-url", providers_url, "--scenario", &opts.scenario, "--data", store,
        "--app-root", app_root, "--max-batch", &batch,
    ];
    let throughput;
    let throttled;
    let lost;
    if let StoreChoice::CosmosEmulator(emulation) = opts.store {
        args.extend(["--store", "cosmos-emulator"]);
        if let Some(ru) = emulation.ru_per_second {
            throughput = ru.to_string();
            args.extend(["--cosmos-ru-per-s", throughput.as_str()]);
        }
        throttled = emulation.throttled_batches_percent.to_string();
        lost = emulation.lost_answers_percent.to_string();
        args.extend(["--cosmos-throttled-batches", throttled.as_str(), "--cosmos-lost-answers", lost.as_str()]);
    }
    let (host, found) = Spawned::start(&args, &data.join("host.log"), &["ticketpay local: listening on", "ticketpay local: ready"])?;
    let api = ApiClient::new(&found[0]);
    let host_pid = host.pid();
    let handler_cpu = || procs::tree(host_pid).into_iter().filter(|&p| p != host_pid).map(procs::cpu_seconds).sum::<f64>();

    // This process is the parent of the others: only its own memory counts for it.
    let rss = PeakRss::start(vec![(host_pid, true), (simulator_pid, true), (std::process::id() as i32, false)]);
    let (host_before, handler_before) = (procs::cpu_seconds(host_pid), handler_cpu());
    let (started, uploaded_at) = (Instant::now(), chrono::Utc::now());
    let batch_id = upload(&api, opts.tickets).await?;
    let status = wait_complete(&api, &batch_id, opts.tickets).await?;
    let seconds = batch_seconds(&status, uploaded_at).unwrap_or_else(|| started.elapsed().as_secs_f64());
    let (host_cpu_seconds, handler_cpu_seconds) = (procs::cpu_seconds(host_pid) - host_before, handler_cpu() - handler_before);
    let (peak_rss_bytes, peak_rss_each) = rss.finish();
    let stats = reqwest::get(format!("{providers_url}/stats")).await?.json::<Value>().await?;
    host.stop();
    let charges = match opts.store {
        StoreChoice::Embedded => None,
        StoreChoice::CosmosEmulator(_) => Some(read_charges(&data.join("stack").join(crate::config::CHARGES_FILE))?),
    };
    let instances = opts.instances;
    Ok(PipelineRun { seconds, handler_cpu_seconds, host_cpu_seconds, peak_rss_bytes, peak_rss_each, status, stats, instances, max_batch, store: opts.store, charges })
}

/// The charges the handler wrote (each second, and the last of them as it stopped).
fn read_charges(file: &Path) -> Result<Charges> {
    let text = std::fs::read(file).with_context(|| format!("the handler wrote no store charges to {}", file.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is no store charges", file.display()))
}

/// Uploads the sample batch with a budget that covers every ticket, so every payable ticket is paid.
async fn upload(api: &ApiClient, tickets: usize) -> Result<String> {
    let budget = format!("{}.00", tickets * 200);
    let query = [("client_id", "bench"), ("currency", "EUR"), ("budget", budget.as_str())];
    let key = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let accepted = api.upload(&query, "text/csv", sample_csv(tickets).into_bytes(), &key).await?;
    Ok(accepted["batch_id"].as_str().context("the API answered without a batch_id")?.to_owned())
}

/// How often the bench asks for the batch's status: about as often as a console
/// watching it (every 1.5 s). Its time is the batch's own record, not the poll's.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// From the upload to the completion the batch recorded (same machine, same
/// clock): what the batch took, without the time until a poll saw it.
fn batch_seconds(status: &Value, uploaded_at: chrono::DateTime<chrono::Utc>) -> Option<f64> {
    let completed: chrono::DateTime<chrono::Utc> = status["completed_at"].as_str()?.parse().ok()?;
    Some((completed - uploaded_at).num_microseconds()? as f64 / 1e6)
}

async fn wait_complete(api: &ApiClient, batch_id: &str, tickets: usize) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60 + tickets as u64);
    loop {
        // A store out of throughput may leave the API unable to answer a poll; the next one asks again.
        let status = api.poll(&format!("/api/batches/{batch_id}")).await?;
        if let Some(status) = status.as_ref().filter(|s| s["status"] == "completed") {
            return Ok(status.clone());
        }
        if Instant::now() > deadline {
            bail!("batch {batch_id} did not complete in time: {}", status.unwrap_or_default());
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Enough tickets for the naive way to take about [`BASELINE_BUDGET`], at least 20.
fn baseline_sample(scenario: &Scenario, tickets: usize) -> usize {
    let per_ticket = floor::sequential_journey_seconds(scenario);
    if per_ticket * tickets as f64 <= BASELINE_BUDGET.as_secs_f64() {
        return tickets;
    }
    ((BASELINE_BUDGET.as_secs_f64() / per_ticket) as usize).max(20)
}

/// The first `n` tickets of the sample batch: the same ids, so the same fates.
fn sample_tickets(n: usize) -> Vec<baseline::Ticket> {
    sample_csv(n)
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split(',');
            Some(baseline::Ticket { ticket_id: fields.next()?.to_owned(), authority: fields.next()?.to_owned() })
        })
        .collect()
}

/// Requests each provider accepted (throttled ones are not work a better client would have done).
fn accepted_requests(stats: &Value) -> BTreeMap<ProviderName, u64> {
    ProviderName::ALL
        .into_iter()
        .map(|p| {
            let s = &stats[p.as_str()];
            let n = s["requests"].as_u64().unwrap_or(0).saturating_sub(s["throttled"].as_u64().unwrap_or(0));
            (p, n)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_takes_from_its_upload_to_the_completion_it_recorded() {
        let uploaded = "2026-12-07T14:52:32.250Z".parse().unwrap();
        let status = serde_json::json!({"status": "completed", "completed_at": "2026-12-07T14:53:26.500Z"});
        assert_eq!(batch_seconds(&status, uploaded), Some(54.25));
        assert_eq!(batch_seconds(&serde_json::json!({"status": "completed"}), uploaded), None, "no time recorded: the bench's own clock");
    }
}
