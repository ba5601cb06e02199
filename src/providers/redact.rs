//! Secrets never reach the audit trail, the logs or the traces: everything
//! recorded of a provider exchange passes through a [`Redactor`] first.
//!
//! Three rules, applied to header values, URLs, every string in a JSON body
//! and error messages:
//! - header names and JSON field names named as secret (built in, plus
//!   `TICKETPAY_REDACT_HEADERS` / `TICKETPAY_REDACT_FIELDS`): the whole value
//!   becomes `[REDACTED]`, and so does a URL query parameter of such a name;
//! - known secret values (the providers' own credentials) become `[REDACTED]`
//!   wherever they appear, in case a provider echoes one back;
//! - card numbers (13 to 19 digits, optionally grouped by single spaces or
//!   dashes, Luhn-valid) keep their last four digits: `**** **** **** 1111`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};

use serde_json::Value;

pub const REDACTED: &str = "[REDACTED]";

const SECRET_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "x-functions-key"];
const SECRET_FIELDS: &[&str] = &[
    "api_key",
    "apikey",
    "secret",
    "password",
    "token",
    "access_token",
    "refresh_token",
    "card_number",
    "cvv",
    "cvc",
    "pan",
];

/// Shorter known secrets are not searched for in free text: they would match
/// ordinary words. They are still redacted by header and field name.
const MIN_KNOWN_SECRET: usize = 8;

#[derive(Debug, Clone)]
pub struct Redactor {
    headers: HashSet<String>,
    fields: HashSet<String>,
    secrets: Vec<String>,
}

impl Default for Redactor {
    fn default() -> Self {
        Redactor::new(&[], &[])
    }
}

impl Redactor {
    /// The built-in rules plus extra header names and JSON field names (case-insensitive).
    pub fn new(extra_headers: &[String], extra_fields: &[String]) -> Redactor {
        let lower = |s: &str| s.trim().to_ascii_lowercase();
        Redactor {
            headers: SECRET_HEADERS.iter().map(|h| lower(h)).chain(extra_headers.iter().map(|h| lower(h))).collect(),
            fields: SECRET_FIELDS.iter().map(|f| lower(f)).chain(extra_fields.iter().map(|f| lower(f))).collect(),
            secrets: Vec::new(),
        }
    }

    /// Also replaces these values wherever they appear.
    pub fn with_secrets<'a>(mut self, secrets: impl IntoIterator<Item = &'a String>) -> Redactor {
        self.secrets.extend(secrets.into_iter().filter(|s| s.len() >= MIN_KNOWN_SECRET).cloned());
        self
    }

    pub fn headers<'a>(&self, headers: impl Iterator<Item = (&'a str, &'a str)>) -> BTreeMap<String, String> {
        headers
            .map(|(k, v)| {
                let k = k.to_ascii_lowercase();
                let v = if self.headers.contains(&k) { REDACTED.to_owned() } else { self.text(v).into_owned() };
                (k, v)
            })
            .collect()
    }

    pub fn body(&self, mut body: Value) -> Value {
        self.scrub(&mut body);
        body
    }

    /// Free text (an error message, a header value): known secrets and card numbers.
    pub fn text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for secret in self.secrets.iter().filter(|s| text.contains(s.as_str())) {
            out = Cow::Owned(out.replace(secret.as_str(), REDACTED));
        }
        match mask_cards(&out) {
            Cow::Borrowed(_) => out,
            Cow::Owned(masked) => Cow::Owned(masked),
        }
    }

    /// A URL: query parameters named as secret fields, then the free-text rules.
    pub fn url(&self, url: &str) -> String {
        let Some((path, query)) = url.split_once('?') else { return self.text(url).into_owned() };
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if self.fields.contains(&name.to_ascii_lowercase()) => format!("{name}={REDACTED}"),
                _ => pair.to_owned(),
            })
            .collect();
        self.text(&format!("{path}?{}", pairs.join("&"))).into_owned()
    }

    fn scrub(&self, value: &mut Value) {
        match value {
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    if self.fields.contains(&k.to_ascii_lowercase()) {
                        *v = Value::String(REDACTED.to_owned());
                    } else {
                        self.scrub(v);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.scrub(v)),
            Value::String(s) => {
                if let Cow::Owned(redacted) = self.text(s) {
                    *s = redacted;
                }
            }
            _ => {}
        }
    }
}

/// Masks every card number in `text` but its last four digits, keeping the grouping.
fn mask_cards(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let end = digit_run_end(bytes, i);
        // A run is ASCII digits and separators, so its ends are character boundaries.
        let run = &text[i..end];
        if is_card_number(run) {
            let out = out.get_or_insert_with(|| String::with_capacity(text.len()));
            out.push_str(&text[copied..i]);
            out.push_str(&mask(run));
            copied = end;
        }
        i = end;
    }
    match out {
        None => Cow::Borrowed(text),
        Some(mut out) => {
            out.push_str(&text[copied..]);
            Cow::Owned(out)
        }
    }
}

/// The end of the run of digits starting at `start`, where single spaces or
/// dashes between digits belong to the run.
fn digit_run_end(bytes: &[u8], start: usize) -> usize {
    let mut end = start;
    let mut j = start;
    while j < bytes.len() {
        if bytes[j].is_ascii_digit() {
            j += 1;
            end = j;
        } else if matches!(bytes[j], b' ' | b'-') && bytes.get(j + 1).is_some_and(u8::is_ascii_digit) {
            j += 1;
        } else {
            break;
        }
    }
    end
}

fn is_card_number(run: &str) -> bool {
    let digits: Vec<u32> = run.chars().filter_map(|c| c.to_digit(10)).collect();
    (13..=19).contains(&digits.len()) && luhn(&digits)
}

fn luhn(digits: &[u32]) -> bool {
    let doubled = |d: u32| if d > 4 { d * 2 - 9 } else { d * 2 };
    let sum: u32 = digits.iter().rev().enumerate().map(|(i, &d)| if i % 2 == 1 { doubled(d) } else { d }).sum();
    sum.is_multiple_of(10)
}

fn mask(run: &str) -> String {
    let digits = run.chars().filter(char::is_ascii_digit).count();
    let mut seen = 0;
    run.chars()
        .map(|c| {
            if !c.is_ascii_digit() {
                return c;
            }
            seen += 1;
            if seen > digits - 4 { c } else { '*' }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_headers_and_nested_fields_are_replaced() {
        let r = Redactor::new(&["X-Partner-Secret".into()], &["iban".into()]);
        let h = r.headers([("Authorization", "Bearer abc"), ("X-Partner-Secret", "s3"), ("Idempotency-Key", "k")].into_iter());
        assert_eq!(h["authorization"], REDACTED);
        assert_eq!(h["x-partner-secret"], REDACTED);
        assert_eq!(h["idempotency-key"], "k");
        let body = r.body(serde_json::json!({"payer": {"IBAN": "FR76", "name": "A"}, "cards": [{"card_number": "4111"}]}));
        assert_eq!(body["payer"]["IBAN"], REDACTED);
        assert_eq!(body["payer"]["name"], "A");
        assert_eq!(body["cards"][0]["card_number"], REDACTED);
    }

    #[test]
    fn card_numbers_keep_their_last_four_digits_wherever_they_are() {
        let r = Redactor::default();
        assert_eq!(r.text("paid by 4111 1111 1111 1111."), "paid by **** **** **** 1111.");
        assert_eq!(r.text("card 5555-5555-5555-4444 declined"), "card ****-****-****-4444 declined");
        assert_eq!(r.text("pan=378282246310005"), "pan=***********0005");
        assert_eq!(r.text("6011111111111117 and 4012888888881881"), "************1117 and ************1881");
        let body = r.body(serde_json::json!({"note": ["see 4242424242424242"], "amount": 4242424242424242u64}));
        assert_eq!(body["note"][0], "see ************4242");
        assert_eq!(body["amount"], 4242424242424242u64, "numbers are amounts, not text");
    }

    #[test]
    fn digit_runs_that_are_not_card_numbers_stay() {
        let r = Redactor::default();
        for text in [
            "4111 1111 1111 1112",        // fails the Luhn check
            "411111111111",               // too short
            "41111111111111111111111",    // too long
            "2024-05-01 12:00",
            "T000123 paid 1500 EUR",
            "4111  1111 1111 1111",       // a double space ends the run
        ] {
            assert!(matches!(r.text(text), Cow::Borrowed(_)), "{text}");
        }
    }

    #[test]
    fn known_secrets_are_replaced_anywhere_and_secret_query_parameters_by_name() {
        let key = "sk_live_0123456789".to_owned();
        let r = Redactor::default().with_secrets([&key, &"short".to_owned()]);
        assert_eq!(r.text("invalid key sk_live_0123456789 (short)"), "invalid key [REDACTED] (short)");
        let h = r.headers([("X-Echo", "Bearer sk_live_0123456789")].into_iter());
        assert_eq!(h["x-echo"], "Bearer [REDACTED]");
        let body = r.body(serde_json::json!({"detail": "got sk_live_0123456789"}));
        assert_eq!(body["detail"], "got [REDACTED]");
        assert_eq!(
            r.url("https://p.example/x?Token=abc&currency=EUR&card=4111111111111111"),
            "https://p.example/x?Token=[REDACTED]&currency=EUR&card=************1111"
        );
    }
}
