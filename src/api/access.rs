//! Who may call the API. Every `/api` request carries a key, in the
//! `x-functions-key` header or the `code` query parameter (as Azure Functions
//! clients already send one); the handler checks it itself, so the rule holds
//! the same behind the local host and the Azure Functions host.
//!
//! Who each key stands for is [`crate::keys`]: an operator sees every client;
//! a client key sees its own client's batches only, and another client's
//! batch answers exactly as one that does not exist.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::App;
use super::problem::Problem;
pub use crate::keys::{Access, KeyName, Principal, key_digest};
use crate::keys::Refused;

/// Paths under `/api` served without a key: they hold no data (the console is
/// an HTML/JS shell whose data comes from the keyed JSON API). A path matches
/// an entry equal to it or under it.
pub const OPEN_PATHS: &[&str] = &["/api/console", "/api/openapi.json"];

/// The header and query parameter a key travels in.
pub const KEY_HEADER: &str = "x-functions-key";
pub const KEY_QUERY: &str = "code";

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = Problem;

    /// Set by [`require_key`]; a route reached without it is refused, never opened.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Principal, Problem> {
        parts.extensions.get::<Principal>().cloned().ok_or_else(missing_key)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for KeyName {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<KeyName, Problem> {
        parts.extensions.get::<KeyName>().cloned().ok_or_else(missing_key)
    }
}

/// The caller a request's key (header or query parameter) stands for.
pub fn caller_of(access: &Access, request: &Request) -> Result<Principal, Problem> {
    access.principal(presented_key(request).as_deref()).map_err(|refused| match refused {
        Refused::Missing => missing_key(),
        Refused::Invalid => invalid_key(),
    })
}

/// The name of the key a request presents (checked by [`caller_of`] first).
fn name_of(access: &Access, request: &Request) -> KeyName {
    access.name(presented_key(request).as_deref())
}

/// The middleware in front of every `/api` route: checks the key (outside
/// [`OPEN_PATHS`]) and hands the [`Principal`] to the route.
pub async fn require_key(State(app): State<Arc<App>>, mut request: Request, next: Next) -> Response {
    if is_open(request.uri().path()) {
        return next.run(request).await;
    }
    match caller_of(&app.access, &request) {
        Ok(caller) => {
            let name = name_of(&app.access, &request);
            request.extensions_mut().insert(caller);
            request.extensions_mut().insert(name);
            next.run(request).await
        }
        Err(refused) => {
            let mut response = refused.into_response();
            if carries_body(&request) {
                // The body is left unread, so this connection cannot carry another request.
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    }
}

fn carries_body(request: &Request) -> bool {
    let headers = request.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).is_some_and(|n| n.trim() != "0")
}

fn is_open(path: &str) -> bool {
    OPEN_PATHS.iter().any(|open| path.strip_prefix(open).is_some_and(|rest| rest.is_empty() || rest.starts_with('/')))
}

fn presented_key(request: &Request) -> Option<String> {
    let header = request.headers().get(KEY_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let query = || {
        let Query(params) = Query::<Vec<(String, String)>>::try_from_uri(request.uri()).ok()?;
        params.into_iter().find(|(k, _)| k == KEY_QUERY).map(|(_, v)| v)
    };
    header.or_else(query).filter(|k| !k.is_empty())
}

fn missing_key() -> Problem {
    let detail = format!("this API needs a key: send it in the {KEY_HEADER} header or the `{KEY_QUERY}` query parameter");
    Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
}

fn invalid_key() -> Problem {
    Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "the key is not valid")
}

/// A client key acting beyond its own client.
pub fn forbidden(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::FORBIDDEN, "forbidden", detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_listed_paths_and_what_is_under_them_are_open() {
        assert!(is_open("/api/console"));
        assert!(is_open("/api/console/app.js"));
        assert!(is_open("/api/openapi.json"));
        assert!(!is_open("/api/consoles"));
        assert!(!is_open("/api/batches"));
    }
}
