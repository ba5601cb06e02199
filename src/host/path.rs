//! Request paths that a resolver would rewrite are refused before routing.
//!
//! A dot segment (`.`, `..`, or any percent-encoding of them such as `%2e%2e`)
//! or a segment holding an encoded slash or a backslash means something
//! between the caller and the route (a proxy building a URL, a client
//! library) may read the path differently from the router that matched it:
//! `/api/../validate` matches `/api/{*rest}` here and reaches `/validate`
//! once resolved. No route of ours needs such a segment, so both the local
//! host and the handler refuse them outright.

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::problem::Problem;

/// What is wrong with a path, naming the segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsafePath {
    #[error("the path has a dot segment `{0}`: `.` and `..` (or their percent-encodings) are not allowed in a path")]
    DotSegment(String),
    #[error("the path segment `{0}` holds an encoded slash or a backslash, which is not allowed in a path")]
    Separator(String),
}

/// Refuses a path with a segment that is `.` or `..` once percent-decoded,
/// or that decodes to something holding `/` or `\`.
pub fn check(path: &str) -> Result<(), UnsafePath> {
    for segment in path.split('/') {
        let decoded = decoded(segment);
        if decoded == b"." || decoded == b".." {
            return Err(UnsafePath::DotSegment(segment.to_owned()));
        }
        if decoded.iter().any(|b| matches!(b, b'/' | b'\\')) {
            return Err(UnsafePath::Separator(segment.to_owned()));
        }
    }
    Ok(())
}

/// `text` with every `%XX` decoded (a malformed escape is kept as it is).
pub(crate) fn decoded(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (bytes.get(i + 1).and_then(|&b| hex(b)), bytes.get(i + 2).and_then(|&b| hex(b)))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// `app` behind [`check`]: the check runs before `app` routes anything, so no
/// route, fallback or nested router is reached around it.
pub fn guarded(app: Router) -> Router {
    Router::new().fallback_service(app).layer(axum::middleware::from_fn(refuse_unsafe))
}

async fn refuse_unsafe(request: Request, next: Next) -> Response {
    match check(request.uri().path()) {
        Ok(()) => next.run(request).await,
        Err(e) => Problem::new(StatusCode::BAD_REQUEST, "unsafe-path", e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_in_any_encoding_are_refused() {
        for path in [
            "/api/../validate",
            "/api/./batches",
            "/api/%2e%2e/pay",
            "/api/%2E%2E/pay",
            "/api/%2e%2E/pay",
            "/api/.%2e/pay",
            "/api/%2e./pay",
            "/api/%2e/batches",
            "/api/%2E",
            "/..",
            "/.",
            "/api/batches/..",
        ] {
            assert!(matches!(check(path), Err(UnsafePath::DotSegment(_))), "{path}");
        }
    }

    #[test]
    fn encoded_slashes_and_backslashes_are_refused() {
        for path in ["/api/..%2fvalidate", "/api/%2F..", "/api/a%2fb", "/api/..%5cvalidate", "/api/%5C", "/api\\..\\validate"] {
            assert!(matches!(check(path), Err(UnsafePath::Separator(_))), "{path}");
        }
    }

    #[test]
    fn the_error_names_the_segment() {
        let e = check("/api/%2e%2e/pay").unwrap_err();
        assert!(e.to_string().contains("`%2e%2e`"), "{e}");
    }

    /// One raw HTTP/1.1 request, so nothing on the client side resolves the path.
    async fn status_of(url: &str, target: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(url).await.unwrap();
        let request = format!("POST {target} HTTP/1.1\r\nHost: {url}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        let status = answer.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, answer)
    }

    #[tokio::test]
    async fn the_guard_answers_before_any_route_or_fallback() {
        use axum::routing::post;
        let app = Router::new()
            .route("/{function}", post(|| async { "invoked" }))
            .nest("/api", Router::new().fallback(|| async { "api fallback" }))
            .fallback(|| async { "fallback" });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, guarded(app)).await.unwrap() });

        for target in ["/api/../validate", "/api/%2e%2e/pay", "/api/./x", "/nowhere/..", "/api/..%2Fpay"] {
            let (status, answer) = status_of(&url, target).await;
            assert_eq!(status, 400, "{target}: {answer}");
            assert!(answer.contains("application/problem+json"), "{answer}");
            assert!(!answer.contains("invoked") && !answer.contains("fallback"), "{answer}");
        }
        let (status, answer) = status_of(&url, "/validate").await;
        assert_eq!((status, answer.ends_with("invoked")), (200, true), "{answer}");
        let (status, answer) = status_of(&url, "/api/x/y").await;
        assert_eq!((status, answer.ends_with("api fallback")), (200, true), "{answer}");
    }

    #[test]
    fn ordinary_paths_pass_even_with_dots_inside_a_segment() {
        for path in [
            "/",
            "/api",
            "/api/",
            "/api/batches",
            "/api/openapi.json",
            "/api/batches/b-1/tickets/T.000001",
            "/api/...",
            "/api/.hidden",
            "/api/a%20b",
            "/api/%2",
            "/api/%zz",
            "/api//batches",
            "/ticket-lookup/messages",
        ] {
            assert_eq!(check(path), Ok(()), "{path}");
        }
    }
}
