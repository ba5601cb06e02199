//! The naive way to pay a batch, for comparison: one ticket at a time, each of
//! its provider calls after the other, straight over HTTP. No queues, no
//! store, no audit trail, no limiter: only what the providers need to hear.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::{Client, RequestBuilder, StatusCode};

use super::procs::thread_cpu_seconds;
use crate::domain::PayStep;
use crate::providers::ProviderName;
use crate::providers::wire::{CheckRequest, CheckResponse, Decision, DueStatus, IDEMPOTENCY_KEY, LookupResponse, OperationRequest, WireMoney};

/// One ticket to pay: its id and authority.
pub struct Ticket {
    pub ticket_id: String,
    pub authority: String,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct BaselineRun {
    pub tickets: usize,
    pub paid: usize,
    pub seconds: f64,
    /// CPU time of the one thread that made every call.
    pub cpu_seconds: f64,
}

/// Pays `tickets` one after the other on a single thread, and measures it.
pub fn run(providers_url: &str, batch_id: &str, tickets: Vec<Ticket>, timeout: Duration) -> Result<BaselineRun> {
    let url = providers_url.trim_end_matches('/').to_owned();
    let batch_id = batch_id.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async move {
            let naive = Naive { http: Client::builder().timeout(timeout).build()?, url, batch_id };
            let (cpu, started) = (thread_cpu_seconds(), Instant::now());
            let mut paid = 0;
            for t in &tickets {
                paid += usize::from(naive.pay(t).await?);
            }
            Ok(BaselineRun { tickets: tickets.len(), paid, seconds: started.elapsed().as_secs_f64(), cpu_seconds: thread_cpu_seconds() - cpu })
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the baseline thread panicked"))?
}

struct Naive {
    http: Client,
    url: String,
    batch_id: String,
}

enum Answer {
    Ok(reqwest::Response),
    /// A permanent answer: unknown ticket, declined, refused.
    Refused,
}

impl Naive {
    /// The whole journey of one ticket; true if it was paid.
    async fn pay(&self, t: &Ticket) -> Result<bool> {
        let lookup = self.http.get(format!("{}/authority/{}/tickets/{}?currency=EUR", self.url, t.authority, t.ticket_id));
        let due = match self.send(|| clone(&lookup)).await? {
            Answer::Ok(r) => r.json::<LookupResponse>().await?,
            Answer::Refused => return self.notify(t, 0, "not payable").await.map(|_| false),
        };
        if due.status == DueStatus::NothingDue {
            return self.notify(t, 0, "nothing due").await.map(|_| false);
        }
        let amount = due.amount_due.minor;
        let check = CheckRequest {
            batch_id: self.batch_id.clone(),
            ticket_id: t.ticket_id.clone(),
            client_id: "bench".into(),
            authority: t.authority.clone(),
            amount: WireMoney { minor: amount, currency: "EUR".into() },
        };
        for validator in ProviderName::VALIDATORS {
            let request = self.http.post(format!("{}/{validator}/checks", self.url)).json(&check);
            let Answer::Ok(r) = self.send(|| clone(&request)).await? else { bail!("{validator} refused a check") };
            if r.json::<CheckResponse>().await?.decision == Decision::Reject {
                return self.notify(t, amount, "rejected").await.map(|_| false);
            }
        }
        let mut done: Vec<PayStep> = Vec::new();
        for step in PayStep::ALL {
            if !self.operate(t, step.provider(), step.operation(), amount).await? {
                for undo in done.iter().rev().copied() {
                    if !self.operate(t, undo.provider(), undo.compensation(), amount).await? {
                        bail!("{} refused to {}", undo.provider(), undo.compensation());
                    }
                }
                return self.notify(t, amount, "failed").await.map(|_| false);
            }
            done.push(step);
        }
        self.notify(t, amount, "paid").await.map(|_| true)
    }

    /// A keyed operation; false if the provider declined it for good.
    async fn operate(&self, t: &Ticket, provider: ProviderName, operation: &str, amount: i64) -> Result<bool> {
        self.operate_with(t, provider, operation, amount, None).await
    }

    async fn notify(&self, t: &Ticket, amount: i64, outcome: &str) -> Result<bool> {
        self.operate_with(t, ProviderName::Notifier, "notify", amount, Some(outcome.to_owned())).await
    }

    async fn operate_with(&self, t: &Ticket, provider: ProviderName, operation: &str, amount: i64, message: Option<String>) -> Result<bool> {
        let body = OperationRequest {
            batch_id: self.batch_id.clone(),
            ticket_id: t.ticket_id.clone(),
            client_id: "bench".into(),
            authority: t.authority.clone(),
            amount: WireMoney { minor: amount, currency: "EUR".into() },
            message,
        };
        let key = format!("{}:{}:{operation}", self.batch_id, t.ticket_id);
        let request = self.http.post(format!("{}/{provider}/{operation}", self.url)).header(IDEMPOTENCY_KEY, key).json(&body);
        Ok(matches!(self.send(|| clone(&request)).await?, Answer::Ok(_)))
    }

    /// Sends, and sends again after a transient failure (429, 5xx, no answer in time) as any client must.
    async fn send(&self, request: impl Fn() -> RequestBuilder) -> Result<Answer> {
        for _ in 0..20 {
            match request().send().await {
                Ok(r) if r.status().is_success() => return Ok(Answer::Ok(r)),
                Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS || r.status().is_server_error() => {
                    let wait = r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                    tokio::time::sleep(wait.map_or(Duration::from_millis(100), Duration::from_secs)).await;
                }
                Ok(_) => return Ok(Answer::Refused),
                Err(e) if e.is_timeout() || e.is_connect() => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => return Err(e).context("a provider call failed"),
            }
        }
        bail!("a provider kept failing after 20 attempts")
    }
}

fn clone(request: &RequestBuilder) -> RequestBuilder {
    request.try_clone().expect("requests with in-memory bodies can be cloned")
}
