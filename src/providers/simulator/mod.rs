//! The provider simulator: `ticketpay providers`. Plays all nine provider
//! roles over HTTP on loopback, with the latencies, limits, faults and
//! per-ticket outcomes of a scenario, and keeps honest counters at `/stats`.
//!
//! Routes are those of [`crate::providers::wire`], plus `GET /` (readiness)
//! and `GET /stats`.

mod scenario;
mod server;
#[cfg(test)]
mod tests;

pub use scenario::{
    ClientSettings, DEFAULT_SCENARIO, Outcomes, ProviderSettings, SHIPPED, Scenario,
    TicketOutcome, outcome_for,
};
pub use server::router;

use anyhow::Context;

/// Serves every provider on `listener` until the returned future is dropped
/// (or the task running it is aborted).
pub async fn serve(listener: tokio::net::TcpListener, scenario: Scenario) -> anyhow::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(scenario)).await.context("provider simulator")
}

/// `ticketpay providers`: binds 127.0.0.1:`port`, prints where it listens and
/// serves until Ctrl-C.
pub async fn run(port: u16, scenario: Option<String>) -> anyhow::Result<()> {
    let scenario = Scenario::load(scenario.as_deref())?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    let port = listener.local_addr()?.port();
    println!(
        "ticketpay providers: listening on http://127.0.0.1:{port} (scenario {})",
        scenario.name
    );
    tokio::select! {
        r = serve(listener, scenario) => r,
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C"),
    }
}
