//! `ticketpay demo`: the whole product on one machine. Starts the local stack,
//! submits a sample batch, shows it move stage by stage, then the summary and
//! one ticket's timeline.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::client::ApiClient;
use crate::sample::sample_csv;
use super::{progress, submit, trace};
use crate::host::{LocalHost, LocalOptions};

pub struct DemoOptions {
    pub tickets: usize,
    pub budget: String,
    pub scenario: Option<String>,
    pub data: Option<PathBuf>,
    pub port: u16,
    pub app_root: PathBuf,
    /// Handler instances the local host runs.
    pub instances: usize,
}

pub async fn run(opts: DemoOptions) -> Result<()> {
    let data = opts.data.unwrap_or_else(|| PathBuf::from(".ticketpay").join(format!("demo-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S"))));
    println!("starting the local stack (data in {})", data.display());
    let host = LocalHost::start(LocalOptions {
        app_root: opts.app_root,
        port: opts.port,
        providers_port: 0,
        providers_url: None,
        scenario: opts.scenario.clone(),
        data: data.clone(),
        duplicate_deliveries: false,
        max_batch: None,
        instances: opts.instances,
        store: Default::default(),
    })
    .await?;
    println!("local host at {} · providers at {}", host.url, host.providers_url);

    let outcome = drive(&host, opts.tickets, &opts.budget, &data).await;
    host.shutdown().await?;
    outcome
}

async fn drive(host: &LocalHost, tickets: usize, budget: &str, data: &std::path::Path) -> Result<()> {
    // Open unless local.settings.json sets keys; then the operator's key comes from the environment.
    let api = ApiClient::new(&host.url).with_key(std::env::var("TICKETPAY_API_KEY").ok());
    let file = data.join("demo-tickets.csv");
    std::fs::write(&file, sample_csv(tickets)).with_context(|| format!("cannot write {}", file.display()))?;
    println!("submitting {tickets} tickets with a budget of {budget} EUR\n");
    let started = Instant::now();
    let submission = submit::Submission { file: &file, client: "demo-client", currency: "EUR", budget };
    let accepted = submit::run(&api, &submission, false).await?;
    let batch_id = accepted["batch_id"].as_str().unwrap_or_default().to_owned();
    println!("watch it in a browser: {}/api/console/batches/{batch_id}\n", host.url);
    let status = progress::follow(&api, &batch_id, true).await?;
    let elapsed = started.elapsed();
    println!();
    print!("{}", progress::summary(&status, Some(elapsed)));

    let stats = reqwest::get(format!("{}/stats", host.providers_url)).await?.json::<serde_json::Value>().await?;
    println!("\nproviders   requests  peak in flight (limit)  peak req/s (limit)  throttled  duplicate charges");
    for (name, s) in stats.as_object().into_iter().flatten() {
        println!(
            "{name:<11} {:>8}  {:>6} ({:>3})             {:>6} ({:>3})         {:>6}  {:>6}",
            s["requests"], s["peak_in_flight"], s["limit_in_flight"], s["peak_rps"], s["limit_rps"], s["throttled"],
            s.get("duplicate_charges").map_or("-".to_owned(), |v| v.to_string())
        );
    }

    let paid = api.get(&format!("/api/batches/{batch_id}/tickets?status=paid&limit=1")).await?;
    if let Some(ticket_id) = paid["tickets"][0]["ticket_id"].as_str() {
        println!("\none paid ticket, as support sees it (ticketpay trace {batch_id} {ticket_id}):");
        trace::run(&api, &batch_id, ticket_id, false).await?;
    }
    println!(
        "\nthe stack stops now; to look around again, run `ticketpay local --data {}` and open /api/console/batches/{batch_id}",
        data.display()
    );
    Ok(())
}
