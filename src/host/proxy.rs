//! HTTP functions with `enableProxyingHttpRequest`: the original request
//! (method, path, query, headers, body) goes to the handler as-is and its
//! response comes back as-is.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::response::Response;

use super::Shared;
use super::servicebus::problem;

/// Largest request body forwarded (batch uploads are far smaller).
const MAX_BODY: usize = 256 * 1024 * 1024;

fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "te" | "trailer" | "upgrade" | "host"
            | "content-length"
    )
}

pub(crate) async fn forward(State(s): State<Arc<Shared>>, req: Request) -> Response {
    if !s.handler_ready() {
        return problem(StatusCode::BAD_GATEWAY, "the handler is not running (starting or restarting); try again shortly");
    }
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return problem(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}")),
    };
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut rb = s.client.request(parts.method.clone(), format!("{}{path}", s.handler_url));
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            rb = rb.header(name, value);
        }
    }
    if let Some(t) = s.config.function_timeout {
        rb = rb.timeout(t);
    }
    let resp = match rb.body(body).send().await {
        Ok(r) => r,
        Err(e) => return problem(StatusCode::BAD_GATEWAY, format!("the handler did not answer: {e}")),
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return problem(StatusCode::BAD_GATEWAY, format!("the handler's response broke off: {e}")),
    };
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = status;
    for (name, value) in &headers {
        if !hop_by_hop(name) {
            out.headers_mut().append(name, value.clone());
        }
    }
    out
}
