//! Following a batch until it completes: live bars per stage, then a summary.

use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::client::ApiClient;
use crate::domain::Status;

fn count(status: &Value, key: &str) -> u64 {
    status["counts"][key].as_u64().unwrap_or(0)
}

/// Each stage, in pipeline order, with how many tickets are past it, as the API says.
fn stages(status: &Value) -> Vec<(String, u64)> {
    let stages = status["stages"].as_array().map(Vec::as_slice).unwrap_or_default();
    stages.iter().map(|s| (s["stage"].as_str().unwrap_or_default().to_owned(), s["past"].as_u64().unwrap_or(0))).collect()
}

/// Polls the batch until it completes, drawing a bar per stage.
pub async fn follow(api: &ApiClient, batch_id: &str, show_bars: bool) -> Result<Value> {
    let started = Instant::now();
    let bars = MultiProgress::new();
    if !show_bars {
        bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{prefix:>9} [{bar:40.cyan/blue}] {pos:>5}/{len} {msg}")
        .expect("a valid template")
        .progress_chars("=> ");
    let mut status = api.get(&format!("/api/batches/{batch_id}")).await?;
    let total = status["tickets"].as_u64().unwrap_or(0);
    let stage_bars: Vec<ProgressBar> = stages(&status)
        .into_iter()
        .map(|(stage, _)| {
            let bar = bars.add(ProgressBar::new(total));
            bar.set_style(style.clone());
            bar.set_prefix(stage);
            bar
        })
        .collect();
    let ends = bars.add(ProgressBar::new_spinner());
    loop {
        for (bar, (_, past)) in stage_bars.iter().zip(stages(&status)) {
            bar.set_position(past);
        }
        let done = status["done"].as_u64().unwrap_or(0);
        let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
        if let Some(last) = stage_bars.last() {
            last.set_message(format!("{rate:.0} tickets/s"));
        }
        ends.set_message(end_state_line(&status));
        if status["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        status = api.get(&format!("/api/batches/{batch_id}")).await?;
    }
    for bar in &stage_bars {
        bar.finish();
    }
    ends.finish();
    Ok(status)
}

pub fn end_state_line(status: &Value) -> String {
    Status::END_NAMES
        .iter()
        .map(|s| format!("{s} {}", count(status, s)))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// A table of where the batch's tickets ended and what it paid.
pub fn summary(status: &Value, elapsed: Option<Duration>) -> String {
    let currency = status["currency"].as_str().unwrap_or("");
    let mut out = String::new();
    out.push_str(&format!("batch      {}  ({})\n", status["batch_id"].as_str().unwrap_or(""), status["status"].as_str().unwrap_or("")));
    out.push_str(&format!("client     {}\n", status["client_id"].as_str().unwrap_or("")));
    out.push_str(&format!("tickets    {}\n", status["tickets"]));
    for s in Status::END_NAMES {
        out.push_str(&format!("  {s:<12} {:>6}\n", count(status, s)));
    }
    let waiting: u64 = Status::ALL.iter().filter(|s| !s.is_end()).map(|s| count(status, s.as_str())).sum();
    if waiting > 0 {
        out.push_str(&format!("  {:<12} {waiting:>6}\n", "in progress"));
    }
    for key in ["budget", "paid", "reserved", "remaining"] {
        out.push_str(&format!("{key:<10} {:>14} {currency}\n", status[key].as_str().unwrap_or("")));
    }
    if let Some(elapsed) = elapsed {
        let secs = elapsed.as_secs_f64();
        let total = status["tickets"].as_f64().unwrap_or(0.0);
        out.push_str(&format!("wall time  {secs:.1} s ({:.0} tickets/s)\n", total / secs.max(0.001)));
    }
    out
}
