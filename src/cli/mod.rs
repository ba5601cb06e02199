//! The tools for people: demo, submit, status, trace, and the operator's
//! results, resolve and reconcile.

pub mod demo;
pub mod operations;
pub mod progress;
pub mod submit;
pub mod trace;
