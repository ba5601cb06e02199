//! ticketpay pays large batches of tickets (fines, tolls, bills) through slow,
//! rate-limited providers, and can always say where every ticket is and exactly
//! what each provider was sent and answered.

pub mod api;
pub mod bus;
pub mod cli;
pub mod config;
pub mod domain;
pub mod handler;
pub mod host;
pub mod providers;
pub mod shutdown;
pub mod stages;
pub mod store;
