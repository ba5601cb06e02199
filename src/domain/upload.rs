//! A batch upload, parsed at the edge: JSON or CSV in, a valid [`BatchRequest`]
//! out, or an [`UploadError`] that names the row and field. All or nothing.

use std::collections::HashSet;
use std::fmt;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::ids::{AuthorityCode, ClientId, Reference, TicketId};
use super::money::{Currency, Money};

pub const MAX_TICKETS: usize = 5_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketLine {
    pub ticket_id: TicketId,
    pub authority: AuthorityCode,
    pub reference: Option<Reference>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRequest {
    pub client_id: ClientId,
    pub currency: Currency,
    pub budget: Money,
    pub tickets: Vec<TicketLine>,
}

/// What is wrong with an upload. `row` is the ticket's row: 1-based position in
/// the JSON `tickets` array, or the CSV line number (the header is line 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadError {
    pub kind: UploadErrorKind,
    pub row: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

/// Whether the upload says something wrong, or is more than a batch holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadErrorKind {
    Invalid,
    TooManyTickets,
}

impl UploadError {
    fn invalid(row: Option<usize>, field: Option<&str>, message: impl Into<String>) -> UploadError {
        UploadError { kind: UploadErrorKind::Invalid, row, field: field.map(str::to_owned), message: message.into() }
    }

    fn new(field: Option<&str>, message: impl Into<String>) -> UploadError {
        UploadError::invalid(None, field, message)
    }

    fn at(row: usize, field: &str, message: impl Into<String>) -> UploadError {
        UploadError::invalid(Some(row), Some(field), message)
    }

    fn too_many(count: &str) -> UploadError {
        let message = format!("{count} tickets; a batch holds at most {MAX_TICKETS}");
        UploadError { kind: UploadErrorKind::TooManyTickets, ..UploadError::new(Some("tickets"), message) }
    }
}

impl fmt::Display for UploadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.row, &self.field) {
            (Some(row), Some(field)) => write!(f, "row {row}, field `{field}`: {}", self.message),
            (None, Some(field)) => write!(f, "field `{field}`: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for UploadError {}

/// The batch-level fields, as given (JSON body or CSV query parameters).
pub struct Header<'a> {
    pub client_id: Option<&'a str>,
    pub currency: Option<&'a str>,
    pub budget: Option<&'a str>,
}

fn parse_header(h: &Header<'_>) -> Result<(ClientId, Currency, Money), UploadError> {
    fn need<'a>(v: Option<&'a str>, name: &str) -> Result<&'a str, UploadError> {
        v.ok_or_else(|| UploadError::new(Some(name), "is required"))
    }
    let client_id = ClientId::parse(need(h.client_id, "client_id")?)
        .map_err(|e| UploadError::new(Some("client_id"), e))?;
    let currency = Currency::parse(need(h.currency, "currency")?)
        .map_err(|e| UploadError::new(Some("currency"), e))?;
    let budget = Money::parse_decimal(need(h.budget, "budget")?, currency)
        .map_err(|e| UploadError::new(Some("budget"), e))?;
    Ok((client_id, currency, budget))
}

/// Checks one ticket line's fields against the authorities that exist.
fn parse_line(
    row: usize,
    ticket_id: &str,
    authority: &str,
    reference: Option<&str>,
    authorities: &[AuthorityCode],
) -> Result<TicketLine, UploadError> {
    let ticket_id = TicketId::parse(ticket_id.trim()).map_err(|e| UploadError::at(row, "ticket_id", e))?;
    let authority = authorities
        .iter()
        .find(|a| a.as_str() == authority.trim())
        .cloned()
        .ok_or_else(|| {
            UploadError::at(row, "authority", format!("unknown authority `{authority}` (see GET /api/authorities)"))
        })?;
    let reference = match reference.map(str::trim).filter(|r| !r.is_empty()) {
        Some(r) => Some(Reference::parse(r).map_err(|e| UploadError::at(row, "reference", e))?),
        None => None,
    };
    Ok(TicketLine { ticket_id, authority, reference })
}

fn finish(
    client_id: ClientId,
    currency: Currency,
    budget: Money,
    tickets: Vec<(usize, TicketLine)>,
) -> Result<BatchRequest, UploadError> {
    if tickets.is_empty() {
        return Err(UploadError::new(Some("tickets"), "a batch needs at least one ticket"));
    }
    if tickets.len() > MAX_TICKETS {
        return Err(UploadError::too_many(&tickets.len().to_string()));
    }
    let mut seen = HashSet::with_capacity(tickets.len());
    for (row, line) in &tickets {
        if !seen.insert(line.ticket_id.as_str()) {
            return Err(UploadError::at(*row, "ticket_id", format!("duplicate ticket_id `{}`", line.ticket_id)));
        }
    }
    let tickets = tickets.into_iter().map(|(_, line)| line).collect();
    Ok(BatchRequest { client_id, currency, budget, tickets })
}

/// Parses `{"client_id", "currency", "budget": "<decimal>", "tickets": [{"ticket_id", "authority", "reference"?}]}`.
pub fn parse_json(body: &[u8], authorities: &[AuthorityCode]) -> Result<BatchRequest, UploadError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| UploadError::new(None, format!("malformed JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(UploadError::new(None, "the body must be a JSON object"));
    };
    reject_unknown(&obj, &["client_id", "currency", "budget", "tickets"], None)?;
    let text = |name: &str| -> Result<Option<&str>, UploadError> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(Value::Number(_)) if name == "budget" => Err(UploadError::new(
                Some(name),
                "must be a decimal string such as \"1250.00\", not a JSON number",
            )),
            Some(_) => Err(UploadError::new(Some(name), "must be a string")),
        }
    };
    let header = Header { client_id: text("client_id")?, currency: text("currency")?, budget: text("budget")? };
    let (client_id, currency, budget) = parse_header(&header)?;
    let items = match obj.get("tickets") {
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) => return Err(UploadError::new(Some("tickets"), "is required")),
        Some(_) => return Err(UploadError::new(Some("tickets"), "must be an array")),
    };
    if items.len() > MAX_TICKETS {
        return Err(UploadError::too_many(&items.len().to_string()));
    }
    let mut tickets = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let row = i + 1;
        let Value::Object(fields) = item else {
            return Err(UploadError::invalid(Some(row), None, "must be an object"));
        };
        reject_unknown(fields, &["ticket_id", "authority", "reference"], Some(row))?;
        let field = |name: &str, required: bool| -> Result<Option<&str>, UploadError> {
            match fields.get(name) {
                Some(Value::String(s)) => Ok(Some(s)),
                None | Some(Value::Null) if !required => Ok(None),
                None | Some(Value::Null) => Err(UploadError::at(row, name, "is required")),
                Some(_) => Err(UploadError::at(row, name, "must be a string")),
            }
        };
        let ticket_id = field("ticket_id", true)?.unwrap_or_default();
        let authority = field("authority", true)?.unwrap_or_default();
        let line = parse_line(row, ticket_id, authority, field("reference", false)?, authorities)?;
        tickets.push((row, line));
    }
    finish(client_id, currency, budget, tickets)
}

fn reject_unknown(obj: &Map<String, Value>, known: &[&str], row: Option<usize>) -> Result<(), UploadError> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(UploadError::invalid(row, Some(k), format!("unknown field; expected one of {}", known.join(", ")))),
        None => Ok(()),
    }
}

/// Parses CSV with the header `ticket_id,authority[,reference]`; the batch fields come apart.
pub fn parse_csv(body: &[u8], header: &Header<'_>, authorities: &[AuthorityCode]) -> Result<BatchRequest, UploadError> {
    let (client_id, currency, budget) = parse_header(header)?;
    let text = std::str::from_utf8(body).map_err(|e| UploadError::new(None, format!("the CSV is not UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(UploadError::new(None, "the CSV is empty; it needs the header `ticket_id,authority[,reference]` and one line per ticket"));
    }
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(text.as_bytes());
    let columns: Vec<String> = reader
        .headers()
        .map_err(|e| UploadError::new(None, format!("malformed CSV header: {e}")))?
        .iter()
        .map(|c| c.trim().to_owned())
        .collect();
    let expected_ok = columns.len() >= 2
        && columns[0] == "ticket_id"
        && columns[1] == "authority"
        && (columns.len() == 2 || (columns.len() == 3 && columns[2] == "reference"));
    if !expected_ok {
        let found = columns.join(",");
        return Err(UploadError::invalid(Some(1), None, format!("the CSV header must be `ticket_id,authority[,reference]`, found `{found}`")));
    }
    let mut tickets = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let row = e.position().map(|p| p.line() as usize);
            UploadError::invalid(row, None, format!("malformed CSV: {e}"))
        })?;
        let row = record.position().map_or(tickets.len() + 2, |p| p.line() as usize);
        if tickets.len() >= MAX_TICKETS {
            return Err(UploadError::too_many(&format!("more than {MAX_TICKETS}")));
        }
        let line = parse_line(row, &record[0], &record[1], record.get(2), authorities)?;
        tickets.push((row, line));
    }
    finish(client_id, currency, budget, tickets)
}

impl BatchRequest {
    /// A digest of what was asked, independent of the upload's format and spacing.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.client_id.as_str());
        h.update([0]);
        h.update(self.currency.code());
        h.update(self.budget.minor.to_le_bytes());
        for t in &self.tickets {
            h.update(t.ticket_id.as_str());
            h.update([0]);
            h.update(t.authority.as_str());
            h.update([0]);
            h.update(t.reference.as_ref().map_or("", Reference::as_str));
            h.update([1]);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authorities() -> Vec<AuthorityCode> {
        vec![AuthorityCode::parse("CITY-PARKING").unwrap(), AuthorityCode::parse("STATE-TOLLS").unwrap()]
    }

    fn json(v: serde_json::Value) -> Result<BatchRequest, UploadError> {
        parse_json(v.to_string().as_bytes(), &authorities())
    }

    fn good() -> serde_json::Value {
        serde_json::json!({"client_id": "acme", "currency": "EUR", "budget": "100.50",
            "tickets": [{"ticket_id": "t1", "authority": "CITY-PARKING", "reference": "FR-1"},
                        {"ticket_id": "t2", "authority": "STATE-TOLLS"}]})
    }

    #[test]
    fn a_good_json_upload_parses() {
        let req = json(good()).unwrap();
        assert_eq!(req.budget.minor, 10_050);
        assert_eq!(req.tickets.len(), 2);
        assert_eq!(req.tickets[0].reference.as_ref().unwrap().as_str(), "FR-1");
    }

    #[test]
    fn json_errors_name_the_row_and_field() {
        let mut v = good();
        v["tickets"][1]["authority"] = "MOON".into();
        let e = json(v).unwrap_err();
        assert_eq!((e.row, e.field.as_deref()), (Some(2), Some("authority")));
        assert!(e.message.contains("MOON"));

        let mut v = good();
        v["tickets"][1]["ticket_id"] = "t1".into();
        let e = json(v).unwrap_err();
        assert_eq!((e.row, e.field.as_deref()), (Some(2), Some("ticket_id")));
        assert!(e.message.contains("duplicate"));

        let mut v = good();
        v["budget"] = serde_json::json!(100.5);
        assert_eq!(json(v).unwrap_err().field.as_deref(), Some("budget"));

        for (field, value) in [("budget", "-1"), ("budget", "1.001"), ("currency", "XXX"), ("client_id", "a b")] {
            let mut v = good();
            v[field] = value.into();
            assert_eq!(json(v).unwrap_err().field.as_deref(), Some(field), "{field}={value}");
        }
        let mut v = good();
        v["tickets"] = serde_json::json!([]);
        assert_eq!(json(v).unwrap_err().field.as_deref(), Some("tickets"));
        let mut v = good();
        v["tickets"][0]["colour"] = "red".into();
        assert_eq!(json(v).unwrap_err().field.as_deref(), Some("colour"));
        assert!(parse_json(b"{not json", &authorities()).unwrap_err().message.contains("malformed JSON"));
    }

    #[test]
    fn more_than_five_thousand_tickets_is_refused() {
        let tickets: Vec<_> = (0..=MAX_TICKETS)
            .map(|i| serde_json::json!({"ticket_id": format!("t{i}"), "authority": "CITY-PARKING"}))
            .collect();
        let mut v = good();
        v["tickets"] = tickets.into();
        let e = json(v).unwrap_err();
        assert_eq!(e.kind, UploadErrorKind::TooManyTickets);
        assert!(e.message.contains("at most 5000"));
        let csv: String = (0..=MAX_TICKETS).fold("ticket_id,authority\n".into(), |s, i| s + &format!("t{i},STATE-TOLLS\n"));
        assert_eq!(parse_csv(csv.as_bytes(), &header(), &authorities()).unwrap_err().kind, UploadErrorKind::TooManyTickets);
    }

    #[test]
    fn only_too_many_tickets_is_too_many() {
        let e = parse_csv(b"ticket_id,authority\nt1,at most 5000\n", &header(), &authorities()).unwrap_err();
        assert_eq!((e.kind, e.field.as_deref()), (UploadErrorKind::Invalid, Some("authority")));
    }

    fn header() -> Header<'static> {
        Header { client_id: Some("acme"), currency: Some("EUR"), budget: Some("20") }
    }

    #[test]
    fn csv_parses_and_errors_name_the_line() {
        let req = parse_csv(b"ticket_id,authority,reference\nt1,CITY-PARKING,R1\nt2,STATE-TOLLS,\n", &header(), &authorities()).unwrap();
        assert_eq!(req.tickets.len(), 2);
        assert_eq!(req.tickets[1].reference, None);
        let e = parse_csv(b"ticket_id,authority\nt1,CITY-PARKING\nt2,NOPE\n", &header(), &authorities()).unwrap_err();
        assert_eq!((e.row, e.field.as_deref()), (Some(3), Some("authority")));
        let e = parse_csv(b"id,authority\nt1,CITY-PARKING\n", &header(), &authorities()).unwrap_err();
        assert!(e.message.contains("header"));
        assert!(parse_csv(b"  \n", &header(), &authorities()).unwrap_err().message.contains("empty"));
        let e = parse_csv(b"ticket_id,authority\nt1,CITY-PARKING,extra\n", &header(), &authorities()).unwrap_err();
        assert!(e.message.contains("malformed CSV"));
        let e = parse_csv(b"ticket_id,authority\nt1,CITY-PARKING\n", &Header { budget: None, ..header() }, &authorities()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("budget"));
    }

    #[test]
    fn the_digest_ignores_format_but_not_content() {
        let a = json(good()).unwrap();
        let b = parse_csv(b"ticket_id,authority,reference\nt1,CITY-PARKING,FR-1\nt2,STATE-TOLLS,\n",
            &Header { client_id: Some("acme"), currency: Some("EUR"), budget: Some("100.50") }, &authorities()).unwrap();
        assert_eq!(a.digest(), b.digest());
        let mut v = good();
        v["budget"] = "100.51".into();
        assert_ne!(a.digest(), json(v).unwrap().digest());
    }
}
