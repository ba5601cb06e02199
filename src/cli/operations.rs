//! The operator's day from the command line: the client's results, resolving
//! a ticket that needs a person, reconciling a batch with the providers.

use std::path::Path;

use anyhow::{Context, Result};

use super::client::ApiClient;

/// Writes the batch's results CSV to `out`, or to stdout.
pub async fn results(api: &ApiClient, batch: &str, out: Option<&Path>) -> Result<()> {
    let csv = api.get_text(&format!("/api/batches/{batch}/results.csv")).await?;
    match out {
        Some(path) => {
            std::fs::write(path, &csv).with_context(|| format!("cannot write {}", path.display()))?;
            let rows = csv.lines().filter(|l| l.starts_with("ticket,")).count();
            eprintln!("results of batch {batch}: {rows} ticket(s) written to {}", path.display());
        }
        None => print!("{csv}"),
    }
    Ok(())
}

/// What an operator decided about one ticket.
pub struct Decision<'a> {
    pub action: &'a str,
    pub note: &'a str,
    pub reference: Option<&'a str>,
}

/// Settles one ticket that needs a person, and says where it went.
pub async fn resolve(api: &ApiClient, batch: &str, ticket: &str, d: &Decision<'_>) -> Result<()> {
    let mut body = serde_json::json!({ "action": d.action, "note": d.note });
    if let Some(r) = d.reference {
        body["provider_reference"] = r.into();
    }
    let answer = api.post(&format!("/api/batches/{batch}/tickets/{ticket}/resolve"), &body).await?;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    println!("{ticket}: {} → {}", d.action, text(&answer["status"]));
    if let Some(reason) = answer["ticket"]["reason"].as_str() {
        println!("  {reason}");
    }
    let open: Vec<String> = answer["actions"].as_array().into_iter().flatten().map(text).collect();
    if !open.is_empty() {
        println!("  open next: {}", open.join(", "));
    }
    Ok(())
}
