//! Secrets never reach the audit trail, the logs or the traces: everything
//! recorded of a provider exchange passes through a [`Redactor`] first.
//!
//! What is masked, and where:
//! - **Secret names.** A header, JSON field or URL query parameter whose name
//!   is secret has its whole value replaced by `[REDACTED]` (a `true`, `false`
//!   or `null` under such a name says nothing secret and is kept). Names are
//!   compared normalised: lower case, without `-`, `_`, `.` or spaces, query
//!   parameter names percent-decoded first (`+` as a space). A name is secret
//!   if it contains `secret`, `token` (not `tokenized`, `tokenization`),
//!   `password`, `passwd`, `passphrase`, `apikey`, `privatekey`, `accesskey`,
//!   `signingkey`, `credential`, `session`, `cookie` or `signature`; if it ends
//!   in `authorization`; if it is `cvv`, `cvc`, `pin`, `pan`, `otp` and the
//!   like (`SECRET_NAMES`); or if it is listed in `TICKETPAY_REDACT_HEADERS`
//!   or `TICKETPAY_REDACT_FIELDS`. `idempotency_key` is not secret: it is our
//!   own key, and the audit trail is searched by it.
//! - **Known secret values** (the providers' own credentials) become
//!   `[REDACTED]` wherever they appear, in case a provider echoes one back:
//!   anywhere in the text from 8 characters on; a shorter one only where it
//!   stands alone, as a whole value or a whole word (so a 3-character key does
//!   not eat every word that contains it).
//! - **Card numbers** (13 to 19 digits, optionally grouped by single spaces or
//!   dashes, Luhn-valid) keep their last four digits, `**** **** **** 1111`,
//!   but only where card data can be: free text, and payment-method data.
//!   Identifiers are never masked, however Luhn-valid their digits happen to
//!   be: a provider's reference must stay searchable as it was sent.
//!
//! Which of those a value is, its name says (`Kind`). An identifier's name
//! ends in `id`, `ref`, `reference`, `key`, `url`, `uri`, `href`…
//! (`provider_reference`, `ticket_id`, `idempotency_key`), or in `number` or
//! `code` outside payment data (`notice_number`). Payment data is under a name
//! containing `card`, `account`, `iban`, `instrument` or `paymentmethod`;
//! everything under it is masked but its identifiers. Free text is named
//! `message`, `reason`, `error`, `detail`, `statement`, `note` and the like. A name of no
//! known kind takes the kind of the value it is in. So a JSON body, a header
//! value and a non-JSON body are free text unless their name says otherwise,
//! an error text is free text ([`Redactor::text`]), and a URL is ours: its
//! path and query are kept, but for a parameter named as secret (redacted) or
//! as payment data (masked), and known secrets; an error that quotes our URL
//! keeps it so ([`Redactor::text_quoting_url`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use serde_json::Value;

pub const REDACTED: &str = "[REDACTED]";

/// Secret names, compared normalised, beside the patterns in `is_secret_name`.
const SECRET_NAMES: &[&str] = &[
    "auth",
    "xfunctionskey",
    "cardnumber",
    "cvv",
    "cvv2",
    "cvc",
    "cvc2",
    "pin",
    "pincode",
    "pinblock",
    "pan",
    "otp",
];

/// Parts of a name that make it secret, compared normalised.
const SECRET_PARTS: &[&str] = &[
    "secret",
    "token",
    "password",
    "passwd",
    "passphrase",
    "apikey",
    "privatekey",
    "accesskey",
    "signingkey",
    "credential",
    "session",
    "cookie",
    "signature",
];

const IDENTIFIER_ENDS: &[&str] =
    &["id", "ids", "ref", "refs", "reference", "references", "key", "keys", "url", "urls", "uri", "href", "etag", "traceparent", "tracestate"];
const NUMBER_ENDS: &[&str] = &["number", "numbers", "code"];
const PAYMENT_PARTS: &[&str] = &["card", "account", "iban", "instrument", "paymentmethod"];
const FREE_TEXT_ENDS: &[&str] = &[
    "message", "messages", "msg", "reason", "error", "errors", "detail", "details", "description", "statement", "note", "notes",
    "text", "comment", "comments", "memo", "title", "summary",
];

/// Shorter known secrets are replaced only where they stand alone: inside a
/// word they would match ordinary text.
const MIN_KNOWN_SECRET: usize = 8;

/// What a value is, as its name says; it decides what is masked in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Replaced whole.
    Secret,
    /// Ours or the provider's handle on something: only known secrets go.
    Identifier,
    /// Where a card number can be: known secrets go, card numbers are masked.
    FreeText,
    /// Payment-method data: masked like free text, and nothing under it but
    /// an identifier escapes masking.
    Payment,
}

/// What a name alone says, before its place is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    Secret,
    Identifier,
    Payment,
    FreeText,
    /// `…number`, `…code`: an identifier, unless it is a card's.
    Number,
    /// Says nothing: the value is what the enclosing one is.
    Other,
}

impl Kind {
    fn of(self, name: Name) -> Kind {
        match (self, name) {
            (_, Name::Secret) => Kind::Secret,
            (_, Name::Identifier) => Kind::Identifier,
            (_, Name::Payment) | (Kind::Payment, _) => Kind::Payment,
            (_, Name::FreeText) => Kind::FreeText,
            (_, Name::Number) => Kind::Identifier,
            (kind, Name::Other) => kind,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Redactor {
    /// Secret names beyond the patterns, normalised.
    names: HashSet<String>,
    /// Known secret values, longest first so that none is left half replaced.
    secrets: Vec<String>,
    /// What each name met so far says: the same few dozen come in every
    /// exchange, and working one out is a dozen searches.
    known: Arc<RwLock<HashMap<String, Name>>>,
}

/// The most names [`Redactor::known`] keeps; past it, names are worked out each time.
const KNOWN_NAMES: usize = 4096;

impl Default for Redactor {
    fn default() -> Self {
        Redactor::new(&[], &[])
    }
}

impl Redactor {
    /// The built-in rules plus extra secret header names and JSON field names
    /// (compared normalised; either list also applies to the other places).
    pub fn new(extra_headers: &[String], extra_fields: &[String]) -> Redactor {
        let names = SECRET_NAMES.iter().copied().chain(extra_headers.iter().chain(extra_fields).map(String::as_str));
        Redactor { names: names.map(normalise).filter(|n| !n.is_empty()).collect(), secrets: Vec::new(), known: Arc::default() }
    }

    /// Also replaces these values wherever they appear (see the module doc for short ones).
    pub fn with_secrets<'a>(mut self, secrets: impl IntoIterator<Item = &'a String>) -> Redactor {
        self.secrets.extend(secrets.into_iter().filter(|s| !s.trim().is_empty()).cloned());
        self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        self.secrets.dedup();
        self
    }

    pub fn headers<'a>(&self, headers: impl Iterator<Item = (&'a str, &'a str)>) -> BTreeMap<String, String> {
        headers
            .map(|(k, v)| {
                let v = match Kind::FreeText.of(self.name(k)) {
                    Kind::Secret => REDACTED.to_owned(),
                    kind => self.value(kind, v).into_owned(),
                };
                (k.to_ascii_lowercase(), v)
            })
            .collect()
    }

    pub fn body(&self, mut body: Value) -> Value {
        self.scrub(&mut body, Kind::FreeText);
        body
    }

    /// Free text (an error message, a provider's reason): known secrets and card numbers.
    pub fn text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match self.known_secrets(text) {
            Cow::Borrowed(text) => mask_cards(text),
            Cow::Owned(out) => Cow::Owned(mask_cards(&out).into_owned()),
        }
    }

    /// A URL we built: known secrets, and query parameters by their name.
    pub fn url(&self, url: &str) -> String {
        let Some((path, query)) = url.split_once('?') else { return self.known_secrets(url).into_owned() };
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| {
                let Some((name, value)) = pair.split_once('=') else { return pair.to_owned() };
                let decoded = percent_decode(value);
                match Kind::Identifier.of(self.name(&percent_decode(name))) {
                    Kind::Secret => format!("{name}={REDACTED}"),
                    _ if matches!(self.known_secrets(&decoded), Cow::Owned(_)) => format!("{name}={REDACTED}"),
                    kind => match self.value(kind, &decoded) {
                        Cow::Owned(masked) => format!("{name}={}", percent_encode(&masked)),
                        Cow::Borrowed(_) => pair.to_owned(),
                    },
                }
            })
            .collect();
        self.known_secrets(&format!("{path}?{}", pairs.join("&"))).into_owned()
    }

    /// Free text that quotes a URL we built (a connection error): the text
    /// by the free-text rules, each quotation of the URL by the URL rules.
    pub fn text_quoting_url(&self, text: &str, url: &str) -> String {
        if url.is_empty() {
            return self.text(text).into_owned();
        }
        let shown = self.url(url);
        text.split(url).map(|part| self.text(part)).collect::<Vec<_>>().join(&shown)
    }

    fn scrub(&self, value: &mut Value, kind: Kind) {
        match value {
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    match kind.of(self.name(k)) {
                        Kind::Secret if v.is_boolean() || v.is_null() => {}
                        Kind::Secret => *v = Value::String(REDACTED.to_owned()),
                        kind => self.scrub(v, kind),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.scrub(v, kind)),
            Value::String(s) => {
                if let Cow::Owned(redacted) = self.value(kind, s) {
                    *s = redacted;
                }
            }
            _ => {}
        }
    }

    fn value<'a>(&self, kind: Kind, value: &'a str) -> Cow<'a, str> {
        match kind {
            Kind::Secret => Cow::Borrowed(REDACTED),
            Kind::Identifier => self.known_secrets(value),
            Kind::FreeText | Kind::Payment => self.text(value),
        }
    }

    fn name(&self, name: &str) -> Name {
        if let Some(known) = self.known.read().unwrap_or_else(|p| p.into_inner()).get(name) {
            return *known;
        }
        let said = self.work_out(name);
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        if known.len() < KNOWN_NAMES {
            known.insert(name.to_owned(), said);
        }
        said
    }

    fn work_out(&self, name: &str) -> Name {
        let n = normalise(name);
        let ends = |list: &[&str]| list.iter().any(|end| n.ends_with(end));
        if self.names.contains(&n) || is_secret_name(&n) {
            Name::Secret
        } else if ends(IDENTIFIER_ENDS) {
            Name::Identifier
        } else if PAYMENT_PARTS.iter().any(|part| n.contains(part)) {
            Name::Payment
        } else if ends(FREE_TEXT_ENDS) {
            Name::FreeText
        } else if ends(NUMBER_ENDS) {
            Name::Number
        } else {
            Name::Other
        }
    }

    /// Replaces the known secrets: a long one anywhere, a short one where it stands alone.
    fn known_secrets<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for secret in &self.secrets {
            if !out.contains(secret.as_str()) {
                continue;
            }
            out = if secret.len() >= MIN_KNOWN_SECRET {
                Cow::Owned(out.replace(secret.as_str(), REDACTED))
            } else {
                match replace_words(&out, secret) {
                    Some(replaced) => Cow::Owned(replaced),
                    None => out,
                }
            };
        }
        out
    }
}

fn normalise(name: &str) -> String {
    name.chars().filter(|c| !matches!(c, '-' | '_' | '.' | ' ')).flat_map(char::to_lowercase).collect()
}

fn is_secret_name(n: &str) -> bool {
    let part = |part: &&str| {
        // `tokenized`, `tokenization`: whether a card was tokenised, not a token.
        n.match_indices(part).any(|(i, _)| *part != "token" || !["iz", "is"].iter().any(|s| n[i + part.len()..].starts_with(s)))
    };
    SECRET_PARTS.iter().any(part) || n.ends_with("authorization")
}

/// `text` with each occurrence of `word` that stands alone replaced, or `None` if there is none.
fn replace_words(text: &str, word: &str) -> Option<String> {
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for (i, _) in text.match_indices(word) {
        let end = i + word.len();
        if is_word(text[..i].chars().next_back()) || is_word(text[end..].chars().next()) {
            continue;
        }
        out.push_str(&text[copied..i]);
        out.push_str(REDACTED);
        copied = end;
    }
    (copied > 0).then(|| out + &text[copied..])
}

/// A query string component decoded: `%XX` escapes and `+` as a space; a
/// malformed escape is kept as written.
fn percent_decode(s: &str) -> String {
    let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16));
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b'+', ..) => {
                out.push(b' ');
                i += 1;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'*' => (b as char).to_string(),
            b' ' => "+".to_owned(),
            b => format!("%{b:02X}"),
        })
        .collect()
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
    fn card_numbers_in_free_text_keep_their_last_four_digits() {
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
        let r = Redactor::default().with_secrets([&key]);
        assert_eq!(r.text("invalid key sk_live_0123456789 (mysk_live_0123456789x)"), "invalid key [REDACTED] (my[REDACTED]x)");
        let h = r.headers([("X-Echo", "Bearer sk_live_0123456789")].into_iter());
        assert_eq!(h["x-echo"], "Bearer [REDACTED]");
        let body = r.body(serde_json::json!({"detail": "got sk_live_0123456789"}));
        assert_eq!(body["detail"], "got [REDACTED]");
        assert_eq!(
            r.url("https://p.example/x?Token=abc&currency=EUR&card=4111111111111111"),
            "https://p.example/x?Token=[REDACTED]&currency=EUR&card=************1111"
        );
    }

    /// Luhn-valid digit runs that are identifiers, not card numbers.
    const REFERENCE: &str = "gateway-aff52598-00000017";
    const LUHN_NOTICE: &str = "1234567812345670";

    #[test]
    fn identifiers_are_kept_whatever_their_digits() {
        let r = Redactor::default();
        let body = serde_json::json!({
            "id": REFERENCE,
            "reference": LUHN_NOTICE,
            "provider_reference": REFERENCE,
            "providerReference": REFERENCE,
            "notice_number": LUHN_NOTICE,
            "ticket_id": LUHN_NOTICE,
            "transactionid": LUHN_NOTICE,
            "payment_ref": LUHN_NOTICE,
            "idempotency_key": format!("b1:{LUHN_NOTICE}:capture"),
            "ids": [LUHN_NOTICE, REFERENCE],
            "payment_method": { "id": LUHN_NOTICE },
            "self_url": format!("https://p.example/tickets/{LUHN_NOTICE}"),
        });
        assert_eq!(r.body(body.clone()), body);
    }

    #[test]
    fn free_text_and_payment_fields_mask_card_numbers() {
        let r = Redactor::default();
        let body = r.body(serde_json::json!({
            "reason": "card 4111 1111 1111 1111 declined",
            "error": { "message": "bad pan 5555555555554444", "code": LUHN_NOTICE },
            "statement": "capture on card 4111-1111-1111-1111",
            "remarks": "paid with 4242424242424242",
            "payment_method": { "type": "card", "number": "4111111111111111", "last4": "1111" },
            "card": { "number": "4111111111111111" },
            "account_number": "4111111111111111",
            "cardholder": "4111111111111111",
            "reference": { "note": "card 4111111111111111" },
        }));
        assert_eq!(body["reason"], "card **** **** **** 1111 declined");
        assert_eq!(body["error"]["message"], "bad pan ************4444");
        assert_eq!(body["error"]["code"], LUHN_NOTICE, "a code is an identifier");
        assert_eq!(body["statement"], "capture on card ****-****-****-1111");
        assert_eq!(body["remarks"], "paid with ************4242", "a field of no known kind is free text");
        assert_eq!(body["payment_method"]["number"], "************1111");
        assert_eq!(body["payment_method"]["type"], "card");
        assert_eq!(body["payment_method"]["last4"], "1111");
        assert_eq!(body["card"]["number"], "************1111");
        assert_eq!(body["account_number"], "************1111");
        assert_eq!(body["cardholder"], "************1111");
        assert_eq!(body["reference"]["note"], "card ************1111");
        // An answer that is not JSON is kept as a string: free text.
        assert_eq!(r.body(Value::String("declined 4111111111111111".into())), "declined ************1111");
    }

    #[test]
    fn urls_we_build_keep_their_path_and_query() {
        let r = Redactor::default();
        let url = format!("http://127.0.0.1:9/authority/tickets/{LUHN_NOTICE}?currency=EUR&reference={LUHN_NOTICE}");
        assert_eq!(r.url(&url), url);
        let url = format!("http://127.0.0.1:9/gateway/operations/b1:{LUHN_NOTICE}:capture");
        assert_eq!(r.url(&url), url);
    }

    #[test]
    fn header_values_are_identifiers_or_free_text_by_their_name() {
        let r = Redactor::default();
        let key = format!("b1:{LUHN_NOTICE}:capture");
        let h = r.headers(
            [("Idempotency-Key", key.as_str()), ("X-Request-Id", LUHN_NOTICE), ("Warning", "199 - card 4111111111111111")].into_iter(),
        );
        assert_eq!(h["idempotency-key"], key);
        assert_eq!(h["x-request-id"], LUHN_NOTICE);
        assert_eq!(h["warning"], "199 - card ************1111");
    }

    #[test]
    fn secret_names_are_matched_by_pattern_in_fields_headers_and_query() {
        let r = Redactor::default();
        let secret = [
            "client_secret",
            "card_token",
            "api-key",
            "apiKey",
            "X-Api-Key",
            "private_key",
            "passwd",
            "Password",
            "sessionToken",
            "session_id",
            "access_token",
            "refreshToken",
            "Proxy-Authorization",
            "x-authorization",
            "Set-Cookie",
            "credentials",
            "signature",
            "cvv",
            "CVC",
            "cvv2",
            "pin",
            "pan",
            "card_number",
        ];
        let kept = ["idempotency_key", "Idempotency-Key", "key", "authorization_id", "company", "shipping", "panel", "tokenization_method", "currency"];
        for name in secret {
            let body = r.body(serde_json::json!({ name: "v4lue" }));
            assert_eq!(body[name], REDACTED, "field {name}");
            let h = r.headers([(name, "v4lue")].into_iter());
            assert_eq!(h[&name.to_ascii_lowercase()], REDACTED, "header {name}");
            assert_eq!(r.url(&format!("http://p.example/x?{name}=v4lue&a=1")), format!("http://p.example/x?{name}={REDACTED}&a=1"), "query {name}");
        }
        for name in kept {
            let body = r.body(serde_json::json!({ name: "v4lue" }));
            assert_eq!(body[name], "v4lue", "field {name}");
            let h = r.headers([(name, "v4lue")].into_iter());
            assert_eq!(h[&name.to_ascii_lowercase()], "v4lue", "header {name}");
            assert_eq!(r.url(&format!("http://p.example/x?{name}=v4lue")), format!("http://p.example/x?{name}=v4lue"), "query {name}");
        }
        // A flag about a secret is no secret.
        let body = r.body(serde_json::json!({ "tokenized": true, "password": null, "token": false }));
        assert_eq!(body, serde_json::json!({ "tokenized": true, "password": null, "token": false }));
    }

    #[test]
    fn query_parameter_names_are_percent_decoded_before_matching() {
        let r = Redactor::default();
        for name in ["api%5Fkey", "%74oken", "api+key", "Client%2DSecret", "pass%77ord", "%70an"] {
            assert_eq!(
                r.url(&format!("http://p.example/x?{name}=v4lue&currency=EUR")),
                format!("http://p.example/x?{name}={REDACTED}&currency=EUR"),
                "{name}"
            );
        }
    }

    #[test]
    fn short_known_secrets_are_replaced_where_they_stand_alone() {
        let key = "k3y".to_owned();
        let r = Redactor::default().with_secrets([&key, &String::new()]);
        assert_eq!(r.text("key k3y refused"), format!("key {REDACTED} refused"));
        assert_eq!(r.text("k3y"), REDACTED);
        assert_eq!(r.text("Bearer k3y."), format!("Bearer {REDACTED}."));
        assert_eq!(r.text("monk3y and k3ys stay"), "monk3y and k3ys stay", "part of a word is not the key");
        let h = r.headers([("X-Echo", "k3y"), ("X-Other", "Bearer k3y")].into_iter());
        assert_eq!(h["x-echo"], REDACTED);
        assert_eq!(h["x-other"], format!("Bearer {REDACTED}"));
        let body = r.body(serde_json::json!({ "echo": "k3y", "id": "k3y", "note": "monk3y" }));
        assert_eq!(body, serde_json::json!({ "echo": REDACTED, "id": REDACTED, "note": "monk3y" }));
        assert_eq!(r.url("http://p.example/x?echo=k3y&b=monk3y"), format!("http://p.example/x?echo={REDACTED}&b=monk3y"));
        assert_eq!(r.url("http://p.example/x?echo=k%33y"), format!("http://p.example/x?echo={REDACTED}"), "decoded before matching");
    }

    #[test]
    fn an_error_quoting_our_url_masks_only_the_provider_text() {
        let r = Redactor::default();
        let url = format!("http://127.0.0.1:9/authority/tickets/{LUHN_NOTICE}?token=abc");
        let error = format!("error sending request for url ({url}): card 4111111111111111 refused");
        assert_eq!(
            r.text_quoting_url(&error, &url),
            format!("error sending request for url (http://127.0.0.1:9/authority/tickets/{LUHN_NOTICE}?token={REDACTED}): card ************1111 refused")
        );
    }
}
