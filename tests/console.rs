//! The console as a person uses it, in headless Chromium against the real
//! stack: the batches list, a batch watched until it completes, and one
//! ticket's provider exchanges. Screenshots land in `target/test-artefacts/`.

mod common;
mod webdriver;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use webdriver::Browser;

/// More than one page of the ticket list (50 a page).
const TICKETS: u64 = 60;
/// A reference is the client's own text: the page must show it, not run it.
const MARKUP: &str = r#"<img src=x onerror="document.title='run'"><b>bold</b>"#;

fn artefact(name: &str) -> PathBuf {
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).parent().expect("the target folder").to_owned();
    target.join("test-artefacts").join(name)
}

fn upload(stack: &Stack) -> String {
    let mut body = batch_json("acme", TICKETS as usize, "5000.00");
    body["tickets"][0]["reference"] = json!(MARKUP);
    let r = stack.upload_json(&body, None);
    assert_eq!(r.status().as_u16(), 202, "upload accepted");
    r.json::<Value>().unwrap()["batch_id"].as_str().unwrap().to_owned()
}

const SOON: Duration = Duration::from_secs(10);
const ROWS: &str = "#tickets tr[data-ticket]";

#[test]
fn the_console_follows_a_batch_to_completion_and_shows_each_provider_exchange() {
    let browser = Browser::start();
    let data = tempfile::tempdir().unwrap();
    let stack = Stack::start(StackOptions { scenario: "zero-latency", providers_url: None, data: data.path(), env: &[], extra_args: &[] });
    let batch = upload(&stack);

    let link = keys_from_a_link_or_the_key_field(&browser, &stack, &batch);
    browser.click(&link);
    let status = the_batch_completes_on_its_page(&browser, &stack, &batch);
    its_tickets_page_and_filter(&browser, &status);
    let ticket = browser.text(&format!("{ROWS} a"));
    browser.click(&format!("{ROWS} a"));
    a_ticket_shows_each_provider_exchange(&browser, &stack, &batch, &ticket);
}

/// Opens the batches list with a `?code=` link (as Azure Functions gives), then
/// forgets that key and types another; returns the batch's link on the list.
fn keys_from_a_link_or_the_key_field(browser: &Browser, stack: &Stack, batch: &str) -> String {
    browser.goto(&format!("{}/api/console?code=console-key", stack.url));
    let link = format!("#batches a[href='/api/console/batches/{batch}']");
    browser.wait_text(&link, |t| t == batch, Duration::from_secs(30));
    assert!(!browser.url().contains("code="), "the key leaves the address bar: {}", browser.url());
    assert_eq!(browser.execute("return sessionStorage.getItem('ticketpay.key')"), "console-key");
    assert!(!browser.displayed("#key-form"), "the key field shows only when the API asks for a key");
    browser.screenshot(&artefact("console-batches.png"));

    // Without a key the page works as well (the API is open here).
    browser.click("#key-state button");
    browser.wait_text("#key-state", |t| t == "enter key", SOON);
    browser.wait_text(&link, |t| t == batch, SOON);
    browser.click("#key-state button");
    assert!(browser.displayed("#key-form"));
    browser.type_into("#key-input", "typed-key");
    browser.click("#key-form button");
    browser.wait_text("#key-state", |t| t.starts_with("key set"), SOON);
    assert!(!browser.displayed("#key-form"));
    assert_eq!(browser.execute("return sessionStorage.getItem('ticketpay.key')"), "typed-key");
    link
}

/// Waits for the page to say completed; its counts and money are the API's.
fn the_batch_completes_on_its_page(browser: &Browser, stack: &Stack, batch: &str) -> Value {
    browser.wait_text("#batch-status", |t| t == "completed", Duration::from_secs(120));
    let status = stack.status(batch);
    let mut shown = 0;
    for state in END_STATES {
        let count: u64 = browser.text(&format!("#count-{state}")).parse().unwrap();
        assert_eq!(count, status["counts"][state].as_u64().unwrap_or(0), "{state}: {status}");
        shown += count;
    }
    assert_eq!(shown, TICKETS);
    for money in ["budget", "reserved", "paid", "remaining"] {
        assert_eq!(browser.text(&format!("#money-{money}")), status[money].as_str().unwrap(), "{money}");
    }
    browser.wait_text("#eta", |t| t.ends_with(" s"), SOON);
    the_providers_capacity_is_shown(browser, stack);
    status
}

/// Each provider's row: this instance's calls, and the deployment's slices as the leases say.
fn the_providers_capacity_is_shown(browser: &Browser, stack: &Stack) {
    let capacity: Value = stack.http.get(format!("{}/api/capacity", stack.url)).send().unwrap().json().unwrap();
    let providers = capacity["providers"].as_array().unwrap();
    assert!(!providers.is_empty(), "{capacity}");
    browser.wait_count("#capacity-table tr[data-provider]", providers.len(), SOON);
    for p in providers {
        let name = p["provider"].as_str().unwrap();
        let row = format!("#capacity-table tr[data-provider='{name}'] td");
        assert_eq!(browser.text(&row), name);
        // zero-latency: no provider has limits, so none has slices.
        assert_eq!(p["slices"], 0, "{p}");
        browser.wait_text(&format!("{row}:nth-child(3)"), |t| t == "no limits", SOON);
    }
}

/// The first page holds 50 tickets, markup in a reference shows as text, the
/// pager moves by the API's cursor and the filter keeps one status; ends on the paid.
fn its_tickets_page_and_filter(browser: &Browser, status: &Value) {
    browser.wait_count(ROWS, 50, SOON);
    assert_eq!(browser.text("#tickets tr[data-ticket='T000001'] td.reference"), MARKUP);
    assert_eq!(browser.count("main img, main b"), 0, "markup in the data stays text");
    browser.screenshot(&artefact("console-batch.png"));
    browser.click("#tickets-next");
    browser.wait_count(ROWS, TICKETS as usize - 50, SOON);
    assert_eq!(browser.text(&format!("{ROWS} a")), "T000051");
    browser.click("#tickets-previous");
    browser.wait_count(ROWS, 50, SOON);

    let count = |state: &str| status["counts"][state].as_u64().unwrap_or(0) as usize;
    let rare = END_STATES.into_iter().find(|s| *s != "paid" && count(s) > 0).expect("some of the tickets not paid");
    for state in [rare, "paid"] {
        browser.click(&format!("#status-filter option[value='{state}']"));
        browser.wait_count(ROWS, count(state).min(50), SOON);
        assert_eq!(browser.count(&format!("{ROWS} .s-{state}")), count(state).min(50), "{state}");
    }
}

/// The ticket's page shows its state, trace id and each exchange's request and response.
fn a_ticket_shows_each_provider_exchange(browser: &Browser, stack: &Stack, batch: &str, ticket: &str) {
    browser.wait_text("#ticket-status", |t| t == "paid", Duration::from_secs(30));
    let view = stack.get(&format!("/api/batches/{batch}/tickets/{ticket}"));
    let exchanges: Vec<&Value> = view["timeline"].as_array().unwrap().iter().filter(|e| e["type"] == "exchange").collect();
    assert!(exchanges.len() >= 6, "lookup, validation and payment exchanges: {view}");
    browser.wait_count("#timeline .exchange", exchanges.len(), SOON);
    let first = browser.text("#timeline .exchange");
    let request = &exchanges[0]["request"];
    assert!(first.contains(&format!("{} {}", request["method"].as_str().unwrap(), request["url"].as_str().unwrap())), "{first}");
    assert!(first.contains(&exchanges[0]["response"]["status"].to_string()), "{first}");
    assert_eq!(browser.text("#trace-id"), view["trace_id"].as_str().unwrap());
    browser.screenshot(&artefact("console-ticket.png"));
}

/// With keys set, the console asks for one, says when a key is refused, and
/// shows the batches once a good key is entered.
#[test]
fn with_keys_the_console_asks_for_one_and_says_when_it_is_refused() {
    const KEY: &str = "console-operator-key-61c2";
    let browser = Browser::start();
    let data = tempfile::tempdir().unwrap();
    let keys = json!([{ "name": "operations", "role": "operator", "sha256": ticketpay::api::access::key_digest(KEY) }]).to_string();
    let env = [("TICKETPAY_API_KEYS", keys.as_str())];
    let stack = Stack::start(StackOptions { scenario: "zero-latency", providers_url: None, data: data.path(), env: &env, extra_args: &[] });
    let accepted: Value = stack
        .http
        .post(format!("{}/api/batches", stack.url))
        .header("x-functions-key", KEY)
        .json(&batch_json("acme", 3, "100.00"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let batch = accepted["batch_id"].as_str().expect("accepted with the key").to_owned();

    browser.goto(&format!("{}/api/console", stack.url));
    browser.wait_text("#key-message", |t| t.contains("The API needs a key") && t.contains("401"), SOON);
    assert!(browser.displayed("#key-form"));
    browser.type_into("#key-input", "not-the-key");
    browser.click("#key-form button");
    browser.wait_text("#key-message", |t| t.contains("The API refused this key"), SOON);

    browser.type_into("#key-input", KEY);
    browser.click("#key-form button");
    let link = format!("#batches a[href='/api/console/batches/{batch}']");
    browser.wait_text(&link, |t| t == batch, SOON);
    assert!(!browser.displayed("#key-form"));
}
