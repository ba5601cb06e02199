//! The provider simulator: `ticketpay providers`. Plays all nine provider
//! roles over HTTP on loopback, with the latencies, limits, faults and
//! per-ticket outcomes of a scenario, and keeps honest counters at `/stats`.
//!
//! Routes are those of [`crate::providers::wire`], plus `GET /` (readiness),
//! `GET /stats`, and `POST /admin/outages` (`{"provider", "kind", "seconds"}`)
//! to make one provider misbehave for a while whatever its scenario says:
//! `down` answers 503, `hang` holds each request for `hang_ms` then answers
//! 504, `throttle` answers 429 with `Retry-After: 1`.
//!
//! Each provider request is, in order: counted (requests, in flight), checked
//! against the concurrency then the rate limit (fixed one-second windows;
//! past either, 429 with `Retry-After: 1`), delayed by the scenario latency,
//! validated (400 for a missing `Idempotency-Key` or a malformed body), given
//! its fault draw (500/503, or a hang of `hang_ms` then 504, half of which
//! apply the operation first), then answered. A keyed operation whose key was
//! already applied gets the stored answer and is counted as a duplicate; the
//! same key sent with another operation, ticket or amount gets 422
//! `idempotency_key_reused`. The gateway names the card it charges in full
//! ([`CARD_ON_FILE`], [`CARD_TOKEN`]), as careless providers do: the handler's
//! redaction is exercised on every run.
//!
//! `GET /stats`, per provider (all nine, all measured):
//! `requests` (every request received, throttled ones included), `in_flight`
//! (now), `peak_in_flight`, `peak_rps` (most requests received in one
//! one-second window), `limit_rps` and `limit_in_flight` (0 = unlimited),
//! `throttled` (429s), `errors` (500/503 answers), `timeouts` (hangs answered
//! 504, or cut short by the caller); for keyed providers `applied` (distinct
//! keys), `declined` (422 `declined`), `duplicates` (repeats of an applied
//! key); for gateway and settlement `charges` (distinct keys applied by
//! capture/settle) and `duplicate_charges` (repeats of those).

mod scenario;
mod server;
#[cfg(test)]
mod tests;

pub use scenario::{
    ClientSettings, DEFAULT_SCENARIO, Outcomes, ProviderSettings, SHIPPED, Scenario,
    TicketOutcome, outcome_for,
};
pub use server::{CARD_ON_FILE, CARD_TOKEN, NETWORK_REFERENCE, router};

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
