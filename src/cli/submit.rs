//! `ticketpay submit`: upload a CSV or JSON file of tickets and follow the batch to the end.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::client::ApiClient;
use super::progress;

pub struct Submission<'a> {
    pub file: &'a Path,
    pub client: &'a str,
    pub currency: &'a str,
    pub budget: &'a str,
}

/// Reads the file into the upload's content type and body. A JSON file is either
/// a whole batch, or an array of tickets completed by the command-line fields.
pub fn prepare(s: &Submission<'_>) -> Result<(&'static str, Vec<u8>)> {
    let bytes = std::fs::read(s.file).with_context(|| format!("cannot read {}", s.file.display()))?;
    let is_json = s.file.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if !is_json {
        return Ok(("text/csv", bytes));
    }
    let value: Value = serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid JSON", s.file.display()))?;
    let body = match value {
        Value::Array(tickets) => json!({"client_id": s.client, "currency": s.currency, "budget": s.budget, "tickets": tickets}),
        Value::Object(_) => value,
        _ => bail!("{} must hold a batch object or an array of tickets", s.file.display()),
    };
    Ok(("application/json", serde_json::to_vec(&body)?))
}

/// The same file submitted again for the same client gives the same batch.
pub fn idempotency_key(client: &str, body: &[u8], query: &[(&str, &str)]) -> String {
    let mut h = Sha256::new();
    h.update(client);
    for (k, v) in query {
        h.update(k);
        h.update(v);
    }
    h.update(body);
    let digest: String = h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("submit-{digest}")
}

pub async fn run(api: &ApiClient, s: &Submission<'_>, follow: bool) -> Result<Value> {
    let (content_type, body) = prepare(s)?;
    let query: Vec<(&str, &str)> = if content_type == "text/csv" {
        vec![("client_id", s.client), ("currency", s.currency), ("budget", s.budget)]
    } else {
        Vec::new()
    };
    let key = idempotency_key(s.client, &body, &query);
    let started = Instant::now();
    let accepted = api.upload(&query, content_type, body, &key).await?;
    let batch_id = accepted["batch_id"].as_str().context("the API answered without a batch_id")?.to_owned();
    println!("batch {batch_id} accepted: {} tickets ({}{})", accepted["tickets"], api.base(), accepted["status_url"].as_str().unwrap_or(""));
    if !follow {
        return Ok(accepted);
    }
    let status = progress::follow(api, &batch_id, true).await?;
    println!();
    print!("{}", progress::summary(&status, Some(started.elapsed())));
    Ok(status)
}
