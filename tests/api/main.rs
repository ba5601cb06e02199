//! The HTTP API as its users reach it: uploads, who may see and do what, the
//! OpenAPI document, and what the local host lets through besides the API.
//! Each test runs the local host and the provider simulator in its own process
//! (nextest gives every test one), the handler as the host's child; the few
//! that need a host process of their own, for its environment or what it
//! writes at startup, start one.

#[path = "../common/mod.rs"]
mod common;

mod access;
mod host_access;
mod openapi;
mod uploads;

use std::path::Path;

use common::in_process::InProcessStack;
use common::{Endpoints, send, three_keys};
use serde_json::json;

/// Providers that answer at once, with no limits and no faults.
const SCENARIO: &str = "zero-latency";

/// A stack with no API keys: every caller is an operator.
fn stack(data: &Path) -> InProcessStack {
    InProcessStack::start(SCENARIO, data, json!({}))
}

/// A stack with the keys of [`three_keys`].
fn keyed_stack(data: &Path) -> InProcessStack {
    InProcessStack::start(SCENARIO, data, json!({ "TICKETPAY_API_KEYS": three_keys() }))
}

/// A GET with an API key, if any.
fn get(s: &Endpoints, path: &str, key: Option<&str>) -> reqwest::blocking::Response {
    send(s, "GET", path, key, None)
}
