//! The local Functions host.

pub mod config;
pub mod queue;
