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
    let Some(target) = s.pick() else {
        return problem(StatusCode::BAD_GATEWAY, "the handler is not running (starting or restarting); try again shortly");
    };
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return problem(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}")),
    };
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let url = match reqwest::Url::parse(&format!("{}{path}", target.counted())) {
        Ok(url) => url,
        Err(e) => return problem(StatusCode::BAD_REQUEST, format!("the path cannot be forwarded: {e}")),
    };
    // Parsing a URL resolves dot segments: the handler must be asked for the
    // very path that was routed here, never another of its routes.
    if super::path::decoded(url.path()) != super::path::decoded(parts.uri.path()) {
        return problem(StatusCode::BAD_REQUEST, "the path would reach the handler as another path; it is not forwarded");
    }
    let mut rb = s.client.request(parts.method.clone(), url);
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

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    use super::super::testkit::*;
    use super::super::worker::WorkerState;

    #[tokio::test]
    async fn forwards_the_original_request_and_returns_the_response_as_is() {
        let app = app(&[]);
        let (handler, calls) = fake_handler(|_, _| {
            (StatusCode::CREATED, [("content-type", "application/json"), ("location", "/api/batches/b1"), ("x-custom", "1")], r#"{"id":"b1"}"#)
                .into_response()
        })
        .await;
        let (core, state) = core(app.path(), &app.path().join("data"), &handler, WorkerState::Ready).await;
        let c = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let r = c
            .put(format!("{}/api/batches?client=acme&x=1", core.url))
            .header("Idempotency-Key", "k1")
            .header("content-type", "text/csv")
            .body("id,amount\n1,2\n")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["location"], "/api/batches/b1");
        assert_eq!(r.headers()["x-custom"], "1");
        assert_eq!(r.text().await.unwrap(), r#"{"id":"b1"}"#);
        let call = calls.lock().unwrap()[0].clone();
        assert_eq!((call.method.as_str(), call.path_and_query.as_str()), ("PUT", "/api/batches?client=acme&x=1"));
        assert_eq!(call.headers["idempotency-key"], "k1");
        assert_eq!(call.headers["content-type"], "text/csv");
        assert_eq!(call.body, b"id,amount\n1,2\n");

        state.send(WorkerState::Down("exited".into())).unwrap();
        let r = c.get(format!("{}/api/batches", core.url)).send().await.unwrap();
        assert_eq!(r.status(), 502);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        core.stop().await;
    }
}
