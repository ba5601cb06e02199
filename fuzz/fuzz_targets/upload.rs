//! Any bytes, as a JSON upload and as a CSV upload. The parsers never panic; a
//! refusal names the row and field where there is one; what is accepted reads
//! the same in the other format.
//!
//! The domain is pure, so it is compiled here on its own, from its sources:
//! the fuzzer builds in a fraction of the time the whole service would take.

#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../src/domain/mod.rs"]
mod domain;

use domain::ids::AuthorityCode;
use domain::upload::{self, BatchRequest, Header, MAX_TICKETS, UploadError};
use libfuzzer_sys::fuzz_target;

const CSV_HEADER: Header<'static> = Header { client_id: Some("acme"), currency: Some("EUR"), budget: Some("250.00") };
const BATCH_FIELDS: [&str; 4] = ["client_id", "currency", "budget", "tickets"];

fuzz_target!(|data: &[u8]| {
    let authorities = authorities();
    match upload::parse_json(data, &authorities) {
        Ok(request) => accepted(&request, &authorities),
        Err(e) => refused(&e, &batch_level_names(data), usize::MAX),
    }
    match upload::parse_csv(data, &CSV_HEADER, &authorities) {
        Ok(request) => accepted(&request, &authorities),
        Err(e) => refused(&e, &BATCH_FIELDS.map(String::from), csv_lines(data)),
    }
});

/// What a JSON upload's batch-level error may name: its fields, or a stray key beside them.
fn batch_level_names(data: &[u8]) -> Vec<String> {
    let mut names: Vec<String> = BATCH_FIELDS.map(String::from).into();
    if let Ok(serde_json::Value::Object(top)) = serde_json::from_slice(data) {
        names.extend(top.keys().cloned());
    }
    names
}

/// An upper bound on the CSV's line numbers (`\r`, `\n` and `\r\n` each end a line).
fn csv_lines(data: &[u8]) -> usize {
    1 + data.iter().filter(|&&b| b == b'\n' || b == b'\r').count()
}

fn authorities() -> Vec<AuthorityCode> {
    ["CITY-PARKING", "STATE-TOLLS"].into_iter().map(|a| AuthorityCode::parse(a).unwrap()).collect()
}

fn refused(e: &UploadError, batch_level: &[String], last_row: usize) {
    assert!(!e.message.is_empty(), "{e:?}");
    assert!(e.row.is_none_or(|row| (1..=last_row).contains(&row)), "a row of the upload: {e:?}");
    if let Some(field) = &e.field {
        assert!(e.to_string().contains(&format!("`{field}`")), "the detail names the field: {e:?}");
        assert!(e.row.is_some() || batch_level.contains(field), "a ticket's field comes with its row: {e:?}");
    }
}

fn accepted(request: &BatchRequest, authorities: &[AuthorityCode]) {
    assert!((1..=MAX_TICKETS).contains(&request.tickets.len()));
    let mut ids: Vec<&str> = request.tickets.iter().map(|t| t.ticket_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), request.tickets.len(), "ticket ids are unique");

    let json = upload::parse_json(as_json(request).as_bytes(), authorities).expect("its JSON form is accepted");
    assert_eq!(&json, request);
    let budget = request.budget.to_decimal();
    let header = Header {
        client_id: Some(request.client_id.as_str()),
        currency: Some(request.currency.code()),
        budget: Some(&budget),
    };
    let csv = upload::parse_csv(&as_csv(request), &header, authorities).expect("its CSV form is accepted");
    assert_eq!(&csv, request);
    assert_eq!(csv.digest(), request.digest());
}

fn as_json(request: &BatchRequest) -> String {
    let tickets: Vec<_> = request
        .tickets
        .iter()
        .map(|t| {
            serde_json::json!({
                "ticket_id": t.ticket_id.as_str(),
                "authority": t.authority.as_str(),
                "reference": t.reference.as_ref().map(|r| r.as_str()),
            })
        })
        .collect();
    serde_json::json!({
        "client_id": request.client_id.as_str(),
        "currency": request.currency.code(),
        "budget": request.budget.to_decimal(),
        "tickets": tickets,
    })
    .to_string()
}

fn as_csv(request: &BatchRequest) -> Vec<u8> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(["ticket_id", "authority", "reference"]).unwrap();
    for t in &request.tickets {
        let reference = t.reference.as_ref().map_or("", |r| r.as_str());
        writer.write_record([t.ticket_id.as_str(), t.authority.as_str(), reference]).unwrap();
    }
    writer.into_inner().unwrap()
}
