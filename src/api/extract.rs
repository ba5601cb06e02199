//! Path, query and body extraction that refuses with problem details: axum's
//! own extractors answer `text/plain`, which no client of this API expects.

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::extract::path::ErrorKind;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query};
use axum::http::StatusCode;
use axum::http::request::Parts;
use bytes::BytesMut;
use futures::StreamExt;
use serde::de::DeserializeOwned;

use super::problem::Problem;

/// How much of a refused, oversized body is still read (and dropped).
const DRAIN_CAP: usize = 64 * 1024 * 1024;

/// Reads a request body of at most `limit` bytes. A longer one is refused with
/// 413 `detail`, but read to its end first (up to [`DRAIN_CAP`]): a caller, or
/// a proxy, still sending it would otherwise lose the answer to a reset.
pub async fn read_body(body: Body, limit: usize, detail: impl FnOnce() -> String) -> Result<Bytes, Problem> {
    let mut stream = body.into_data_stream();
    let (mut kept, mut seen) = (BytesMut::new(), 0usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Problem::bad_request(format!("cannot read the request body: {e}")))?;
        seen += chunk.len();
        if seen <= limit {
            kept.extend_from_slice(&chunk);
        } else if seen > DRAIN_CAP {
            break;
        }
    }
    if seen > limit {
        return Err(Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "too-large", detail()));
    }
    Ok(kept.freeze())
}

/// The route's path parameters, deserialized as `T`.
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(PathParams(value)),
            Err(rejection) => Err(path_problem(&rejection)),
        }
    }
}

/// The query string as name → value; of a repeated name, the last value.
pub struct QueryParams(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        match Query::<HashMap<String, String>>::from_request_parts(parts, state).await {
            Ok(Query(map)) => Ok(QueryParams(map)),
            Err(rejection) => Err(query_problem(&rejection)),
        }
    }
}

fn path_problem(rejection: &PathRejection) -> Problem {
    let mut problem = Problem::new(rejection.status(), "bad-request", rejection.body_text());
    if let PathRejection::FailedToDeserializePathParams(e) = rejection {
        problem.field = match e.kind() {
            ErrorKind::InvalidUtf8InPathParam { key }
            | ErrorKind::ParseErrorAtKey { key, .. }
            | ErrorKind::DeserializeError { key, .. } => Some(key.clone()),
            _ => None,
        };
    }
    problem
}

fn query_problem(rejection: &QueryRejection) -> Problem {
    Problem::new(rejection.status(), "bad-request", rejection.body_text())
}
