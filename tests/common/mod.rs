//! Starts the real processes (local host with its handler, provider simulator)
//! on free loopback ports, each with its own data folder, and talks HTTP to them;
//! or the local host in the test's process ([`in_process::InProcessStack`]), its handler still a process.

#![allow(dead_code)]

pub mod in_process;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_ticketpay");
pub const APP_ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A child process that is killed when dropped.
pub struct Process {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Process {
    /// Starts `ticketpay ARGS` and waits for each of `expect` to appear at the start of a stdout line;
    /// returns the rest of each such line.
    pub fn start(args: &[&str], env: &[(&str, &str)], expect: &[&str]) -> (Process, Vec<String>) {
        Process::start_with_stderr(args, env, expect, Stdio::inherit())
    }

    /// [`Process::start`], with the process's stderr (its logs, and its handler's) sent to `stderr`.
    pub fn start_with_stderr(args: &[&str], env: &[(&str, &str)], expect: &[&str], stderr: Stdio) -> (Process, Vec<String>) {
        let mut cmd = Command::new(BIN);
        cmd.args(args).current_dir(APP_ROOT).stdout(Stdio::piped()).stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("ticketpay starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("[{}] {line}", std::process::id());
                if tx.send(line).is_err() {
                    // nobody listens any more; keep draining so the child never blocks
                }
            }
        });
        let mut process = Process { child, lines: rx };
        let found = expect.iter().map(|prefix| process.wait_for_line(prefix, Duration::from_secs(60))).collect();
        (process, found)
    }

    pub fn wait_for_line(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_owned();
                    }
                }
                Err(_) => panic!("no line starting with `{prefix}` within {within:?}"),
            }
        }
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The pids of this process's children (the local host's handler).
    pub fn children(&self) -> Vec<i32> {
        let pid = self.child.id();
        let mut out = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
            let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(list.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
        out
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child.wait().expect("the process exits")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The provider simulator on its own, so its counters outlive restarts of the host.
pub fn simulator(scenario: &str) -> (Process, String) {
    let (p, found) = Process::start(
        &["providers", "--port", "0", "--scenario", scenario],
        &[],
        &["ticketpay providers: listening on"],
    );
    let url = found[0].split_whitespace().next().expect("a URL").to_owned();
    (p, url)
}

/// A local host (with its handler) on a free port, in a process of its own.
pub struct Stack {
    pub host: Process,
    endpoints: Endpoints,
}

impl std::ops::Deref for Stack {
    type Target = Endpoints;

    fn deref(&self) -> &Endpoints {
        &self.endpoints
    }
}

/// Where a running stack answers, and a client to ask it.
pub struct Endpoints {
    pub url: String,
    pub providers_url: String,
    pub data: PathBuf,
    pub http: reqwest::blocking::Client,
}

pub struct StackOptions<'a> {
    pub scenario: &'a str,
    pub providers_url: Option<&'a str>,
    pub data: &'a Path,
    pub env: &'a [(&'a str, &'a str)],
    pub extra_args: &'a [&'a str],
}

impl Stack {
    pub fn start(opts: StackOptions<'_>) -> Stack {
        Stack::start_with_stderr(opts, Stdio::inherit())
    }

    /// [`Stack::start`], with the host's stderr (its logs and its handler's) sent to `stderr`.
    pub fn start_with_stderr(opts: StackOptions<'_>, stderr: Stdio) -> Stack {
        let data = opts.data.to_str().expect("utf-8 path").to_owned();
        let mut args = vec!["local", "--port", "0", "--providers-port", "0", "--data", &data, "--scenario", opts.scenario];
        if let Some(url) = opts.providers_url {
            args.extend(["--providers-url", url]);
        }
        args.extend(opts.extra_args);
        let (host, found) = Process::start_with_stderr(
            &args,
            opts.env,
            &["ticketpay local: listening on", "ticketpay local: providers at", "ticketpay local: ready"],
            stderr,
        );
        Stack { host, endpoints: Endpoints::new(found[0].clone(), found[1].clone(), opts.data) }
    }
}

impl Endpoints {
    pub fn new(url: String, providers_url: String, data: &Path) -> Endpoints {
        let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        Endpoints { url, providers_url, data: data.to_owned(), http }
    }

    pub fn get(&self, path: &str) -> Value {
        let r = self.http.get(format!("{}{path}", self.url)).send().expect("GET answered");
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().expect("JSON")
    }

    /// A GET that may find the handler restarting (502): `None` then.
    pub fn try_get(&self, path: &str) -> Option<Value> {
        let r = self.http.get(format!("{}{path}", self.url)).send().ok()?;
        if r.status().as_u16() == 502 {
            return None;
        }
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().ok()
    }

    pub fn get_raw(&self, path: &str) -> reqwest::blocking::Response {
        self.http.get(format!("{}{path}", self.url)).send().expect("GET answered")
    }

    pub fn post(&self, path: &str, body: &Value) -> Value {
        let r = self.http.post(format!("{}{path}", self.url)).json(body).send().expect("POST answered");
        assert!(r.status().is_success(), "POST {path}: {}", r.status());
        r.json().expect("JSON")
    }

    pub fn upload_json(&self, body: &Value, key: Option<&str>) -> reqwest::blocking::Response {
        let mut req = self.http.post(format!("{}/api/batches", self.url)).json(body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        req.send().expect("POST answered")
    }

    pub fn submit(&self, tickets: usize, budget: &str) -> String {
        let r = self.upload_json(&batch_json("ops", tickets, budget), None);
        assert_eq!(r.status().as_u16(), 202, "upload accepted");
        r.json::<Value>().unwrap()["batch_id"].as_str().unwrap().to_owned()
    }

    /// [`Self::submit`] as a client does when the store is unreliable: with an
    /// Idempotency-Key, sent again with it while the API answers 503.
    pub fn submit_retrying(&self, tickets: usize, budget: &str) -> String {
        let (body, key) = (batch_json("ops", tickets, budget), format!("upload-{}", std::process::id()));
        poll("the upload to be accepted", Duration::from_secs(60), || {
            let r = self.upload_json(&body, Some(&key));
            match r.status().as_u16() {
                200 | 202 => Some(r.json::<Value>().unwrap()["batch_id"].as_str().unwrap().to_owned()),
                503 => None,
                other => panic!("upload answered {other}: {}", r.text().unwrap_or_default()),
            }
        })
    }

    pub fn status(&self, batch_id: &str) -> Value {
        self.get(&format!("/api/batches/{batch_id}"))
    }

    /// Polls until the batch completes; panics with its last status if it does not within `within`.
    pub fn wait_complete(&self, batch_id: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let status = self.try_get(&format!("/api/batches/{batch_id}")).unwrap_or(Value::Null);
            if status["status"] == "completed" {
                return status;
            }
            assert!(Instant::now() < deadline, "batch not complete within {within:?}: {status}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Every ticket of the batch, page by page.
    pub fn all_tickets(&self, batch_id: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let page = self.get(&format!("/api/batches/{batch_id}/tickets?limit=1000&cursor={cursor}"));
            out.extend(page["tickets"].as_array().unwrap().iter().cloned());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = c.to_owned(),
                None => return out,
            }
        }
    }

    pub fn queues(&self) -> Value {
        self.get("/admin/queues")
    }
}

/// The JSON of a successful answer.
/// Runs `ticketpay bench ARGS` in a data folder of its own: its table, and the JSON line it ends with.
pub fn bench(args: &[&str]) -> (String, Value) {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["bench", "--data", data.path().to_str().unwrap()])
        .args(args)
        .current_dir(APP_ROOT)
        .output()
        .expect("ticketpay bench runs");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "bench failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().expect("some output");
    let report: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("the last line is JSON ({e}): {last}"));
    (stdout, report)
}

pub fn ok_json(r: reqwest::blocking::Response) -> Value {
    let status = r.status();
    let body: Value = r.json().unwrap_or(Value::Null);
    assert!(status.is_success(), "{status}: {body}");
    body
}

/// A problem+json refusal with this status.
pub fn problem(r: reqwest::blocking::Response, status: u16) -> Value {
    assert_eq!(r.status().as_u16(), status);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let p: Value = r.json().unwrap();
    assert_eq!(p["status"], status, "{p}");
    p
}

/// Makes a provider misbehave: `POST /admin/outages` on the simulator.
pub fn outage(providers_url: &str, body: Value) {
    let r = reqwest::blocking::Client::new().post(format!("{providers_url}/admin/outages")).json(&body).send().unwrap();
    assert!(r.status().is_success(), "outage {body} accepted: {}", r.status());
}

pub fn stats(providers_url: &str) -> Value {
    reqwest::blocking::get(format!("{providers_url}/stats")).unwrap().json().unwrap()
}

pub fn batch_json(client: &str, tickets: usize, budget: &str) -> Value {
    let authorities = ["CITY-PARKING", "STATE-TOLLS", "METRO-TRANSIT"];
    let tickets: Vec<Value> = (1..=tickets)
        .map(|i| json!({"ticket_id": format!("T{i:06}"), "authority": authorities[i % 3], "reference": format!("REF-{client}-{i}")}))
        .collect();
    json!({"client_id": client, "currency": "EUR", "budget": budget, "tickets": tickets})
}

/// Parses a decimal string in EUR into cents.
pub fn cents(v: &Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("a decimal string, found {v}"));
    let (whole, frac) = s.split_once('.').unwrap_or((s, "00"));
    whole.parse::<i64>().unwrap() * 100 + frac.parse::<i64>().unwrap()
}

pub const END_STATES: [&str; 7] = ticketpay::domain::Status::END_NAMES;

/// The promises that hold for every completed batch: every ticket at an end
/// state, paid within budget, the money adding up, nothing charged twice, and
/// no provider pushed past its limits.
pub fn assert_batch_invariants(status: &Value, stats: &Value, tickets: u64) {
    let ended: u64 = END_STATES.iter().map(|s| status["counts"][s].as_u64().unwrap_or(0)).sum();
    assert_eq!(ended, tickets, "every ticket at an end state: {status}");
    let (budget, paid, reserved, remaining) =
        (cents(&status["budget"]), cents(&status["paid"]), cents(&status["reserved"]), cents(&status["remaining"]));
    assert!(paid <= budget, "paid {paid} within budget {budget}");
    assert_eq!(remaining, budget - paid - reserved, "remaining = budget - paid - reserved");
    if status["counts"]["parked"].as_u64().unwrap_or(0) == 0 {
        // Only a ticket parked mid-payment still holds a reservation.
        assert_eq!(reserved, 0, "nothing left reserved once complete: {status}");
        assert_eq!(remaining, budget - paid, "remaining = budget - paid");
    }
    assert_limits_held(stats);
}

pub fn assert_limits_held(stats: &Value) {
    for (name, s) in stats.as_object().unwrap() {
        if let Some(d) = s.get("duplicate_charges") {
            assert_eq!(d, 0, "{name} charged twice: {s}");
        }
        let (limit_rps, limit_in_flight) = (s["limit_rps"].as_u64().unwrap(), s["limit_in_flight"].as_u64().unwrap());
        if limit_rps > 0 {
            assert!(s["peak_rps"].as_u64().unwrap() <= limit_rps, "{name} over its rate limit: {s}");
        }
        if limit_in_flight > 0 {
            assert!(s["peak_in_flight"].as_u64().unwrap() <= limit_in_flight, "{name} over its concurrency limit: {s}");
        }
    }
}

/// An OTLP/HTTP JSON receiver that keeps every request body as it came.
pub fn recorder() -> (String, Arc<Mutex<Vec<String>>>) {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let keep = bodies.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new().unwrap().block_on(async move {
            let app = axum::Router::new().route(
                "/v1/traces",
                axum::routing::post(move |body: axum::body::Bytes| {
                    let keep = keep.clone();
                    async move {
                        keep.lock().unwrap().push(String::from_utf8_lossy(&body).into_owned());
                        "{}"
                    }
                }),
            );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (url, bodies)
}

impl Endpoints {
    /// `GET /admin/instances`: the handler instances the host runs.
    pub fn instances(&self) -> Vec<Value> {
        self.get("/admin/instances")["instances"].as_array().expect("a list of instances").clone()
    }
}

/// Polls `f` every 100 ms until it returns `Some`; panics saying `what` after `within`.
pub fn poll<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Keys for the suites that check who may do what: one operator, two clients.
pub const OPS_KEY: &str = "ops-key-41c9e07d2b";
pub const ACME_API_KEY: &str = "acme-key-9d3f51a0c6";
pub const GLOBEX_API_KEY: &str = "globex-key-07b2e8f4a1";

/// `TICKETPAY_API_KEYS` for [`OPS_KEY`] (named `operations`), [`ACME_API_KEY`] and [`GLOBEX_API_KEY`].
pub fn three_keys() -> String {
    use ticketpay::api::access::key_digest;
    json!([
        { "name": "operations", "role": "operator", "sha256": key_digest(OPS_KEY) },
        { "name": "acme-erp", "role": "client", "client_id": "acme", "sha256": key_digest(ACME_API_KEY) },
        { "name": "globex-erp", "role": "client", "client_id": "globex", "sha256": key_digest(GLOBEX_API_KEY) },
    ])
    .to_string()
}

/// A copy of the repository's host.json and function.json files in `dir`, with a
/// local.settings.json of `values`: pass it as `--app-root`.
pub fn app_root_with(dir: &Path, values: Value) {
    std::fs::copy(Path::new(APP_ROOT).join("host.json"), dir.join("host.json")).unwrap();
    for entry in std::fs::read_dir(Path::new(APP_ROOT).join("functions")).unwrap() {
        let function = entry.unwrap().path();
        let target = dir.join("functions").join(function.file_name().unwrap());
        std::fs::create_dir_all(&target).unwrap();
        std::fs::copy(function.join("function.json"), target.join("function.json")).unwrap();
    }
    let settings = json!({ "IsEncrypted": false, "Values": values });
    std::fs::write(dir.join("local.settings.json"), settings.to_string()).unwrap();
}

/// A request with an API key.
pub fn keyed(s: &Endpoints, method: &str, path: &str, key: &str, body: Option<&Value>) -> reqwest::blocking::Response {
    send(s, method, path, Some(key), body)
}

/// A request with an API key, if any.
pub fn send(s: &Endpoints, method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> reqwest::blocking::Response {
    let mut request = s.http.request(method.parse().unwrap(), format!("{}{path}", s.url));
    if let Some(key) = key {
        request = request.header("x-functions-key", key);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    request.send().expect("answered")
}

/// A scenario file with no latency, no limits, no faults and this `[outcomes]` mix; `extra` is appended.
pub fn outcomes_scenario(dir: &Path, outcomes: &str, extra: &str) -> String {
    let text = format!(
        "description = \"test\"\nseed = 7\n[client]\ntimeout_ms = 2000\nrate_headroom = 0.9\n[outcomes]\namount_minor = [500, 20000]\n{outcomes}\n[defaults]\nlatency_ms = [0, 0]\nhang_ms = 50\n{extra}\n"
    );
    let path = dir.join("scenario.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Every request a provider received is in its ticket's audit trail, once,
/// and every exchange recorded as answered was received: `Err` says what is
/// missing or recorded twice.
pub fn audit_gaps(stack: &Stack, batches: &[String], providers: &str) -> Result<(), String> {
    let tickets: Vec<Value> = batches
        .iter()
        .flat_map(|b| {
            stack.all_tickets(b).into_iter().map(move |t| (b.clone(), t["ticket_id"].as_str().unwrap().to_owned()))
        })
        .map(|(b, id)| stack.get(&format!("/api/batches/{b}/tickets/{id}")))
        .collect();
    let received: Value = reqwest::blocking::get(format!("{providers}/requests")).unwrap().json().unwrap();
    let received: HashSet<String> = received["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["request_id"].as_str().unwrap_or_else(|| panic!("every request carries an id: {r}")).to_owned())
        .collect();
    let mut recorded = HashSet::new();
    for t in &tickets {
        for e in t["timeline"].as_array().unwrap().iter().filter(|e| e["type"] == "exchange") {
            let id = e["request"]["headers"]["x-request-id"].as_str().unwrap_or_else(|| panic!("an exchange names its request: {e}"));
            if e["response"].is_object() {
                assert!(received.contains(id), "recorded as answered but never received: {e}");
            }
            if !recorded.insert(id.to_owned()) {
                return Err(format!("request {id} is in the audit trail twice: {e}"));
            }
        }
    }
    let missing: Vec<_> = received.difference(&recorded).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("{} requests received but not in any audit trail, e.g. {:?}", missing.len(), missing.first()))
    }
}
