//! Entra ID tokens for Service Bus: the app's managed identity in Azure, the
//! developer's own login on a workstation. No keys, no connection strings.

use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use azure_core::time::{Duration, OffsetDateTime};
use tokio::sync::Mutex;

use super::BusError;

pub const SCOPE: &str = "https://servicebus.azure.net/.default";

/// Tokens are renewed this long before they expire, so none is used stale.
const RENEW_BEFORE: Duration = Duration::minutes(5);

#[derive(Debug)]
pub struct BusAuth {
    credential: Arc<dyn TokenCredential>,
    cached: Mutex<Option<(String, OffsetDateTime)>>,
}

impl BusAuth {
    pub fn new(credential: Arc<dyn TokenCredential>) -> BusAuth {
        BusAuth {
            credential,
            cached: Mutex::new(None),
        }
    }

    /// A valid bearer token, from the cache while it has more than five minutes left.
    pub async fn bearer(&self) -> Result<String, BusError> {
        let mut cached = self.cached.lock().await;
        if let Some((token, expires_on)) = cached.as_ref()
            && *expires_on - OffsetDateTime::now_utc() > RENEW_BEFORE
        {
            return Ok(token.clone());
        }
        let fresh = self
            .credential
            .get_token(&[SCOPE], None)
            .await
            .map_err(|e| BusError::Transient(format!("no Entra token for Service Bus: {e}")))?;
        let token = fresh.token.secret().to_owned();
        *cached = Some((token.clone(), fresh.expires_on));
        Ok(token)
    }

    /// Service Bus refused the token: get a new one next time.
    pub async fn forget(&self) {
        *self.cached.lock().await = None;
    }
}
