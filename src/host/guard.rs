//! Who may use the host's own endpoints. `/admin` shows every client's
//! dead-lettered messages, so it takes an operator's API key whenever API keys
//! are configured (the same keys, headers and checks as the API). The Service
//! Bus REST endpoints take the token this host made at start and gave its
//! handler, as `Authorization: Bearer <token>`, as Azure Service Bus wants a
//! token: whoever else reaches loopback cannot enqueue a stage's message.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::Rng;
use sha2::{Digest, Sha256};

use super::Shared;
use super::servicebus::problem;
use crate::api::access::{caller_of, forbidden};
use crate::keys::{Access, Principal};

/// What the host's endpoints are guarded with.
pub(crate) struct Guard {
    /// The API's keys, for `/admin`.
    pub access: Access,
    pub bus_token: BusToken,
}

/// The secret a sender to this host's queues presents.
#[derive(Clone)]
pub struct BusToken(String);

impl BusToken {
    /// 256 random bits, made anew at every start of the host.
    pub fn random() -> BusToken {
        let bytes: [u8; 32] = rand::rng().random();
        BusToken(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// One given in the settings (`TICKETPAY_BUS_TOKEN`), for a handler started by someone else.
    pub fn given(token: &str) -> BusToken {
        BusToken(token.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether an `Authorization` header carries this token. The digests are
    /// compared in constant time, so timing says nothing about the token.
    fn accepts(&self, authorization: Option<&str>) -> bool {
        let Some(presented) = authorization.and_then(|a| a.strip_prefix("Bearer ")) else { return false };
        let digest = |s: &str| -> [u8; 32] { Sha256::digest(s.as_bytes()).into() };
        let (a, b) = (digest(presented.trim()), digest(&self.0));
        a.iter().zip(&b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for BusToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BusToken(..)")
    }
}

/// In front of `/admin`: an operator's key, unless the API is open.
pub(crate) async fn require_operator(State(s): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    match caller_of(&s.guard.access, &request) {
        Ok(Principal::Operator) => next.run(request).await,
        Ok(Principal::Client(_)) => forbidden("the host's /admin endpoints need an operator key, not a client key").into_response(),
        Err(refused) => refused.into_response(),
    }
}

/// In front of the Service Bus REST endpoints: this host's token.
pub(crate) async fn require_bus_token(State(s): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let authorization = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if s.guard.bus_token.accepts(authorization) {
        return next.run(request).await;
    }
    let detail = format!(
        "sending to the local host's queues needs its token as `Authorization: Bearer <token>`; the host gives it to its handler in {}",
        crate::config::BUS_TOKEN
    );
    let mut response = problem(StatusCode::UNAUTHORIZED, detail);
    let headers = response.headers_mut();
    headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    // The body is left unread, so this connection cannot carry another request.
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_bearer_of_the_token_is_accepted() {
        let token = BusToken::random();
        assert_eq!(token.as_str().len(), 64);
        assert_ne!(token.as_str(), BusToken::random().as_str(), "a new token each time");
        assert!(token.accepts(Some(&format!("Bearer {}", token.as_str()))));
        assert!(!token.accepts(None));
        assert!(!token.accepts(Some(token.as_str())), "the scheme is required");
        assert!(!token.accepts(Some(&format!("Basic {}", token.as_str()))));
        assert!(!token.accepts(Some("Bearer ")));
        assert!(!token.accepts(Some(&format!("Bearer {}x", token.as_str()))));
        assert!(!token.accepts(Some(&format!("Bearer {}", &token.as_str()[1..]))));
        assert_eq!(format!("{token:?}"), "BusToken(..)");
    }
}
