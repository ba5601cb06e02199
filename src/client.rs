//! A small client of ticketpay's own HTTP API, for the command-line tools and the benchmark.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl ApiClient {
    pub fn new(base: &str) -> ApiClient {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("static client settings");
        ApiClient { http, base: base.trim_end_matches('/').to_owned(), key: None }
    }

    /// Waits this long for each answer instead of a minute (a reconciliation asks every provider first).
    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.http = reqwest::Client::builder().timeout(timeout).build().expect("static client settings");
        self
    }

    /// Sends this API key with every request (`x-functions-key`).
    pub fn with_key(mut self, key: Option<String>) -> ApiClient {
        self.key = key.filter(|k| !k.is_empty());
        self
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match &self.key {
            Some(key) => request.header(crate::api::access::KEY_HEADER, key),
            None => request,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send_get(&self, path: &str) -> Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        self.request(reqwest::Method::GET, &url).send().await.with_context(|| format!("cannot reach {url}"))
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        read(self.send_get(path).await?).await
    }

    /// A GET that may find the API unable to answer for now: `None` on 503 (try again).
    pub async fn poll(&self, path: &str) -> Result<Option<Value>> {
        let response = self.send_get(path).await?;
        if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            return Ok(None);
        }
        read(response).await.map(Some)
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let response = self.request(reqwest::Method::POST, &url).json(body).send().await.with_context(|| format!("cannot reach {url}"))?;
        read(response).await
    }

    /// A GET answered with text (a CSV), not JSON.
    pub async fn get_text(&self, path: &str) -> Result<String> {
        let response = self.send_get(path).await?;
        if !response.status().is_success() {
            bail!("{}", problem_text(response).await);
        }
        response.text().await.context("the API's answer could not be read")
    }

    /// Uploads a batch. Retries a lost connection with the same Idempotency-Key, so it is safe.
    pub async fn upload(&self, query: &[(&str, &str)], content_type: &str, body: Vec<u8>, key: &str) -> Result<Value> {
        let url = format!("{}/api/batches", self.base);
        let mut last = None;
        for attempt in 0..5u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
            }
            let sent = self
                .request(reqwest::Method::POST, &url)
                .query(query)
                .header("Content-Type", content_type)
                .header("Idempotency-Key", key)
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().as_u16() == 503 => last = Some(anyhow::anyhow!("{}", problem_text(r).await)),
                Ok(r) => return read(r).await,
                Err(e) => last = Some(anyhow::Error::new(e).context(format!("cannot reach {url}"))),
            }
        }
        Err(last.expect("at least one attempt was made"))
    }
}

async fn problem_text(r: reqwest::Response) -> String {
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    match body.get("detail").and_then(Value::as_str) {
        Some(detail) => format!("{status}: {detail}"),
        None => status.to_string(),
    }
}

async fn read(r: reqwest::Response) -> Result<Value> {
    if r.status().is_success() {
        return r.json().await.context("the API answered something that is not JSON");
    }
    bail!("{}", problem_text(r).await)
}
