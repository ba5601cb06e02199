//! The tools for people: demo, submit, status, trace.

pub mod client;
pub mod demo;
pub mod progress;
pub mod submit;
pub mod trace;
