//! The Service Bus sender's requests, checked against Microsoft's documented
//! REST format by a server that records them. Entra ID cannot be reached from
//! here, so a credential that counts its calls stands in for it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::time::OffsetDateTime;
use chrono::{TimeZone, Utc};
use serde_json::Value;
use ticketpay::bus::{BusSender, OutgoingMessage};

#[derive(Debug, Clone)]
struct Recorded {
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// Answers each request with the next status of `script` (then 201), recording it.
async fn service_bus(script: Vec<(u16, Option<&'static str>)>) -> (String, Arc<Mutex<Vec<Recorded>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(Mutex::new(script.into_iter()));
    let keep = seen.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
        let (keep, script) = (keep.clone(), script.clone());
        async move {
            let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned())).collect();
            keep.lock().unwrap().push(Recorded { path: uri.to_string(), headers, body: body.to_vec() });
            let (status, retry_after) = script.lock().unwrap().next().unwrap_or((201, None));
            let mut response = StatusCode::from_u16(status).unwrap().into_response();
            if let Some(r) = retry_after {
                response.headers_mut().insert("retry-after", r.parse().unwrap());
            }
            response
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

#[derive(Debug)]
struct CountingCredential {
    calls: AtomicUsize,
    lifetime: azure_core::time::Duration,
}

#[async_trait::async_trait]
impl TokenCredential for CountingCredential {
    async fn get_token(&self, scopes: &[&str], _: Option<TokenRequestOptions<'_>>) -> azure_core::Result<AccessToken> {
        assert_eq!(scopes, ["https://servicebus.azure.net/.default"]);
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(AccessToken::new(format!("token-{n}"), OffsetDateTime::now_utc() + self.lifetime))
    }
}

fn credential(lifetime_minutes: i64) -> Arc<CountingCredential> {
    Arc::new(CountingCredential { calls: AtomicUsize::new(0), lifetime: azure_core::time::Duration::minutes(lifetime_minutes) })
}

fn message(i: usize) -> OutgoingMessage {
    OutgoingMessage {
        queue: "ticket-reserve".into(),
        message_id: format!("b1:t{i}:reserve:0"),
        session_id: Some("b1".into()),
        correlation_id: Some(format!("b1:t{i}")),
        scheduled_at: Some(Utc.with_ymd_and_hms(2030, 11, 21, 4, 34, 42).unwrap()),
        properties: BTreeMap::from([("batch_id".into(), "b1".into()), ("traceparent".into(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into())]),
        body: format!(r#"{{"batch_id":"b1","ticket_id":"t{i}","attempt":0}}"#).into_bytes(),
    }
}

#[tokio::test]
async fn a_single_send_is_the_documented_rest_request_with_a_bearer_token() {
    let (url, seen) = service_bus(vec![]).await;
    let cred = credential(60);
    let sender = BusSender::with_credential(&url, cred.clone());
    sender.send(&message(1)).await.unwrap();
    sender.send(&message(2)).await.unwrap();

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let r = &seen[0];
    assert_eq!(r.path, "/ticket-reserve/messages");
    assert_eq!(r.headers["authorization"], "Bearer token-1");
    assert_eq!(r.headers["content-type"], "application/json");
    let broker: Value = serde_json::from_str(&r.headers["brokerproperties"]).unwrap();
    assert_eq!(broker["MessageId"], "b1:t1:reserve:0");
    assert_eq!(broker["SessionId"], "b1");
    assert_eq!(broker["CorrelationId"], "b1:t1");
    assert_eq!(broker["ScheduledEnqueueTimeUtc"], "Thu, 21 Nov 2030 04:34:42 GMT", "RFC 1123");
    assert_eq!(r.headers["batch_id"], "\"b1\"", "custom properties are headers, strings quoted");
    assert!(r.headers["traceparent"].contains("0af7651916cd43dd8448eb211c80319c"), "the trace context travels");
    assert_eq!(r.body, message(1).body);
    assert_eq!(seen[1].headers["authorization"], "Bearer token-1", "the token is cached");
    assert_eq!(cred.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_token_about_to_expire_is_renewed_and_a_refused_one_replaced() {
    let (url, seen) = service_bus(vec![(201, None), (401, None)]).await;
    let cred = credential(3);
    let sender = BusSender::with_credential(&url, cred.clone());
    sender.send(&message(1)).await.unwrap();
    sender.send(&message(2)).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let tokens: Vec<&str> = seen.iter().map(|r| r.headers["authorization"].as_str()).collect();
    assert_eq!(tokens, ["Bearer token-1", "Bearer token-2", "Bearer token-3"], "renewed under five minutes left, and after a 401");
}

#[tokio::test]
async fn a_batch_is_sent_as_service_bus_json_in_chunks() {
    let (url, seen) = service_bus(vec![]).await;
    let sender = BusSender::new(&url);
    let messages: Vec<OutgoingMessage> = (0..450).map(message).collect();
    sender.send_batch("ticket-reserve", &messages).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "450 messages in requests of at most 200");
    assert!(seen.iter().all(|r| r.headers["content-type"] == "application/vnd.microsoft.servicebus.json"));
    assert!(seen.iter().all(|r| !r.headers.contains_key("authorization")), "the local host needs no token");
    let first: Value = serde_json::from_slice(&seen[0].body).unwrap();
    let entries = first.as_array().unwrap();
    assert_eq!(entries.len(), 200);
    assert_eq!(entries[0]["Body"], r#"{"batch_id":"b1","ticket_id":"t0","attempt":0}"#);
    assert_eq!(entries[0]["BrokerProperties"]["MessageId"], "b1:t0:reserve:0");
    assert_eq!(entries[0]["BrokerProperties"]["SessionId"], "b1");
    assert_eq!(entries[0]["BrokerProperties"]["ScheduledEnqueueTimeUtc"], "Thu, 21 Nov 2030 04:34:42 GMT");
    assert_eq!(entries[0]["UserProperties"]["batch_id"], "b1");
    let total: usize = seen.iter().map(|r| serde_json::from_slice::<Value>(&r.body).unwrap().as_array().unwrap().len()).sum();
    assert_eq!(total, 450);
}

#[tokio::test]
async fn throttling_and_unavailability_are_retried_and_refusals_are_not() {
    let (url, seen) = service_bus(vec![(429, Some("1")), (503, None)]).await;
    let sender = BusSender::new(&url);
    let started = Instant::now();
    sender.send(&message(1)).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 3, "429, 503, then accepted");
    assert!(started.elapsed() >= Duration::from_secs(1), "Retry-After is honoured");

    let (url, seen) = service_bus(vec![(400, None)]).await;
    let err = BusSender::new(&url).send(&message(1)).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert_eq!(seen.lock().unwrap().len(), 1, "a bad request is not repeated");
}
