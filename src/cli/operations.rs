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
