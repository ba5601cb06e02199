//! The operator's day from the command line: the client's results, resolving
//! a ticket that needs a person, reconciling a batch with the providers.

use std::path::Path;

use anyhow::{Context, Result};

use crate::client::ApiClient;

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

/// Reconciles a batch with its payment providers and prints the report;
/// fails (exit 1) when anything disagrees or went unanswered.
pub async fn reconcile(api: &ApiClient, batch: &str, provider: Option<&str>, as_json: bool) -> Result<()> {
    let path = match provider {
        Some(p) => format!("/api/batches/{batch}/reconciliation?provider={p}"),
        None => format!("/api/batches/{batch}/reconciliation"),
    };
    let run = api.get(&path).await?;
    if as_json {
        println!("{run}");
    } else {
        print!("{}", report(&run));
    }
    match run["disagreements"].as_array().map_or(0, Vec::len) {
        0 => Ok(()),
        n => anyhow::bail!("{n} operation(s) of batch {batch} disagree with the providers or went unanswered"),
    }
}

fn report(run: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
    let mut out = format!("reconciliation {} of batch {} by {} at {}: {} operation(s) asked\n", text(&run["run_id"]), text(&run["batch_id"]), text(&run["by"]), text(&run["at"]), run["checked"]);
    out.push_str(&format!("{:<11} {:>7} {:>14} {:>10} {:>16} {:>11}\n", "provider", "agree", "provider_only", "ours_only", "amount_mismatch", "unanswered"));
    for (name, c) in run["providers"].as_object().into_iter().flatten() {
        out.push_str(&format!(
            "{name:<11} {:>7} {:>14} {:>10} {:>16} {:>11}\n",
            c["agree"], c["provider_only"], c["ours_only"], c["amount_mismatch"], c["unanswered"]
        ));
    }
    for d in run["disagreements"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {} {} {} ({}): ours {}, theirs {} → {}  {}\n",
            text(&d["ticket_id"]), text(&d["provider"]), text(&d["operation"]), text(&d["idempotency_key"]),
            text(&d["ours"]), d["theirs"], text(&d["verdict"]), text(&d["ticket_url"])
        ));
    }
    out
}
