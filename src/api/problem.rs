//! Errors of the HTTP API as RFC 9457 problem details (`application/problem+json`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::UploadError;
use crate::domain::upload::UploadErrorKind;
use crate::store::StoreError;

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(rename = "type", serialize_with = "problem_type")]
    pub kind: &'static str,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The batch the problem is about, when it was stored all the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
}

/// A problem's `type`: its kind under the product's problem namespace.
fn problem_type<S: serde::Serializer>(kind: &&'static str, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("https://ticketpay.dev/problems/{kind}"))
}

impl Problem {
    pub fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> Problem {
        Problem {
            kind,
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: detail.into(),
            row: None,
            field: None,
            batch_id: None,
        }
    }

    pub fn not_found(what: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "not-found", what)
    }

    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }
}

impl From<UploadError> for Problem {
    fn from(e: UploadError) -> Problem {
        let status = match e.kind {
            UploadErrorKind::TooManyTickets => StatusCode::PAYLOAD_TOO_LARGE,
            UploadErrorKind::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
        };
        let mut p = Problem::new(status, "invalid-upload", e.to_string());
        p.row = e.row.and_then(|r| u32::try_from(r).ok());
        p.field = e.field;
        p
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Problem {
        // The store's own words stay in the log: they may name tables, hosts or data.
        let correlation_id = uuid::Uuid::new_v4();
        tracing::error!(error = %e, %correlation_id, "store error");
        let detail = format!("the store could not answer; try again (correlation id {correlation_id})");
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body may be left unread, so this connection cannot carry another request.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::upload::{self, Header};
    use crate::domain::AuthorityCode;

    #[test]
    fn a_refused_upload_is_a_problem_naming_its_row_and_field_and_too_many_tickets_is_too_large() {
        let authorities = [AuthorityCode::parse("CITY-PARKING").unwrap()];
        let header = Header { client_id: Some("acme"), currency: Some("EUR"), budget: Some("10.00") };
        let bad_row = upload::parse_csv(b"ticket_id,authority\nT1,NOWHERE\n", &header, &authorities).unwrap_err();
        let p = Problem::from(bad_row.clone());
        assert_eq!((p.status, p.row, p.field.as_deref()), (422, bad_row.row.map(|r| r as u32), Some("authority")));
        assert!(p.row.is_some() && p.detail.contains("`authority`"), "{p:?}");
        let mut csv = b"ticket_id,authority\n".to_vec();
        for i in 0..=upload::MAX_TICKETS {
            csv.extend(format!("T{i},CITY-PARKING\n").bytes());
        }
        let too_many = Problem::from(upload::parse_csv(&csv, &header, &authorities).unwrap_err());
        assert_eq!((too_many.status, too_many.field.as_deref()), (413, Some("tickets")));
    }
}
