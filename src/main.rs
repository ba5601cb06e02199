//! `ticketpay`: one binary for every role. See the crate documentation for the map.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use ticketpay::cli::{demo, operations, progress, submit, trace};
use ticketpay::client::ApiClient;
use ticketpay::host::{self, LocalOptions};
use ticketpay::telemetry::{self, Exporter, Telemetry};

const DEFAULT_URL: &str = "http://127.0.0.1:7071";

#[derive(Parser)]
#[command(name = "ticketpay", version, about = "Pays large batches of tickets through slow, rate-limited providers, with a full audit trail.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The custom handler the Functions host starts (listens on FUNCTIONS_CUSTOMHANDLER_PORT).
    Handler,
    /// The local Functions host: queues, handler and provider simulator on this machine.
    Local {
        #[arg(long, default_value_t = 7071)]
        port: u16,
        #[arg(long, default_value_t = 7072)]
        providers_port: u16,
        /// A provider simulator that is already running (none is started).
        #[arg(long)]
        providers_url: Option<String>,
        /// Scenario for the simulator we start: realistic, zero-latency, faulty, or a TOML file.
        #[arg(long)]
        scenario: Option<String>,
        /// Where queues and state are kept.
        #[arg(long, default_value = ".ticketpay")]
        data: PathBuf,
        /// Where host.json and functions/ are.
        #[arg(long, default_value = ".")]
        app_root: PathBuf,
        /// Fault injection: deliver every message twice at once.
        #[arg(long)]
        duplicate_deliveries: bool,
        /// Handler processes to run, as instances of a scaled-out app (1 to 16).
        #[arg(long, default_value_t = 1)]
        instances: usize,
        /// Messages per invocation of the queue functions, in place of host.json's
        /// maxMessageBatchSize (1: one message per invocation).
        #[arg(long)]
        max_batch: Option<usize>,
        /// Where the handler keeps its state: embedded (SQLite in the data folder) or
        /// cosmos-emulator (the Cosmos store on the SDK's in-memory emulator; a build with
        /// `--features cosmos-emulator`, one instance, nothing kept once it stops).
        #[arg(long, default_value = "embedded")]
        store: String,
        #[command(flatten)]
        emulator: host::EmulatorFlags,
    },
    /// The provider simulator: all nine provider roles over HTTP.
    Providers {
        #[arg(long, default_value_t = 7072)]
        port: u16,
        /// realistic (default), zero-latency, faulty, or a TOML file.
        #[arg(long)]
        scenario: Option<String>,
    },
    /// Runs the local stack and pays a sample batch, with live progress.
    Demo {
        #[arg(long, default_value_t = 5000)]
        tickets: usize,
        /// The batch budget in EUR.
        #[arg(long, default_value = "450000.00")]
        budget: String,
        #[arg(long)]
        scenario: Option<String>,
        /// Where queues and state are kept (default: a new folder under .ticketpay/).
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, default_value_t = 7071)]
        port: u16,
        #[arg(long, default_value = ".")]
        app_root: PathBuf,
        /// Handler processes to run, as instances of a scaled-out app (1 to 16).
        #[arg(long, default_value_t = 1)]
        instances: usize,
    },
    /// Pays a batch through the local stack, then the naive way, and compares both with the provider-bound floor.
    /// Prints a table, then one JSON line.
    Bench {
        #[arg(long, default_value_t = 5000)]
        tickets: usize,
        /// realistic (default), zero-latency, faulty, or a TOML file.
        #[arg(long, default_value = "realistic")]
        scenario: String,
        /// Tickets the naive way pays (default: all, or a sample of about 45 s, scaled).
        #[arg(long)]
        baseline_tickets: Option<usize>,
        /// Where queues, state and logs are kept (default: a new folder under .ticketpay/).
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, default_value = ".")]
        app_root: PathBuf,
        /// Handler processes to run, as instances of a scaled-out app (1 to 16).
        #[arg(long, default_value_t = 1)]
        instances: usize,
        /// Messages per invocation of the queue functions (default: host.json's
        /// maxMessageBatchSize; 1: one message per invocation).
        #[arg(long)]
        max_batch: Option<usize>,
        /// Where the handler keeps its state: embedded (SQLite in the data folder) or
        /// cosmos-emulator (the Cosmos store on the SDK's in-memory emulator; a build with
        /// `--features cosmos-emulator`, one instance, nothing kept once it stops).
        #[arg(long, default_value = "embedded")]
        store: String,
        #[command(flatten)]
        emulator: host::EmulatorFlags,
    },
    /// Uploads a CSV or JSON file of tickets and follows the batch until it completes.
    Submit {
        file: PathBuf,
        #[arg(long)]
        client: String,
        #[arg(long)]
        currency: String,
        #[arg(long)]
        budget: String,
        /// Return once accepted instead of following the batch.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, env = "TICKETPAY_URL", default_value = DEFAULT_URL)]
        url: String,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Shows a batch's progress, amounts and end states.
    Status {
        batch: String,
        #[arg(long, env = "TICKETPAY_URL", default_value = DEFAULT_URL)]
        url: String,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Sends a batch's parked tickets back into the pipeline, each where it stopped.
    Redrive {
        batch: String,
        /// Only list what would be redriven.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, env = "TICKETPAY_URL", default_value = DEFAULT_URL)]
        url: String,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Asks the payment providers about every operation the batch recorded and compares; exits 1 if anything disagrees.
    Reconcile {
        batch: String,
        /// Only this payment provider (gateway, settlement, ledger, receipt).
        #[arg(long)]
        provider: Option<String>,
        /// Print the run as JSON.
        #[arg(long)]
        json: bool,
        #[arg(long, env = "TICKETPAY_URL", default_value = DEFAULT_URL)]
        url: String,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Settles a ticket that needs a person (see `GET /api/batches/{id}/attention` for what is open to it).
    Resolve {
        batch: String,
        ticket: String,
        /// confirmed_applied, confirmed_not_applied, undone_by_hand, redrive, give_up or acknowledge.
        #[arg(long)]
        action: String,
        /// Why: kept in the ticket's audit trail with your key's name.
        #[arg(long)]
        note: String,
        /// The provider's reference for the operation (confirmed_applied needs it).
        #[arg(long)]
        reference: Option<String>,
        #[arg(long, env = "TICKETPAY_URL", default_value = DEFAULT_URL)]
        url: String,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Writes a batch's results for its client as CSV: one row per ticket, then the totals.
    Results {
        batch: String,
        /// Write to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, env = "TICKETPAY_URL", default_value = DEFAULT_URL)]
        url: String,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Builds the deployment package: a folder (and a zip beside it) with host.json, the function folders and the binary.
    Package {
        #[arg(long, default_value = ".azure/package")]
        out: PathBuf,
        #[arg(long, default_value = ".")]
        app_root: PathBuf,
        /// The Linux x86_64 binary to ship (default: this one).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Shows one ticket's state, amounts and timeline with every provider exchange.
    Trace {
        batch: String,
        ticket: String,
        /// Also print each request and response body.
        #[arg(long)]
        full: bool,
        #[arg(long, env = "TICKETPAY_URL", default_value = DEFAULT_URL)]
        url: String,
        #[command(flatten)]
        key: KeyArg,
    },
}

/// The API key the tools send (`x-functions-key`).
#[derive(clap::Args)]
struct KeyArg {
    /// API key; not needed when the API is open (no TICKETPAY_API_KEYS).
    #[arg(long = "key", env = "TICKETPAY_API_KEY", hide_env_values = true)]
    key: Option<String>,
}

impl KeyArg {
    fn client(self, url: &str) -> ApiClient {
        ApiClient::new(url).with_key(self.key)
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // Only the handler exports spans; the other roles log to stderr.
    let exporter = if matches!(cli.command, Command::Handler) { Exporter::from_env() } else { Exporter::None };
    match Telemetry::init(exporter, "warn,ticketpay=info,ticketpay::host::invoke=warn,ticketpay::audit=warn") {
        Ok(t) => telemetry::install(t),
        Err(e) => {
            eprintln!("ticketpay: {e:#}");
            std::process::exit(1);
        }
    }
    let outcome = run(cli.command).await;
    telemetry::shutdown();
    if let Err(e) = outcome {
        eprintln!("ticketpay: {e:#}");
        std::process::exit(1);
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Handler => ticketpay::handler::run().await,
        Command::Local { port, providers_port, providers_url, scenario, data, app_root, duplicate_deliveries, instances, max_batch, store, emulator } => {
            let store = host::StoreChoice::parse(&store, emulator)?;
            let instances = host::check_instances(instances)?;
            let opts =
                LocalOptions { app_root, port, providers_port, providers_url, scenario, data, duplicate_deliveries, instances, max_batch, store };
            host::run(opts).await
        }
        Command::Providers { port, scenario } => ticketpay::providers::simulator::run(port, scenario).await,
        Command::Demo { tickets, budget, scenario, data, port, app_root, instances } => {
            let instances = host::check_instances(instances)?;
            demo::run(demo::DemoOptions { tickets, budget, scenario, data, port, app_root, instances }).await
        }
        Command::Bench { tickets, scenario, baseline_tickets, data, app_root, instances, max_batch, store, emulator } => {
            let store = host::StoreChoice::parse(&store, emulator)?;
            let instances = host::check_instances(instances)?;
            let max_batch = max_batch.map(host::check_max_batch).transpose()?;
            let opts = ticketpay::bench::BenchOptions { tickets, scenario, app_root, baseline_tickets, data, instances, max_batch, store };
            let report = ticketpay::bench::run(opts).await?;
            print!("{}", report.render());
            Ok(())
        }
        Command::Submit { file, client, currency, budget, no_wait, url, key } => {
            let s = submit::Submission { file: &file, client: &client, currency: &currency, budget: &budget };
            submit::run(&key.client(&url), &s, !no_wait).await.map(drop)
        }
        Command::Status { batch, url, key } => {
            let status = key.client(&url).get(&format!("/api/batches/{batch}")).await?;
            print!("{}", progress::summary(&status, None));
            Ok(())
        }
        Command::Redrive { batch, dry_run, url, key } => {
            let answer = key.client(&url).post(&format!("/api/batches/{batch}/redrive"), &serde_json::json!({ "dry_run": dry_run })).await?;
            let verb = if dry_run { "would redrive" } else { "redrove" };
            println!("{verb} {} parked ticket(s) of batch {batch}", answer["count"]);
            for t in answer["tickets"].as_array().into_iter().flatten() {
                println!("  {:<20} at {:<9} parked because: {}", t["ticket_id"].as_str().unwrap_or(""), t["stage"].as_str().unwrap_or(""), t["reason"].as_str().unwrap_or(""));
            }
            Ok(())
        }
        Command::Reconcile { batch, provider, json, url, key } => {
            let api = key.client(&url).with_timeout(std::time::Duration::from_secs(30 * 60));
            operations::reconcile(&api, &batch, provider.as_deref(), json).await
        }
        Command::Resolve { batch, ticket, action, note, reference, url, key } => {
            let decision = operations::Decision { action: &action, note: &note, reference: reference.as_deref() };
            operations::resolve(&key.client(&url), &batch, &ticket, &decision).await
        }
        Command::Results { batch, out, url, key } => operations::results(&key.client(&url), &batch, out.as_deref()).await,
        Command::Package { out, app_root, binary } => {
            let p = ticketpay::package::build(&ticketpay::package::PackageOptions { app_root, out, binary })?;
            println!("package {} ({} functions: {}) and {}", p.folder.display(), p.functions.len(), p.functions.join(", "), p.zip.display());
            Ok(())
        }
        Command::Trace { batch, ticket, full, url, key } => trace::run(&key.client(&url), &batch, &ticket, full).await,
    }
}
