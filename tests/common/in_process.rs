//! A local host started in the test's own process, on a runtime of its own:
//! the host and the provider simulator run here, only the handler is a child.

use std::path::Path;

use serde_json::Value;
use ticketpay::host::{LocalHost, LocalOptions, StoreChoice};
use tracing_subscriber::EnvFilter;

use super::{BIN, Endpoints, app_root_with};

pub struct InProcessStack {
    endpoints: Endpoints,
    host: Option<LocalHost>,
    runtime: tokio::runtime::Runtime,
    _app_root: tempfile::TempDir,
}

impl InProcessStack {
    /// A host with the provider simulator playing `scenario`, its state in `data`,
    /// and `settings` as the Values of its local.settings.json.
    pub fn start(scenario: &str, data: &Path, settings: Value) -> InProcessStack {
        log_to_stderr();
        let app_root = tempfile::tempdir().unwrap();
        app_root_with(app_root.path(), settings);
        run_this_build(app_root.path());
        let options = LocalOptions {
            app_root: app_root.path().to_owned(),
            port: 0,
            providers_port: 0,
            providers_url: None,
            scenario: Some(scenario.to_owned()),
            data: data.to_owned(),
            duplicate_deliveries: false,
            instances: 1,
            max_batch: None,
            store: StoreChoice::Embedded,
        };
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let host = runtime.block_on(LocalHost::start(options)).expect("the local host starts");
        let endpoints = Endpoints::new(host.url.clone(), host.providers_url.clone(), data);
        InProcessStack { endpoints, host: Some(host), runtime, _app_root: app_root }
    }
}

impl std::ops::Deref for InProcessStack {
    type Target = Endpoints;

    fn deref(&self) -> &Endpoints {
        &self.endpoints
    }
}

impl Drop for InProcessStack {
    fn drop(&mut self) {
        if let Some(host) = self.host.take() {
            let _ = self.runtime.block_on(host.shutdown());
        }
    }
}

/// The host finds the handler as host.json's defaultExecutablePath; this
/// process is not `ticketpay`, so the path names the binary built with the tests.
fn run_this_build(app_root: &Path) {
    let path = app_root.join("host.json");
    let mut host: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    host["customHandler"]["description"]["defaultExecutablePath"] = BIN.into();
    std::fs::write(&path, host.to_string()).unwrap();
}

/// The host's warnings on stderr, as a host in a process of its own writes them (`RUST_LOG` for more).
fn log_to_stderr() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
