//! host.json and functions/*/function.json, read the way the Functions host
//! reads them. Nothing here knows which functions or queues exist: they all
//! come from the files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

/// Everything the local host needs from the app root.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub app_root: PathBuf,
    /// `customHandler.description.defaultExecutablePath`.
    pub executable: String,
    /// `customHandler.description.arguments` (not yet `%NAME%`-expanded).
    pub arguments: Vec<String>,
    /// `customHandler.description.workingDirectory`; empty means the app root.
    pub working_directory: String,
    /// `customHandler.enableProxyingHttpRequest` (or the legacy `enableForwardingHttpRequest`).
    pub proxy_http: bool,
    /// `extensions.http.routePrefix`, default `api`.
    pub route_prefix: String,
    /// `functionTimeout`; `None` for `-1` (unbounded).
    pub function_timeout: Option<Duration>,
    /// `extensions.serviceBus.maxConcurrentCalls` (per queue function).
    pub max_concurrent_calls: usize,
    /// `extensions.serviceBus.maxConcurrentSessions` (per session-enabled function).
    pub max_concurrent_sessions: usize,
    /// `extensions.serviceBus.maxAutoLockRenewalDuration`.
    pub max_auto_lock_renewal: Duration,
    /// How batch-triggered functions (`"cardinality": "many"`) are fed.
    pub batches: BatchOptions,
    /// Every function folder, sorted by name.
    pub functions: Vec<FunctionConfig>,
    /// Fault injection, not from host.json: deliver every message twice at once,
    /// as at-least-once delivery allows, to prove the stages idempotent.
    pub duplicate_deliveries: bool,
}

#[derive(Debug, Clone)]
pub struct FunctionConfig {
    /// The folder name.
    pub name: String,
    pub trigger: Trigger,
}

#[derive(Debug, Clone)]
pub enum Trigger {
    Http { binding: String },
    Queue(QueueTrigger),
    Timer { binding: String, schedule: super::timer::Schedule, run_on_startup: bool },
}

/// `extensions.serviceBus.maxMessageBatchSize`, `minMessageBatchSize` and
/// `maxBatchWaitTime`, with the Service Bus extension's defaults and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// The most messages one invocation receives (default 1000).
    pub max_size: usize,
    /// Fewer than this many are delivered only once `max_wait` has passed (default 1).
    pub min_size: usize,
    /// How long a batch below `min_size` waits for more (default 30 s; used only when `min_size` > 1).
    pub max_wait: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions { max_size: 1000, min_size: 1, max_wait: Duration::from_secs(30) }
    }
}

/// The extension refuses a longer `maxBatchWaitTime`.
const MAX_BATCH_WAIT: Duration = Duration::from_secs(150);

/// The trigger's `cardinality`: one message per invocation, or a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cardinality {
    One,
    Many,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// `"dataType": "binary"`: the body goes to the handler as one base64 string.
    Binary,
    /// No dataType (or `string`): the body is bound as UTF-8 text, then JSON-encoded again.
    String,
}

#[derive(Debug, Clone)]
pub struct QueueTrigger {
    pub queue: String,
    pub binding: String,
    pub data_type: DataType,
    pub cardinality: Cardinality,
    pub sessions: bool,
    pub settings: QueueSettings,
}

/// The queue's own properties (ours: the `queueSettings` object of the trigger,
/// the same values the Bicep gives the real queues).
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSettings {
    pub lock_duration: Duration,
    pub max_delivery_count: u32,
    pub duplicate_detection_window: Duration,
    pub dead_letter_on_expiration: bool,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            lock_duration: Duration::from_secs(60),
            max_delivery_count: 10,
            duplicate_detection_window: Duration::from_secs(600),
            dead_letter_on_expiration: true,
        }
    }
}

impl HostConfig {
    /// Reads `{app_root}/host.json` and every `{app_root}/functions/*/function.json`.
    pub fn load(app_root: &Path) -> Result<HostConfig> {
        let host_path = app_root.join("host.json");
        let host = read_json(&host_path)?;
        let ctx = |field: &str| format!("{}: {field}", host_path.display());

        let (executable, arguments, working_directory) = handler_description(&host, &ctx)?;
        let ch = &host["customHandler"];
        let proxy_http = opt_bool(ch, "enableProxyingHttpRequest", || ctx("customHandler.enableProxyingHttpRequest"))?
            .or(opt_bool(ch, "enableForwardingHttpRequest", || ctx("customHandler.enableForwardingHttpRequest"))?)
            .unwrap_or(false);
        let route_prefix = match host.pointer("/extensions/http/routePrefix") {
            None | Some(Value::Null) => "api".to_string(),
            Some(Value::String(s)) => s.trim_matches('/').to_string(),
            Some(_) => bail!("{} must be a string", ctx("extensions.http.routePrefix")),
        };
        let function_timeout = match host.get("functionTimeout") {
            None | Some(Value::Null) => Some(Duration::from_secs(300)),
            Some(Value::String(s)) if s.trim() == "-1" => None,
            Some(Value::String(s)) => {
                Some(parse_timespan(s).with_context(|| ctx("functionTimeout"))?)
            }
            Some(_) => bail!("{} must be a string like \"00:05:00\"", ctx("functionTimeout")),
        };
        let sb = host.pointer("/extensions/serviceBus").cloned().unwrap_or(Value::Null);
        let (max_concurrent_calls, max_concurrent_sessions, max_auto_lock_renewal) = service_bus_limits(&sb, &ctx)?;
        let batches = parse_batch_options(&sb, &ctx)?;
        let functions = load_functions(app_root)?;
        one_function_per_queue(&functions)?;

        Ok(HostConfig {
            duplicate_deliveries: false,
            app_root: app_root.to_path_buf(),
            executable,
            arguments,
            working_directory,
            proxy_http,
            route_prefix,
            function_timeout,
            max_concurrent_calls,
            max_concurrent_sessions,
            max_auto_lock_renewal,
            batches,
            functions,
        })
    }

    /// Every queue function takes up to `n` messages per invocation: one at a
    /// time for 1, else a batch (`minMessageBatchSize` kept within it).
    pub fn set_max_batch(&mut self, n: usize) {
        self.batches.max_size = n;
        self.batches.min_size = self.batches.min_size.min(n);
        for f in &mut self.functions {
            if let Trigger::Queue(q) = &mut f.trigger {
                q.cardinality = if n == 1 { Cardinality::One } else { Cardinality::Many };
            }
        }
    }

    pub fn queue_functions(&self) -> impl Iterator<Item = (&FunctionConfig, &QueueTrigger)> {
        self.functions.iter().filter_map(|f| match &f.trigger {
            Trigger::Queue(q) => Some((f, q)),
            Trigger::Http { .. } | Trigger::Timer { .. } => None,
        })
    }

    pub fn timer_functions(&self) -> Vec<super::timer::TimerSpec> {
        self.functions
            .iter()
            .filter_map(|f| match &f.trigger {
                Trigger::Timer { binding, schedule, run_on_startup } => Some(super::timer::TimerSpec {
                    function: f.name.clone(),
                    binding: binding.clone(),
                    schedule: schedule.clone(),
                    run_on_startup: *run_on_startup,
                }),
                _ => None,
            })
            .collect()
    }

    pub fn has_http_function(&self) -> bool {
        self.functions.iter().any(|f| matches!(f.trigger, Trigger::Http { .. }))
    }
}

/// `customHandler.description`: the handler's executable, its arguments and working directory.
fn handler_description(host: &Value, ctx: &dyn Fn(&str) -> String) -> Result<(String, Vec<String>, String)> {
    let desc = host
        .pointer("/customHandler/description")
        .ok_or_else(|| anyhow!("{} is missing", ctx("customHandler.description")))?;
    let executable = desc
        .get("defaultExecutablePath")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow!("{} is missing or not a string", ctx("customHandler.description.defaultExecutablePath")))?
        .to_string();
    let arguments = match desc.get("arguments") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| anyhow!("{} must be an array of strings", ctx("customHandler.description.arguments")))?,
        Some(_) => bail!("{} must be an array of strings", ctx("customHandler.description.arguments")),
    };
    let working_directory = opt_str(desc, "workingDirectory", || ctx("customHandler.description.workingDirectory"))?.unwrap_or_default();
    Ok((executable, arguments, working_directory))
}

/// `extensions.serviceBus` for single messages, with the extension's defaults:
/// calls at once, sessions at once, and how long a lock is renewed.
fn service_bus_limits(sb: &Value, ctx: &dyn Fn(&str) -> String) -> Result<(usize, usize, Duration)> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let max_concurrent_calls = opt_u64(sb, "maxConcurrentCalls", || ctx("extensions.serviceBus.maxConcurrentCalls"))?
        .map(|n| n as usize)
        .unwrap_or(16 * cpus)
        .max(1);
    let max_concurrent_sessions = opt_u64(sb, "maxConcurrentSessions", || ctx("extensions.serviceBus.maxConcurrentSessions"))?
        .map(|n| n as usize)
        .unwrap_or(8)
        .max(1);
    let max_auto_lock_renewal = match opt_str(sb, "maxAutoLockRenewalDuration", || ctx("extensions.serviceBus.maxAutoLockRenewalDuration"))? {
        None => Duration::from_secs(300),
        Some(s) => parse_timespan(&s).with_context(|| ctx("extensions.serviceBus.maxAutoLockRenewalDuration"))?,
    };
    Ok((max_concurrent_calls, max_concurrent_sessions, max_auto_lock_renewal))
}

/// `ticketpay local` gives each queue one function.
fn one_function_per_queue(functions: &[FunctionConfig]) -> Result<()> {
    let mut by_queue: BTreeMap<String, &str> = BTreeMap::new();
    for f in functions {
        if let Trigger::Queue(q) = &f.trigger
            && let Some(other) = by_queue.insert(q.queue.to_ascii_lowercase(), &f.name)
        {
            bail!("functions {other} and {} are both triggered by queue {}; ticketpay local gives each queue one function", f.name, q.queue);
        }
    }
    Ok(())
}

fn load_functions(app_root: &Path) -> Result<Vec<FunctionConfig>> {
    let dir = app_root.join("functions");
    let entries = std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let mut functions = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
        let path = entry.path().join("function.json");
        if !entry.path().is_dir() || !path.exists() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(f) = parse_function(&name, &path)? {
            functions.push(f);
        }
    }
    functions.sort_by(|a, b| a.name.cmp(&b.name));
    if functions.is_empty() {
        bail!("no functions found: expected {}/<name>/function.json", dir.display());
    }
    Ok(functions)
}

/// One function.json. `Ok(None)` for a trigger type this host does not run (logged).
pub fn parse_function(name: &str, path: &Path) -> Result<Option<FunctionConfig>> {
    let json = read_json(path)?;
    let file = path.display();
    let bindings = json
        .get("bindings")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("{file}: bindings is missing or not an array"))?;
    let mut trigger = None;
    for (i, b) in bindings.iter().enumerate() {
        let at = |field: &str| format!("{file}: bindings[{i}].{field}");
        let ty = b.get("type").and_then(Value::as_str).ok_or_else(|| anyhow!("{} is missing", at("type")))?;
        if !ty.to_ascii_lowercase().ends_with("trigger") {
            continue;
        }
        if trigger.is_some() {
            bail!("{file}: more than one trigger binding");
        }
        let binding = b
            .get("name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| anyhow!("{} is missing or not a string", at("name")))?
            .to_string();
        trigger = Some(match ty.to_ascii_lowercase().as_str() {
            "httptrigger" => Trigger::Http { binding },
            "timertrigger" => {
                let schedule = opt_str(b, "schedule", || at("schedule"))?.ok_or_else(|| anyhow!("{} is missing", at("schedule")))?;
                let schedule = super::timer::Schedule::parse(&schedule).with_context(|| at("schedule"))?;
                let run_on_startup = opt_bool(b, "runOnStartup", || at("runOnStartup"))?.unwrap_or(false);
                Trigger::Timer { binding, schedule, run_on_startup }
            }
            "servicebustrigger" => {
                if b.get("topicName").is_some() {
                    bail!("{}: topics are not supported by ticketpay local (use queueName)", at("topicName"));
                }
                let queue = b
                    .get("queueName")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| anyhow!("{} is missing or not a string", at("queueName")))?
                    .to_string();
                let data_type = match opt_str(b, "dataType", || at("dataType"))?.as_deref() {
                    Some(s) if s.eq_ignore_ascii_case("binary") => DataType::Binary,
                    None => DataType::String,
                    Some(s) if s.eq_ignore_ascii_case("string") => DataType::String,
                    Some(other) => bail!("{}: unsupported value {other:?} (binary or string)", at("dataType")),
                };
                let cardinality = match opt_str(b, "cardinality", || at("cardinality"))?.as_deref() {
                    None => Cardinality::One,
                    Some(s) if s.eq_ignore_ascii_case("one") => Cardinality::One,
                    Some(s) if s.eq_ignore_ascii_case("many") => Cardinality::Many,
                    Some(other) => bail!("{}: unsupported value {other:?} (one or many)", at("cardinality")),
                };
                let sessions = opt_bool(b, "isSessionsEnabled", || at("isSessionsEnabled"))?.unwrap_or(false);
                let settings = parse_queue_settings(b.get("queueSettings"), &at("queueSettings"))?;
                Trigger::Queue(QueueTrigger { queue, binding, data_type, cardinality, sessions, settings })
            }
            _ => {
                tracing::warn!("{file}: trigger type {ty} is not supported by ticketpay local; function {name} is skipped");
                return Ok(None);
            }
        });
    }
    let trigger = trigger.ok_or_else(|| anyhow!("{file}: no trigger binding (type ending in Trigger)"))?;
    Ok(Some(FunctionConfig { name: name.to_string(), trigger }))
}

fn parse_batch_options(sb: &Value, ctx: &impl Fn(&str) -> String) -> Result<BatchOptions> {
    let mut o = BatchOptions::default();
    let key = |k: &str| ctx(&format!("extensions.serviceBus.{k}"));
    if let Some(n) = opt_u64(sb, "maxMessageBatchSize", || key("maxMessageBatchSize"))? {
        if n == 0 {
            bail!("{} must be at least 1", key("maxMessageBatchSize"));
        }
        o.max_size = n as usize;
    }
    if let Some(n) = opt_u64(sb, "minMessageBatchSize", || key("minMessageBatchSize"))? {
        if n == 0 || n as usize > o.max_size {
            bail!("{} must be between 1 and maxMessageBatchSize ({})", key("minMessageBatchSize"), o.max_size);
        }
        o.min_size = n as usize;
    }
    if let Some(s) = opt_str(sb, "maxBatchWaitTime", || key("maxBatchWaitTime"))? {
        o.max_wait = parse_timespan(&s).with_context(|| key("maxBatchWaitTime"))?;
        if o.max_wait > MAX_BATCH_WAIT {
            bail!("{} must be at most {MAX_BATCH_WAIT:?}", key("maxBatchWaitTime"));
        }
    }
    Ok(o)
}

fn parse_queue_settings(v: Option<&Value>, at: &str) -> Result<QueueSettings> {
    let mut s = QueueSettings::default();
    let Some(v) = v else { return Ok(s) };
    if v.is_null() {
        return Ok(s);
    }
    if !v.is_object() {
        bail!("{at} must be an object");
    }
    if let Some(d) = opt_str(v, "lockDuration", || format!("{at}.lockDuration"))? {
        s.lock_duration = parse_iso8601_duration(&d).with_context(|| format!("{at}.lockDuration"))?;
    }
    if let Some(n) = opt_u64(v, "maxDeliveryCount", || format!("{at}.maxDeliveryCount"))? {
        if n == 0 {
            bail!("{at}.maxDeliveryCount must be at least 1");
        }
        s.max_delivery_count = n as u32;
    }
    if let Some(d) = opt_str(v, "duplicateDetectionHistoryTimeWindow", || format!("{at}.duplicateDetectionHistoryTimeWindow"))? {
        s.duplicate_detection_window =
            parse_iso8601_duration(&d).with_context(|| format!("{at}.duplicateDetectionHistoryTimeWindow"))?;
    }
    if let Some(b) = opt_bool(v, "deadLetteringOnMessageExpiration", || format!("{at}.deadLetteringOnMessageExpiration"))? {
        s.dead_letter_on_expiration = b;
    }
    Ok(s)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

fn opt_str(v: &Value, key: &str, at: impl Fn() -> String) -> Result<Option<String>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => bail!("{} must be a string", at()),
    }
}

fn opt_bool(v: &Value, key: &str, at: impl Fn() -> String) -> Result<Option<bool>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(_) => bail!("{} must be true or false", at()),
    }
}

fn opt_u64(v: &Value, key: &str, at: impl Fn() -> String) -> Result<Option<u64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .or_else(|| x.as_str().and_then(|s| s.trim().parse().ok()))
            .map(Some)
            .ok_or_else(|| anyhow!("{} must be a non-negative integer", at())),
    }
}

/// ISO 8601 duration as used by Service Bus properties: `PT1M`, `PT10M`, `P1DT2H`, `PT0.5S`, `P2W`.
pub fn parse_iso8601_duration(s: &str) -> Result<Duration> {
    let bad = || anyhow!("invalid ISO 8601 duration {s:?} (expected e.g. PT1M, PT30S, P1D)");
    let rest = s.trim().strip_prefix(['P', 'p']).ok_or_else(bad)?;
    if rest.is_empty() {
        return Err(bad());
    }
    let mut secs = 0f64;
    let mut in_time = false;
    let mut num = String::new();
    let mut any = false;
    for c in rest.chars() {
        match c {
            'T' | 't' if !in_time && num.is_empty() => in_time = true,
            '0'..='9' | '.' | ',' => num.push(if c == ',' { '.' } else { c }),
            _ => {
                let n: f64 = num.parse().map_err(|_| bad())?;
                num.clear();
                any = true;
                secs += n * match (c.to_ascii_uppercase(), in_time) {
                    ('W', false) => 7.0 * 86400.0,
                    ('D', false) => 86400.0,
                    ('H', true) => 3600.0,
                    ('M', true) => 60.0,
                    ('S', true) => 1.0,
                    _ => return Err(bad()),
                };
            }
        }
    }
    if !num.is_empty() || !any {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// .NET TimeSpan text as used in host.json: `00:05:00`, `1.02:00:00`, `00:00:30.5`.
pub fn parse_timespan(s: &str) -> Result<Duration> {
    let bad = || anyhow!("invalid time span {s:?} (expected hh:mm:ss or d.hh:mm:ss)");
    let s = s.trim();
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 3 {
        return Err(bad());
    }
    let (days, hours) = match parts[0].split_once('.') {
        Some((d, h)) => (d.parse::<u64>().map_err(|_| bad())?, h.parse::<u64>().map_err(|_| bad())?),
        None => (0, parts[0].parse::<u64>().map_err(|_| bad())?),
    };
    let minutes: u64 = parts[1].parse().map_err(|_| bad())?;
    let seconds: f64 = parts[2].parse().map_err(|_| bad())?;
    if minutes >= 60 || !(0.0..60.0).contains(&seconds) {
        return Err(bad());
    }
    Ok(Duration::from_secs(days * 86400 + hours * 3600 + minutes * 60) + Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_repository_app() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let c = HostConfig::load(root).unwrap();
        assert_eq!(c.executable, "ticketpay");
        assert_eq!(c.arguments, vec!["handler"]);
        assert!(c.proxy_http);
        assert_eq!(c.route_prefix, "api");
        assert_eq!(c.function_timeout, Some(Duration::from_secs(300)));
        assert_eq!(c.max_concurrent_calls, 64);
        assert_eq!(c.max_concurrent_sessions, 16);
        assert_eq!(c.max_auto_lock_renewal, Duration::from_secs(300));
        assert!(c.has_http_function());
        let queues: Vec<_> = c.queue_functions().map(|(f, q)| (f.name.as_str(), q.queue.as_str(), q.sessions)).collect();
        assert_eq!(
            queues,
            vec![
                ("lookup", "ticket-lookup", false),
                ("notify", "ticket-notify", false),
                ("pay", "ticket-pay", false),
                ("reserve", "ticket-reserve", true),
                ("validate", "ticket-validate", false),
            ]
        );
        assert_eq!(c.batches, BatchOptions { max_size: 1000, ..BatchOptions::default() });
        for (_, q) in c.queue_functions() {
            assert_eq!(q.binding, "message");
            assert_eq!(q.data_type, DataType::Binary);
            assert_eq!(q.cardinality, Cardinality::Many);
            // A batch answers within its lock: the handler begins no message past this.
            assert!(q.settings.lock_duration >= 2 * crate::handler::BATCH_STARTS_WITHIN);
            assert_eq!(q.settings.lock_duration, Duration::from_secs(60));
            assert_eq!(q.settings.max_delivery_count, 10);
            assert_eq!(q.settings.duplicate_detection_window, Duration::from_secs(600));
        }
    }

    #[test]
    fn batch_settings_are_read_and_checked_as_the_extension_checks_them() {
        let host = |sb: &str| format!(r#"{{"customHandler":{{"description":{{"defaultExecutablePath":"x"}}}},"extensions":{{"serviceBus":{sb}}}}}"#);
        let f = r#"{"bindings":[{"type":"serviceBusTrigger","name":"m","queueName":"q","cardinality":"many"}]}"#;
        let d = app(&host(r#"{"maxMessageBatchSize":50,"minMessageBatchSize":10,"maxBatchWaitTime":"00:00:02"}"#), &[("f", f)]);
        let c = HostConfig::load(d.path()).unwrap();
        assert_eq!(c.batches, BatchOptions { max_size: 50, min_size: 10, max_wait: Duration::from_secs(2) });
        assert_eq!(c.queue_functions().next().unwrap().1.cardinality, Cardinality::Many);
        for (bad, names) in [
            (r#"{"maxMessageBatchSize":5,"minMessageBatchSize":6}"#, "minMessageBatchSize"),
            (r#"{"maxBatchWaitTime":"00:03:00"}"#, "maxBatchWaitTime"),
            (r#"{"maxMessageBatchSize":0}"#, "maxMessageBatchSize"),
        ] {
            let d = app(&host(bad), &[("f", f)]);
            let e = format!("{:#}", HostConfig::load(d.path()).unwrap_err());
            assert!(e.contains(names), "{e}");
        }
        let d = app(&host("{}"), &[("f", &f.replace("many", "several"))]);
        assert!(format!("{:#}", HostConfig::load(d.path()).unwrap_err()).contains("cardinality"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_iso8601_duration("PT1M").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_iso8601_duration("P1DT2H3M4.5S").unwrap(), Duration::from_secs_f64(93784.5));
        assert_eq!(parse_iso8601_duration("P2W").unwrap(), Duration::from_secs(14 * 86400));
        for bad in ["", "P", "PT", "1M", "PT1", "P1M", "PTXS"] {
            assert!(parse_iso8601_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_timespan("00:05:00").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_timespan("1.02:00:00.5").unwrap(), Duration::from_secs_f64(93600.5));
        assert!(parse_timespan("5 minutes").is_err());
    }

    fn app(host: &str, functions: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("host.json"), host).unwrap();
        for (name, json) in functions {
            std::fs::create_dir_all(d.path().join("functions").join(name)).unwrap();
            std::fs::write(d.path().join("functions").join(name).join("function.json"), json).unwrap();
        }
        d
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let host = r#"{"customHandler":{"description":{"defaultExecutablePath":"x"}}}"#;
        let d = app(host, &[("f", r#"{"bindings":[{"type":"serviceBusTrigger","name":"m"}]}"#)]);
        let e = format!("{:#}", HostConfig::load(d.path()).unwrap_err());
        assert!(e.contains("function.json") && e.contains("bindings[0].queueName"), "{e}");

        let d = app(
            host,
            &[("f", r#"{"bindings":[{"type":"serviceBusTrigger","name":"m","queueName":"q","queueSettings":{"lockDuration":"1 minute"}}]}"#)],
        );
        let e = format!("{:#}", HostConfig::load(d.path()).unwrap_err());
        assert!(e.contains("queueSettings.lockDuration") && e.contains("1 minute"), "{e}");

        let d = app(r#"{"customHandler":{}}"#, &[]);
        let e = format!("{:#}", HostConfig::load(d.path()).unwrap_err());
        assert!(e.contains("host.json") && e.contains("customHandler.description"), "{e}");

        let d = app("{not json", &[]);
        let e = format!("{:#}", HostConfig::load(d.path()).unwrap_err());
        assert!(e.contains("host.json") && e.contains("invalid JSON"), "{e}");
    }
}
