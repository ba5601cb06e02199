//! A batch: one client's upload of tickets, paid within one budget.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ids::{BatchId, ClientId};
use super::money::Currency;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub batch_id: BatchId,
    pub client_id: ClientId,
    pub currency: Currency,
    /// The most this batch may pay, in minor units.
    pub budget: i64,
    /// Reserved or paid so far; never above `budget`.
    pub committed: i64,
    pub tickets: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Digest of the upload, so a reused Idempotency-Key with another body is refused.
    pub request_digest: String,
    /// Every ticket's first message has been sent.
    pub enqueued: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

impl Batch {
    pub fn remaining(&self) -> i64 {
        self.budget - self.committed
    }

    /// Whether a reservation of `amount` fits in what is left.
    pub fn can_reserve(&self, amount: i64) -> bool {
        amount >= 0 && self.committed.checked_add(amount).is_some_and(|c| c <= self.budget)
    }
}
