//! The console's attention page in headless Chromium on the real stack: a
//! ticket parked at lookup is listed with the actions open to it, an operator
//! gives it up from the page, and the batch page links to both the attention
//! page and the results.

mod common;
#[allow(dead_code)]
mod webdriver;

use std::time::Duration;

use common::*;
use serde_json::json;
use webdriver::Browser;

const SOON: Duration = Duration::from_secs(15);

#[test]
fn an_operator_settles_a_parked_ticket_from_the_attention_page() {
    let browser = Browser::start();
    let dir = tempfile::tempdir().unwrap();
    let scenario = outcomes_scenario(dir.path(), "nothing_due = 0.0\nunknown_ticket = 0.0", "");
    let env = [("TICKETPAY_MAX_ATTEMPTS", "2"), ("TICKETPAY_RETRY_BASE_MS", "20"), ("TICKETPAY_RETRY_CAP_MS", "50")];
    let s = Stack::start(StackOptions { scenario: &scenario, providers_url: None, data: &dir.path().join("data"), env: &env, extra_args: &[] });
    outage(&s.providers_url, json!({"provider": "authority", "kind": "down", "seconds": 600}));
    let batch = s.submit(1, "100.00");
    assert_eq!(s.wait_complete(&batch, Duration::from_secs(60))["counts"]["parked"], 1);

    browser.goto(&format!("{}/api/console/batches/{batch}", s.url));
    browser.wait_text("#attention-link", |t| t == "needs attention", SOON);
    assert_eq!(browser.text("#results-link"), "results (CSV)");
    browser.wait_text("#last-run", |t| t.contains("never reconciled"), SOON);
    browser.click("#attention-link");
    let row = "#attention tr[data-ticket='T000001']";
    browser.wait_text(&format!("{row} .concerns"), |t| t == "parked", SOON);
    assert_eq!(browser.count(&format!("{row} option")), 2, "redrive and give up");
    browser.execute(&format!("document.querySelector(\"{row} select\").value = 'give_up'; return true"));
    browser.type_into(&format!("{row} input[name=note]"), "the authority cancelled it");
    browser.click(&format!("{row} button"));
    browser.wait_text("main p.muted:last-child", |t| t == "Nothing needs a person.", SOON);

    let t = s.get(&format!("/api/batches/{batch}/tickets/T000001"));
    assert_eq!(t["status"], "failed");
    assert_eq!(t["resolution"]["note"], "the authority cancelled it");
}
