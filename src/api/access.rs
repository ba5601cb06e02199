//! Who may call the API. Every `/api` request carries a key, in the
//! `x-functions-key` header or the `code` query parameter (as Azure Functions
//! clients already send one); the handler checks it itself, so the rule holds
//! the same behind the local host and the Azure Functions host.
//!
//! Keys come from `TICKETPAY_API_KEYS`, a JSON array of
//! `{"name", "role": "operator" | "client", "client_id"?, "sha256"}`: only the
//! SHA-256 of each key is configured, never the key. An operator sees every
//! client; a client key sees its own client's batches only, and another
//! client's batch answers exactly as one that does not exist.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::App;
use super::problem::Problem;
use crate::domain::ClientId;

/// Paths under `/api` served without a key: they hold no data (the console is
/// an HTML/JS shell whose data comes from the keyed JSON API). A path matches
/// an entry equal to it or under it.
pub const OPEN_PATHS: &[&str] = &["/api/console", "/api/openapi.json"];

/// The header and query parameter a key travels in.
pub const KEY_HEADER: &str = "x-functions-key";
pub const KEY_QUERY: &str = "code";

/// Who is calling, once their key is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Sees and acts on every client's batches (everyone, when the API is open).
    Operator,
    /// Sees and uploads only this client's batches.
    Client(ClientId),
}

impl Principal {
    pub fn sees(&self, client: &ClientId) -> bool {
        match self {
            Principal::Operator => true,
            Principal::Client(own) => own == client,
        }
    }

    /// The only client this caller may see, if it is limited to one.
    pub fn client(&self) -> Option<&ClientId> {
        match self {
            Principal::Operator => None,
            Principal::Client(own) => Some(own),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = Problem;

    /// Set by [`require_key`]; a route reached without it is refused, never opened.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Principal, Problem> {
        parts.extensions.get::<Principal>().cloned().ok_or_else(missing_key)
    }
}

/// The name of the caller's key, as configured: who acted, in the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyName(pub String);

/// The name audit trails give every caller of an API that takes no keys.
pub const OPEN_KEY_NAME: &str = "anyone (the API takes no keys)";

impl<S: Send + Sync> FromRequestParts<S> for KeyName {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<KeyName, Problem> {
        parts.extensions.get::<KeyName>().cloned().ok_or_else(missing_key)
    }
}

/// How the API is guarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// No keys configured: every caller is an operator (local use only).
    Open,
    Keys(ApiKeys),
}

impl Access {
    /// The caller a request's key (header or query parameter) stands for.
    pub fn caller_of(&self, request: &Request) -> Result<Principal, Problem> {
        self.caller(presented_key(request).as_deref())
    }

    /// The name of the key a request presents (checked by [`Access::caller_of`] first).
    fn name_of(&self, request: &Request) -> KeyName {
        match self {
            Access::Open => KeyName(OPEN_KEY_NAME.into()),
            Access::Keys(keys) => KeyName(presented_key(request).and_then(|k| keys.name(&k)).unwrap_or_default()),
        }
    }

    fn caller(&self, presented: Option<&str>) -> Result<Principal, Problem> {
        match self {
            Access::Open => Ok(Principal::Operator),
            Access::Keys(keys) => keys.caller(presented.ok_or_else(missing_key)?).ok_or_else(invalid_key),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Role {
    Operator,
    Client,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: String,
    role: Role,
    #[serde(default)]
    client_id: Option<String>,
    sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyEntry {
    digest: [u8; 32],
    caller: Principal,
    name: String,
}

/// The configured keys, by the SHA-256 of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeys(Vec<KeyEntry>);

impl ApiKeys {
    /// Parses the `TICKETPAY_API_KEYS` JSON.
    pub fn parse(json: &str) -> Result<ApiKeys, String> {
        let raw: Vec<RawKey> = serde_json::from_str(json).map_err(|e| format!("not a JSON array of keys: {e}"))?;
        let mut entries: Vec<KeyEntry> = Vec::with_capacity(raw.len());
        for key in raw {
            let entry = KeyEntry::parse(key)?;
            if entries.iter().any(|e| e.digest == entry.digest) {
                return Err("the same sha256 is listed twice".into());
            }
            entries.push(entry);
        }
        Ok(ApiKeys(entries))
    }

    /// The caller a presented key stands for. Every entry is compared in
    /// constant time, so the answer's timing says nothing about the keys.
    fn caller(&self, presented: &str) -> Option<Principal> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.0.iter().fold(None, |found, e| if same(&e.digest, &digest) { Some(e.caller.clone()) } else { found })
    }

    fn name(&self, presented: &str) -> Option<String> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.0.iter().fold(None, |found, e| if same(&e.digest, &digest) { Some(e.name.clone()) } else { found })
    }
}

impl KeyEntry {
    fn parse(raw: RawKey) -> Result<KeyEntry, String> {
        let name = raw.name.trim();
        if name.is_empty() {
            return Err("every key needs a non-empty name".into());
        }
        let digest = parse_digest(&raw.sha256).ok_or_else(|| format!("key `{name}`: sha256 must be 64 hexadecimal digits"))?;
        let caller = match (raw.role, raw.client_id) {
            (Role::Operator, None) => Principal::Operator,
            (Role::Operator, Some(_)) => return Err(format!("key `{name}`: an operator key has no client_id")),
            (Role::Client, Some(c)) => Principal::Client(ClientId::parse(&c).map_err(|e| format!("key `{name}`: {e}"))?),
            (Role::Client, None) => return Err(format!("key `{name}`: a client key needs its client_id")),
        };
        Ok(KeyEntry { digest, caller, name: name.to_owned() })
    }
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The SHA-256 of a key as configured in `TICKETPAY_API_KEYS` (lower-case hex).
pub fn key_digest(key: &str) -> String {
    format!("{:x}", Sha256::digest(key.as_bytes()))
}

/// The middleware in front of every `/api` route: checks the key (outside
/// [`OPEN_PATHS`]) and hands the [`Principal`] to the route.
pub async fn require_key(State(app): State<Arc<App>>, mut request: Request, next: Next) -> Response {
    if is_open(request.uri().path()) {
        return next.run(request).await;
    }
    match app.access.caller_of(&request) {
        Ok(caller) => {
            let name = app.access.name_of(&request);
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

    fn keys() -> ApiKeys {
        let json = serde_json::json!([
            { "name": "ops", "role": "operator", "sha256": key_digest("op-key") },
            { "name": "acme-erp", "role": "client", "client_id": "acme", "sha256": key_digest("acme-key").to_uppercase() },
        ]);
        ApiKeys::parse(&json.to_string()).unwrap()
    }

    #[test]
    fn a_key_stands_for_its_role_and_a_wrong_or_missing_key_for_nobody() {
        let access = Access::Keys(keys());
        assert_eq!(access.caller(Some("op-key")).unwrap(), Principal::Operator);
        assert_eq!(access.caller(Some("acme-key")).unwrap(), Principal::Client(ClientId::parse("acme").unwrap()));
        assert_eq!(access.caller(Some("acme-key ")).unwrap_err().status, 401);
        assert!(access.caller(None).unwrap_err().detail.contains(KEY_HEADER));
        assert_eq!(Access::Open.caller(None).unwrap(), Principal::Operator);
    }

    #[test]
    fn a_malformed_entry_is_named() {
        let cases = [
            (r#"{"name": "ops"}"#, "JSON array"),
            (r#"[{"name": "ops", "role": "operator", "key": "plain", "sha256": ""}]"#, "unknown field `key`"),
            (r#"[{"name": "ops", "role": "operator", "sha256": "abc"}]"#, "`ops`: sha256"),
            (r#"[{"name": "x", "role": "client", "sha256": "00"}]"#, "sha256"),
            (r#"[{"name": "", "role": "operator", "sha256": "00"}]"#, "non-empty name"),
            (r#"[{"name": "who", "role": "admin", "sha256": "00"}]"#, "unknown variant `admin`"),
        ];
        for (json, expected) in cases {
            let e = ApiKeys::parse(json).unwrap_err();
            assert!(e.contains(expected), "{json}: {e}");
        }
        let digest = key_digest("k");
        let client_without_id = format!(r#"[{{"name": "c", "role": "client", "sha256": "{digest}"}}]"#);
        assert!(ApiKeys::parse(&client_without_id).unwrap_err().contains("needs its client_id"));
        let twice = format!(r#"[{{"name": "a", "role": "operator", "sha256": "{digest}"}}, {{"name": "b", "role": "operator", "sha256": "{digest}"}}]"#);
        assert!(ApiKeys::parse(&twice).unwrap_err().contains("twice"));
    }

    #[test]
    fn only_the_listed_paths_and_what_is_under_them_are_open() {
        assert!(is_open("/api/console"));
        assert!(is_open("/api/console/app.js"));
        assert!(is_open("/api/openapi.json"));
        assert!(!is_open("/api/consoles"));
        assert!(!is_open("/api/batches"));
    }
}
