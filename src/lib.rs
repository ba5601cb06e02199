//! ticketpay pays large batches of tickets (fines, tolls, bills) through slow,
//! rate-limited providers, and can always say where every ticket is and exactly
//! what each provider was sent and answered.
//!
//! # The map
//!
//! A batch is uploaded through the HTTP [`api`] (every caller holds a key:
//! an operator's, or one client's, see [`keys`] and [`api::access`]; it also serves
//! `/api/console`, a status page for people); every ticket then travels a
//! pipeline of [`stages`], one queue and one function each:
//!
//! ```text
//! upload ─▶ lookup ─▶ validate ─▶ reserve ─▶ pay ─▶ notify
//!           authority  registry    budget     gateway   notifier
//!                      fraud       (atomic)   settlement
//!                      sanctions              ledger
//!                                             receipt
//! ```
//!
//! - [`domain`]: the business with no I/O: money, ids, a ticket's journey and
//!   its rules, batches and budgets, the audit events, parsing an upload.
//! - [`stages`]: one file per stage, each reading like the business step; the
//!   shared rules (idempotency, retries, parking) live in `stages/mod.rs`.
//! - [`providers`]: the nine provider roles, their wire format, the one HTTP
//!   client (rate and concurrency limits, redaction, the audit record of every
//!   exchange) and the simulator that plays them all on this machine.
//! - Three seams: [`store`] (batches, tickets, budget, events; embedded SQLite
//!   on one machine, Cosmos DB in Azure, one conformance suite for both), [`bus`] (sending the next stage's message
//!   through the Service Bus REST API, to Azure or to the local host); and
//!   [`leases`], who may spend which slice of each provider's capacity (blob
//!   leases in Azure, the embedded store on one machine), so a provider's
//!   limits hold for the whole deployment ([`providers::capacity`]).
//! - Two hosts for the same [`handler`]: the Azure Functions host, or
//!   [`host`], the local Functions host that reads the same `host.json` and
//!   `functions/*/function.json`, serves the Service Bus REST endpoints and
//!   delivers messages with Service Bus semantics from durable local queues.
//! - [`bench`]: the benchmark that pays a batch through the local stack and
//!   the naive way, and compares both with the provider-bound floor.
//! - [`cli`]: the tools for people (demo, submit, status, trace), speaking to
//!   the API through [`client`], as the benchmark does; [`config`]:
//!   the handler's settings; [`telemetry`]: one distributed trace per ticket,
//!   exported to Application Insights or OTLP.

pub mod api;
pub mod bench;
pub mod bus;
pub mod cli;
pub mod client;
pub mod config;
pub mod domain;
pub mod handler;
pub mod host;
pub mod keys;
pub mod leases;
pub mod package;
pub mod providers;
pub mod sample;
pub mod shutdown;
pub mod stages;
pub mod store;
pub mod telemetry;
