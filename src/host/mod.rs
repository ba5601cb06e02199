//! The local Functions host (`ticketpay local`): reads the same host.json and
//! functions/*/function.json as Azure, starts the custom handler exactly as
//! the real host does, serves the Service Bus REST send endpoints on
//! loopback, delivers queue messages with Service Bus semantics from durable
//! SQLite queues, and proxies HTTP functions to the handler.

pub mod config;
pub mod dispatch;
pub mod guard;
pub mod invoke;
pub mod path;
pub mod proxy;
pub mod queue;
pub mod servicebus;
pub mod timer;
pub mod worker;

#[cfg(test)]
mod testkit;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use axum::routing::any;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::Emulation;
use crate::keys::{Access, ApiKeys};
use config::{HostConfig, QueueTrigger};
use guard::{BusToken, Guard};
use queue::{QueueStore, now_ms};
use worker::{Worker, WorkerSpec, WorkerState};

/// What `ticketpay local` is given.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Where host.json lives.
    pub app_root: PathBuf,
    /// Port of the host (0 = any free port).
    pub port: u16,
    /// Where to start the provider simulator (0 = any free port).
    pub providers_port: u16,
    /// A simulator already running: do not start one.
    pub providers_url: Option<String>,
    /// Scenario name or file for the simulator we start.
    pub scenario: Option<String>,
    /// Durable state, default `./.ticketpay`.
    pub data: PathBuf,
    /// Deliver every message twice at once (fault injection).
    pub duplicate_deliveries: bool,
    /// How many handler processes to run, as instances of a scaled-out app (1..=16).
    pub instances: usize,
    /// Messages per invocation of every queue function, in place of host.json's
    /// (1: one message per invocation, `"cardinality": "one"`).
    pub max_batch: Option<usize>,
    /// Where the handler keeps its state.
    pub store: StoreChoice,
}

/// Where the handler keeps its state, as `--store` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreChoice {
    /// SQLite in the data folder.
    #[default]
    Embedded,
    /// The Cosmos store code on the SDK's in-memory emulator, in the handler's process,
    /// behaving as the `--cosmos-*` flags say.
    CosmosEmulator(Emulation),
}

/// The command line's settings of the emulated Cosmos store, as given.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct EmulatorFlags {
    /// With --store cosmos-emulator: each container's provisioned throughput, in RU/s
    /// (at least 400), charged for every request; once a second's is spent, requests
    /// are answered 429 until it is back. Default: unlimited.
    #[arg(long = "cosmos-ru-per-s", value_name = "RU")]
    pub ru_per_second: Option<u64>,
    /// With --store cosmos-emulator: of every hundred transactional batches, how many
    /// (0 to 75) are answered 429 before they reach the emulator, whatever the
    /// throughput. Default: none.
    #[arg(long = "cosmos-throttled-batches", value_name = "PERCENT")]
    pub throttled_batches: Option<u8>,
    /// With --store cosmos-emulator: of every hundred writes, how many (0 to 25) are
    /// applied but their answer lost on the way back. Default: none.
    #[arg(long = "cosmos-lost-answers", value_name = "PERCENT")]
    pub lost_answers: Option<u8>,
}

impl StoreChoice {
    /// `--store NAME` with the emulator's flags.
    pub fn parse(name: &str, flags: EmulatorFlags) -> Result<StoreChoice> {
        let EmulatorFlags { ru_per_second, throttled_batches, lost_answers } = flags;
        let emulator_flags = ru_per_second.is_some() || throttled_batches.is_some() || lost_answers.is_some();
        match name {
            "embedded" if emulator_flags => Err(anyhow!("--cosmos-* flags need --store cosmos-emulator")),
            "embedded" => Ok(StoreChoice::Embedded),
            "cosmos-emulator" if !cfg!(feature = "cosmos-emulator") => {
                Err(anyhow!("--store cosmos-emulator needs a build with --features cosmos-emulator"))
            }
            "cosmos-emulator" => Emulation::new(ru_per_second, throttled_batches, lost_answers)
                .map(StoreChoice::CosmosEmulator)
                .map_err(|e| anyhow!("--store cosmos-emulator: {e}")),
            other => Err(anyhow!("--store must be embedded or cosmos-emulator (got {other})")),
        }
    }
}

/// Checks a `--max-batch` value: at least 1.
pub fn check_max_batch(n: usize) -> Result<usize> {
    if n >= 1 { Ok(n) } else { Err(anyhow!("--max-batch must be at least 1 (got {n})")) }
}

/// Most handler instances `ticketpay local --instances` runs.
pub const MAX_INSTANCES: usize = 16;

/// Checks an `--instances` value: 1 to [`MAX_INSTANCES`].
pub fn check_instances(n: usize) -> Result<usize> {
    if (1..=MAX_INSTANCES).contains(&n) {
        Ok(n)
    } else {
        Err(anyhow!("--instances must be between 1 and {MAX_INSTANCES} (got {n})"))
    }
}

/// One handler process of the app, as the host sees it.
pub(crate) struct Instance {
    /// `instance-{i}`.
    pub id: String,
    /// `http://127.0.0.1:{handler port}`.
    pub url: String,
    pub state: watch::Receiver<WorkerState>,
    /// The process id of the running handler (0 while none).
    pub pid: Arc<std::sync::atomic::AtomicI32>,
    /// Invocations delivered to it (queue, timer and HTTP).
    pub invocations: std::sync::atomic::AtomicU64,
}

impl Instance {
    pub fn new(id: String, url: String, state: watch::Receiver<WorkerState>) -> Instance {
        Instance { id, url, state, pid: Arc::default(), invocations: Default::default() }
    }

    pub fn ready(&self) -> bool {
        matches!(*self.state.borrow(), WorkerState::Ready)
    }

    pub fn counted(&self) -> &str {
        self.invocations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.url
    }
}

/// One queue-triggered function and the queue it drains.
pub(crate) struct QueueSpec {
    pub function: String,
    pub trigger: QueueTrigger,
    /// Woken when a message arrives on the queue: one per instance.
    pub wakes: Vec<Notify>,
    /// Instances waiting for messages on this queue now (free to take more).
    pub receiving: AtomicUsize,
    /// Which instance is woken first next time, so none is always first.
    wake_from: AtomicUsize,
}

impl QueueSpec {
    pub fn new(function: String, trigger: QueueTrigger, instances: usize) -> QueueSpec {
        let wakes = (0..instances).map(|_| Notify::new()).collect();
        QueueSpec { function, trigger, wakes, receiving: AtomicUsize::new(0), wake_from: AtomicUsize::new(0) }
    }

    pub fn wake(&self) {
        let n = self.wakes.len();
        let from = self.wake_from.fetch_add(1, Relaxed);
        for k in 0..n {
            self.wakes[(from + k) % n].notify_one();
        }
    }
}

/// What the HTTP endpoints and the dispatchers share.
pub(crate) struct Shared {
    pub config: HostConfig,
    pub store: QueueStore,
    /// By queue name, lower-cased (Service Bus entity names are case-insensitive).
    pub queues: BTreeMap<String, Arc<QueueSpec>>,
    /// The handler processes, each with its own port.
    pub instances: Vec<Instance>,
    /// Round-robin position for HTTP requests and timers.
    pub next: std::sync::atomic::AtomicUsize,
    /// Durable state (`{data}/leases.db` is read for `/admin/instances`).
    pub data: PathBuf,
    /// Client for the handler: no proxy, no redirects, pooled.
    pub client: reqwest::Client,
    pub guard: Guard,
    /// Until when the Service Bus endpoints answer 503 (`POST /admin/faults`).
    pub bus_down_until: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Shared {
    /// Some instance is ready.
    pub fn handler_ready(&self) -> bool {
        self.instances.iter().any(Instance::ready)
    }

    /// A ready instance, round robin.
    pub fn pick(&self) -> Option<&Instance> {
        let n = self.instances.len();
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (0..n).map(|k| &self.instances[(start + k) % n]).find(|i| i.ready())
    }

    /// Seconds left of an injected bus outage, if one is on.
    pub fn bus_down_for(&self) -> Option<Duration> {
        let until = (*self.bus_down_until.lock().unwrap_or_else(|p| p.into_inner()))?;
        until.checked_duration_since(std::time::Instant::now())
    }

    pub fn queue(&self, name: &str) -> Option<&Arc<QueueSpec>> {
        self.queues.get(&name.to_ascii_lowercase())
    }
}

/// The store, the HTTP server and the dispatchers, for a handler reachable at
/// `handler_url` (the process itself is someone else's business).
pub(crate) struct Core {
    pub url: String,
    #[cfg_attr(not(test), allow(dead_code))]
    pub shared: Arc<Shared>,
    dispatch: dispatch::Dispatch,
    server: JoinHandle<()>,
    server_stop: oneshot::Sender<()>,
    pruner: JoinHandle<()>,
    timers_stop: watch::Sender<bool>,
    timers: Vec<JoinHandle<()>>,
}

impl Core {
    pub(crate) async fn start(
        config: HostConfig,
        data: &Path,
        listener: TcpListener,
        instances: Vec<Instance>,
        guard: Guard,
    ) -> Result<Core> {
        let store = open_queues(data).await?;
        let queues = queue_specs(&config, instances.len());
        release_stale_locks(&store, &queues).await?;
        let client = handler_client()?;
        let proxy_http = proxies_http(&config);
        let bus_down_until = std::sync::Mutex::new(None);
        let next = Default::default();
        let data = data.to_path_buf();
        let shared =
            Arc::new(Shared { config, store, queues, instances, next, data, client, guard, bus_down_until });
        let (url, server, server_stop) = serve(listener, routes(&shared, proxy_http))?;
        let dispatch = dispatch::Dispatch::start(shared.clone());
        let (timers_stop, timers_stopped) = watch::channel(false);
        let timers = timer::start(shared.clone(), shared.config.timer_functions(), timers_stopped);
        let pruner = start_pruner(&shared);
        Ok(Core { url, shared, dispatch, server, server_stop, pruner, timers_stop, timers })
    }

    /// Stop delivering, wait (bounded) for in-flight invocations, then stop serving.
    pub(crate) async fn stop_delivering(&mut self, bound: Duration) {
        let _ = self.timers_stop.send(true);
        for t in self.timers.drain(..) {
            let abort = t.abort_handle();
            if tokio::time::timeout(bound, t).await.is_err() {
                abort.abort();
            }
        }
        let d = std::mem::replace(&mut self.dispatch, dispatch::Dispatch::idle());
        d.stop(bound).await;
    }

    pub(crate) async fn stop(mut self) {
        self.stop_delivering(Duration::from_secs(10)).await;
        self.pruner.abort();
        let _ = self.server_stop.send(());
        if tokio::time::timeout(Duration::from_secs(5), &mut self.server).await.is_err() {
            self.server.abort();
        }
    }
}

/// `{data}/queues.db`, opened off the runtime's threads.
async fn open_queues(data: &Path) -> Result<QueueStore> {
    let db = data.join("queues.db");
    tokio::task::spawn_blocking(move || QueueStore::open(&db)).await?
}

/// Every queue function, by queue name lower-cased.
fn queue_specs(config: &HostConfig, instances: usize) -> BTreeMap<String, Arc<QueueSpec>> {
    config
        .queue_functions()
        .map(|(f, q)| {
            let spec = QueueSpec::new(f.name.clone(), q.clone(), instances);
            (q.queue.to_ascii_lowercase(), Arc::new(spec))
        })
        .collect()
}

/// Unlocks what the previous run held when it stopped, so it is delivered again.
async fn release_stale_locks(store: &QueueStore, queues: &BTreeMap<String, Arc<QueueSpec>>) -> Result<()> {
    let max_delivery: HashMap<String, u32> =
        queues.values().map(|s| (s.trigger.queue.clone(), s.trigger.settings.max_delivery_count)).collect();
    let store = store.clone();
    let released = tokio::task::spawn_blocking(move || store.release_stale_locks(&max_delivery, now_ms())).await??;
    if released > 0 {
        tracing::info!("released {released} message lock(s) left by the previous run; they will be redelivered");
    }
    Ok(())
}

/// Client for the handler: no proxy, no redirects, pooled.
fn handler_client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()?)
}

/// Whether HTTP functions are proxied to the handler: whenever there are any.
fn proxies_http(config: &HostConfig) -> bool {
    let proxy_http = config.has_http_function();
    if proxy_http && !config.proxy_http {
        tracing::warn!(
            "host.json customHandler.enableProxyingHttpRequest is not true; ticketpay local proxies HTTP functions anyway"
        );
    }
    proxy_http
}

/// The Service Bus endpoints, and HTTP functions under the route prefix if proxied.
fn routes(shared: &Arc<Shared>, proxy_http: bool) -> axum::Router {
    let mut app = servicebus::routes(shared);
    if proxy_http {
        let prefix = &shared.config.route_prefix;
        if prefix.is_empty() {
            app = app.fallback(proxy::forward);
        } else {
            app = app
                .route(&format!("/{prefix}"), any(proxy::forward))
                .route(&format!("/{prefix}/"), any(proxy::forward))
                .route(&format!("/{prefix}/{{*rest}}"), any(proxy::forward));
        }
    }
    path::guarded(app.with_state(shared.clone()))
}

/// Serves `app` on `listener` until told to stop; returns its URL.
fn serve(listener: TcpListener, app: axum::Router) -> Result<(String, JoinHandle<()>, oneshot::Sender<()>)> {
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!("host HTTP server failed: {e}");
        }
    });
    Ok((url, server, stop))
}

/// Forgets message ids older than the longest duplicate-detection window, every minute.
fn start_pruner(shared: &Shared) -> JoinHandle<()> {
    let store = shared.store.clone();
    let window = shared.queues.values().map(|q| q.trigger.settings.duplicate_detection_window).max();
    tokio::spawn(async move {
        let Some(window) = window else { return };
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            let store = store.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.prune_dedup(window, now_ms())).await {
                tracing::warn!("cannot prune duplicate-detection history: {e:#}");
            }
        }
    })
}

/// A running local host.
pub struct LocalHost {
    /// `http://127.0.0.1:{port}`: HTTP functions under `/api`, Service Bus REST (with the
    /// host's token), `/admin/queues` (with an operator key when keys are configured).
    pub url: String,
    pub providers_url: String,
    /// No API keys are configured: anyone who reaches the API is an operator.
    pub api_open: bool,
    core: Core,
    workers: Vec<Worker>,
    simulator: Option<JoinHandle<()>>,
}

const DEFAULT_SCENARIO: &str = "realistic";

impl LocalHost {
    /// Starts everything; returns once the handler answered readiness.
    pub async fn start(opts: LocalOptions) -> Result<LocalHost> {
        let cwd = std::env::current_dir()?;
        let app_root = find_app_root(&cwd, &opts.app_root)?;
        let config = host_config(&app_root, &opts)?;
        let data = data_dir(&cwd, &opts.data)?;
        let settings = read_settings(&app_root)?;
        let access = api_access(&settings)?;
        let listener = TcpListener::bind(("127.0.0.1", opts.port))
            .await
            .with_context(|| format!("cannot listen on 127.0.0.1:{}", opts.port))?;
        let bus_url = format!("http://127.0.0.1:{}", listener.local_addr()?.port());
        let n = instance_count(&opts)?;
        let program = worker::resolve_executable(&app_root, &config.executable)?;
        let providers = Providers::start(&opts, &settings, scenario_from(&cwd, opts.scenario.clone())).await?;
        let bus_token = bus_token(&settings);
        let env = handler_env(&settings, &app_root, &data, bus_url, &bus_token, &providers, opts.store);
        let launch = Launch::new(program, &config, &app_root, &settings, env);
        let (pending, instances) = match instances(n, &launch) {
            Ok(made) => made,
            Err(e) => {
                providers.stop();
                return Err(e);
            }
        };
        let api_open = access == Access::Open;
        let guard = Guard { access, bus_token };
        let core = match Core::start(config, &data, listener, instances, guard).await {
            Ok(c) => c,
            Err(e) => {
                providers.stop();
                return Err(e);
            }
        };
        let workers = match start_workers(pending).await {
            Ok(w) => w,
            Err(e) => {
                core.stop().await;
                providers.stop();
                return Err(e);
            }
        };
        let Providers { url: providers_url, simulator, .. } = providers;
        Ok(LocalHost { url: core.url.clone(), providers_url, api_open, core, workers, simulator })
    }

    /// Stops delivering, waits for in-flight invocations (at most ~10 s),
    /// stops the handler, the HTTP server and the simulator.
    pub async fn shutdown(mut self) -> Result<()> {
        self.core.stop_delivering(Duration::from_secs(10)).await;
        for w in self.workers {
            w.stop().await;
        }
        self.core.stop().await;
        if let Some(s) = self.simulator {
            s.abort();
        }
        Ok(())
    }
}

/// `--app-root` as an absolute path that exists.
fn find_app_root(cwd: &Path, given: &Path) -> Result<PathBuf> {
    let app_root = cwd.join(given);
    app_root.canonicalize().with_context(|| format!("app root {} not found", app_root.display()))
}

/// host.json and the functions, with the command line's overrides.
fn host_config(app_root: &Path, opts: &LocalOptions) -> Result<HostConfig> {
    let mut config = HostConfig::load(app_root)?;
    config.duplicate_deliveries = opts.duplicate_deliveries;
    if let Some(n) = opts.max_batch {
        config.set_max_batch(check_max_batch(n)?);
    }
    Ok(config)
}

/// `--data`, created if missing.
fn data_dir(cwd: &Path, given: &Path) -> Result<PathBuf> {
    let data = cwd.join(given);
    std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
    Ok(data.canonicalize()?)
}

/// A scenario file relative to our directory must still be found from the handler's.
fn scenario_from(cwd: &Path, scenario: Option<String>) -> Option<String> {
    scenario.map(|s| match Path::new(&s) {
        p if p.is_file() => cwd.join(p).to_string_lossy().into_owned(),
        _ => s,
    })
}

/// Where the handler reaches the providers, and the simulator playing them if we started it.
struct Providers {
    url: String,
    /// The scenario whose limits the handler keeps to, whoever plays the providers.
    config: Option<String>,
    simulator: Option<JoinHandle<()>>,
}

impl Providers {
    /// The providers URL given on the command line or in settings, else a simulator started here.
    async fn start(opts: &LocalOptions, settings: &BTreeMap<String, String>, scenario: Option<String>) -> Result<Providers> {
        let given = opts.providers_url.clone().or_else(|| settings.get("TICKETPAY_PROVIDERS_URL").cloned());
        if let Some(u) = given {
            return Ok(Providers { url: u.trim_end_matches('/').to_string(), config: scenario, simulator: None });
        }
        let l = TcpListener::bind(("127.0.0.1", opts.providers_port))
            .await
            .with_context(|| format!("cannot listen on 127.0.0.1:{} for the provider simulator", opts.providers_port))?;
        let url = format!("http://{}", l.local_addr()?);
        let played = scenario.clone().unwrap_or_else(|| DEFAULT_SCENARIO.to_string());
        let simulator = Some(start_simulator(l, Some(&played)).await?);
        Ok(Providers { url, config: scenario, simulator })
    }

    fn stop(self) {
        if let Some(s) = self.simulator {
            s.abort();
        }
    }
}

/// `--instances`, checked against the store: the emulator lives in one handler's process.
fn instance_count(opts: &LocalOptions) -> Result<usize> {
    let n = check_instances(opts.instances)?;
    if matches!(opts.store, StoreChoice::CosmosEmulator(_)) && n != 1 {
        bail!("--store cosmos-emulator runs one handler instance (the emulator lives in its process), not {n}");
    }
    Ok(n)
}

/// A setting as the handler reads it: `Values` win over the environment.
fn setting(settings: &BTreeMap<String, String>, name: &str) -> Option<String> {
    settings.get(name).cloned().or_else(|| std::env::var(name).ok())
}

/// The token the handler presents to the Service Bus endpoints: the configured one, else a fresh one.
fn bus_token(settings: &BTreeMap<String, String>) -> BusToken {
    match setting(settings, crate::config::BUS_TOKEN).map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()) {
        Some(given) => BusToken::given(&given),
        None => BusToken::random(),
    }
}

/// A process environment in which each name appears once.
#[derive(Clone)]
struct Env(Vec<(String, String)>);

impl Env {
    fn set(&mut self, name: &str, value: String) {
        self.0.retain(|(n, _)| n != name);
        self.0.push((name.to_string(), value));
    }

    /// Sets `name` unless it is there already: local.settings.json wins.
    fn set_unless_given(&mut self, name: &str, value: String) {
        if !self.0.iter().any(|(n, _)| n == name) {
            self.set(name, value);
        }
    }
}

/// The environment every handler instance starts with: the `Values` of
/// local.settings.json, then what the host tells the handler.
fn handler_env(
    settings: &BTreeMap<String, String>,
    app_root: &Path,
    data: &Path,
    bus_url: String,
    bus_token: &BusToken,
    providers: &Providers,
    store: StoreChoice,
) -> Env {
    let mut env = Env(settings.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    env.set("FUNCTIONS_APP_ROOT_PATH", app_root.to_string_lossy().into_owned());
    env.set_unless_given("FUNCTIONS_WORKER_RUNTIME", "custom".into());
    env.set_unless_given(crate::config::BUS_URL, bus_url);
    env.set(crate::config::BUS_TOKEN, bus_token.as_str().to_owned());
    env.set_unless_given("TICKETPAY_DATA_DIR", data.to_string_lossy().into_owned());
    env.set_unless_given("TICKETPAY_PROVIDERS_URL", providers.url.clone());
    if let Some(pc) = &providers.config {
        env.set_unless_given("TICKETPAY_PROVIDERS_CONFIG", pc.clone());
    }
    if let StoreChoice::CosmosEmulator(emulation) = store {
        env.set(crate::config::STORE, "cosmos-emulator".into());
        if let Some(ru) = emulation.ru_per_second {
            env.set(crate::config::EMULATOR_THROUGHPUT, ru.to_string());
        }
        env.set(crate::config::EMULATOR_THROTTLED_BATCHES, emulation.throttled_batches_percent.to_string());
        env.set(crate::config::EMULATOR_LOST_ANSWERS, emulation.lost_answers_percent.to_string());
    }
    env
}

/// How every handler instance is started, as host.json's customHandler says.
struct Launch {
    program: PathBuf,
    args: Vec<String>,
    cwd: PathBuf,
    env: Env,
}

impl Launch {
    fn new(program: PathBuf, config: &HostConfig, app_root: &Path, settings: &BTreeMap<String, String>, env: Env) -> Launch {
        let args = config.arguments.iter().map(|a| worker::expand(a, |k| setting(settings, k))).collect();
        let cwd =
            if config.working_directory.is_empty() { app_root.to_path_buf() } else { app_root.join(&config.working_directory) };
        Launch { program, args, cwd, env }
    }

    /// Instance `i`: its own port, worker id and instance id, otherwise the same.
    fn instance(&self, i: usize) -> Result<(PendingWorker, Instance)> {
        let port = free_port()?;
        let mut env = self.env.clone();
        env.set("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string());
        env.set("FUNCTIONS_HTTPWORKER_PORT", port.to_string());
        env.set("FUNCTIONS_CUSTOMHANDLER_WORKER_ID", uuid::Uuid::new_v4().to_string());
        env.set("TICKETPAY_INSTANCE_ID", format!("instance-{i}"));
        let (state, state_rx) = watch::channel(WorkerState::Starting);
        let instance = Instance::new(format!("instance-{i}"), format!("http://127.0.0.1:{port}"), state_rx);
        let spec = WorkerSpec { program: self.program.clone(), args: self.args.clone(), cwd: self.cwd.clone(), env: env.0, port };
        Ok((PendingWorker { spec, state, pid: instance.pid.clone() }, instance))
    }
}

/// A handler process not started yet, wired to the instance the host knows it as.
struct PendingWorker {
    spec: WorkerSpec,
    state: watch::Sender<WorkerState>,
    pid: Arc<std::sync::atomic::AtomicI32>,
}

/// One handler process per instance, yet to start, and the instances the host delivers to.
fn instances(n: usize, launch: &Launch) -> Result<(Vec<PendingWorker>, Vec<Instance>)> {
    (0..n).map(|i| launch.instance(i)).collect::<Result<Vec<_>>>().map(|v| v.into_iter().unzip())
}

/// Starts the handler processes and waits until each is ready; if one is
/// not, stops them all.
async fn start_workers(pending: Vec<PendingWorker>) -> Result<Vec<Worker>> {
    let workers: Vec<Worker> = pending.into_iter().map(|p| Worker::start_with_pid(p.spec, p.state, p.pid)).collect();
    if let Err(e) = all_ready(&workers).await {
        for w in workers {
            w.stop().await;
        }
        return Err(e);
    }
    Ok(workers)
}

async fn all_ready(workers: &[Worker]) -> Result<()> {
    for w in workers {
        w.wait_ready().await?;
    }
    Ok(())
}

/// `ticketpay local`: start, announce on stdout, run until Ctrl-C or
/// SIGTERM, shut down.
pub async fn run(opts: LocalOptions) -> Result<()> {
    use std::io::Write;
    let host = LocalHost::start(opts).await?;
    if host.api_open {
        warn_open(&host.url);
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ticketpay local: listening on {}", host.url)?;
        writeln!(out, "ticketpay local: providers at {}", host.providers_url)?;
        writeln!(out, "ticketpay local: ready")?;
        out.flush()?;
    }
    crate::shutdown::signal().await;
    tracing::info!("shutting down");
    host.shutdown().await
}

fn warn_open(url: &str) {
    let keys = crate::config::API_KEYS;
    eprintln!(
        "\n  !!! ticketpay local: WARNING: {keys} is not set, so the API at {url}/api is OPEN:\n  \
         !!! anyone who reaches it acts as an operator and sees every client's batches.\n  \
         !!! Set {keys} in local.settings.json Values (see local.settings.json.example) to require keys.\n"
    );
}

/// The API's keys as the handler will read them (`Values` win over the
/// environment), so `/admin` takes the same keys as `/api`.
fn api_access(settings: &BTreeMap<String, String>) -> Result<Access> {
    let name = crate::config::API_KEYS;
    let keys = setting(settings, name);
    match keys.filter(|k| !k.trim().is_empty()) {
        None => Ok(Access::Open),
        Some(keys) => Ok(Access::Keys(ApiKeys::parse(&keys).map_err(|e| anyhow!("setting {name}: {e}"))?)),
    }
}

/// `Values` of `{app_root}/local.settings.json`, if the file exists.
fn read_settings(app_root: &Path) -> Result<BTreeMap<String, String>> {
    let path = app_root.join("local.settings.json");
    if !path.exists() {
        return Ok(BTreeMap::new());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let Some(values) = json.get("Values") else { return Ok(BTreeMap::new()) };
    let values = values.as_object().ok_or_else(|| anyhow!("{}: Values must be an object", path.display()))?;
    Ok(values
        .iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts the provider simulator on `listener`.
async fn start_simulator(listener: TcpListener, scenario: Option<&str>) -> Result<JoinHandle<()>> {
    let scenario = crate::providers::simulator::Scenario::load(scenario)?;
    Ok(tokio::spawn(async move {
        if let Err(e) = crate::providers::simulator::serve(listener, scenario).await {
            tracing::error!("provider simulator failed: {e:#}");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_choices_are_named_and_the_emulators_flags_go_only_with_it() {
        let none = EmulatorFlags::default();
        let capped = EmulatorFlags { ru_per_second: Some(4000), ..none };
        assert_eq!(StoreChoice::parse("embedded", none).unwrap(), StoreChoice::Embedded);
        assert!(StoreChoice::parse("embedded", capped).unwrap_err().to_string().contains("--store cosmos-emulator"));
        let lossy = EmulatorFlags { lost_answers: Some(5), ..none };
        assert!(StoreChoice::parse("embedded", lossy).unwrap_err().to_string().contains("--store cosmos-emulator"));
        assert!(StoreChoice::parse("sqlite", none).unwrap_err().to_string().contains("sqlite"));
        if cfg!(feature = "cosmos-emulator") {
            let all = EmulatorFlags { ru_per_second: Some(4000), throttled_batches: Some(20), lost_answers: Some(5) };
            let expected = Emulation { ru_per_second: Some(4000), throttled_batches_percent: 20, lost_answers_percent: 5 };
            assert_eq!(StoreChoice::parse("cosmos-emulator", all).unwrap(), StoreChoice::CosmosEmulator(expected));
            let low = EmulatorFlags { ru_per_second: Some(100), ..none };
            assert!(StoreChoice::parse("cosmos-emulator", low).unwrap_err().to_string().contains("at least 400"));
            let throttled = EmulatorFlags { throttled_batches: Some(80), ..none };
            assert!(StoreChoice::parse("cosmos-emulator", throttled).unwrap_err().to_string().contains("at most 75"));
            let lost = EmulatorFlags { lost_answers: Some(30), ..none };
            assert!(StoreChoice::parse("cosmos-emulator", lost).unwrap_err().to_string().contains("at most 25"));
        } else {
            assert!(StoreChoice::parse("cosmos-emulator", none).unwrap_err().to_string().contains("--features cosmos-emulator"));
        }
    }
}
