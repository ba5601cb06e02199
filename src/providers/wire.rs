//! What is said to the providers on the wire. The HTTP client and the simulator
//! share these shapes, so they cannot drift apart.
//!
//! | provider | request | answer |
//! |---|---|---|
//! | authority | `GET /authority/{authority}/tickets/{ticket_id}?currency=EUR` | 200 [`LookupResponse`]; 404 [`ProviderError`] `unknown_ticket` |
//! | registry, fraud, sanctions | `POST /{provider}/checks` [`CheckRequest`] | 200 [`CheckResponse`] |
//! | gateway, settlement, ledger, receipt, notifier | `POST /{provider}/{operation}` [`OperationRequest`], header `Idempotency-Key` | 200 [`OperationResponse`]; 422 [`ProviderError`] (permanent) |
//! | the same | `GET /{provider}/operations/{idempotency_key}` | 200 [`OperationResponse`] if it was applied; 404 if not |
//!
//! Operations: gateway `capture`/`refund`, settlement `settle`/`cancel`,
//! ledger `post`/`reverse`, receipt `issue`/`void`, notifier `notify`.
//! The gateway's answers also carry `payment_method` (card number and token)
//! and a free-text `statement`, which the handler only ever records redacted.
//! Any provider may answer 429 (with `Retry-After` in seconds), 500 or 503
//! (transient), or not answer in time.

use serde::{Deserialize, Serialize};

pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
/// A fresh id on every request, recorded in the audit trail and logged by the provider.
pub const REQUEST_ID: &str = "X-Request-Id";

/// Money on the wire: integer minor units and an ISO 4217 code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMoney {
    pub minor: i64,
    pub currency: String,
}

impl From<crate::domain::Money> for WireMoney {
    fn from(money: crate::domain::Money) -> WireMoney {
        WireMoney { minor: money.minor, currency: money.currency.code().into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DueStatus {
    Due,
    NothingDue,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupResponse {
    pub ticket_id: String,
    pub authority: String,
    pub status: DueStatus,
    pub amount_due: WireMoney,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRequest {
    pub batch_id: String,
    pub ticket_id: String,
    pub client_id: String,
    pub authority: String,
    pub amount: WireMoney,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Approve,
    Reject,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResponse {
    pub decision: Decision,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationRequest {
    pub batch_id: String,
    pub ticket_id: String,
    pub client_id: String,
    pub authority: String,
    pub amount: WireMoney,
    /// Free text for the notifier (the ticket's outcome); empty elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationResponse {
    /// The provider's own reference for the applied operation.
    pub id: String,
    pub operation: String,
    pub idempotency_key: String,
    pub amount: WireMoney,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderError {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
