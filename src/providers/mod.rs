//! The external providers: who they are, what is said to them on the wire,
//! how we call them without flooding them, and a simulator that plays them all.

pub mod capacity;
pub mod client;
pub mod limits;
pub mod redact;
pub mod simulator;
pub mod wire;

pub use crate::domain::ProviderName;
