//! `ticketpay trace`: one ticket's state, amounts and timeline, every provider exchange included.

use anyhow::Result;
use serde_json::Value;

use crate::client::ApiClient;

pub async fn run(api: &ApiClient, batch_id: &str, ticket_id: &str, full: bool) -> Result<()> {
    let ticket = api.get(&format!("/api/batches/{batch_id}/tickets/{ticket_id}")).await?;
    print!("{}", render(&ticket, full));
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn render(t: &Value, full: bool) -> String {
    let mut out = String::new();
    let currency = text(&t["currency"]);
    out.push_str(&format!("ticket     {} / {}   authority {}   reference {}\n", text(&t["batch_id"]), text(&t["ticket_id"]), text(&t["authority"]), text(&t["reference"])));
    out.push_str(&format!("status     {}   notified {}\n", text(&t["status"]), text(&t["notification"])));
    if !t["reason"].is_null() {
        out.push_str(&format!("reason     {}\n", text(&t["reason"])));
    }
    if !t["duplicate_of"].is_null() {
        out.push_str(&format!("paid in    batch {} (this ticket is a duplicate of it)\n", text(&t["duplicate_of"])));
    }
    if t["payment"]["outcome_unknown"] == true {
        out.push_str("payment    outcome unknown: the provider has not said whether it was applied\n");
    }
    out.push_str(&format!("amounts    due {} · reserved {} · paid {} {currency}\n", text(&t["amount_due"]), text(&t["reserved"]), text(&t["paid"])));
    out.push_str(&format!("trace      {} (operation_Id in Application Insights)\n", text(&t["trace_id"])));
    out.push_str("timeline\n");
    for e in t["timeline"].as_array().into_iter().flatten() {
        let at = text(&e["at"]);
        let at = at.get(11..23).unwrap_or(&at).to_owned();
        let stage = text(&e["stage"]);
        let line = match e["type"].as_str().unwrap_or("") {
            "exchange" => {
                let status = e["response"]["status"].as_u64().map_or("no answer".into(), |s| s.to_string());
                let key = e["idempotency_key"].as_str().map(|k| format!(" key {k}")).unwrap_or_default();
                format!(
                    "{} {} {} -> {status} {} ({} ms, attempt {}){key}",
                    text(&e["provider"]),
                    text(&e["request"]["method"]),
                    text(&e["request"]["url"]),
                    text(&e["outcome"]),
                    text(&e["latency_ms"]),
                    text(&e["attempt"]),
                )
            }
            "status_changed" => {
                let reason = e["reason"].as_str().map(|r| format!(" ({r})")).unwrap_or_default();
                format!("{} -> {}{reason}", text(&e["from"]), text(&e["to"]))
            }
            "retry_scheduled" => format!("retry {} at {}: {}", text(&e["attempt"]), text(&e["retry_at"]), text(&e["error"])),
            "budget_reserved" => format!("reserved {}", text(&e["amount"])),
            "budget_released" => format!("released {}", text(&e["amount"])),
            "paid" => format!("paid {}", text(&e["amount"])),
            "notified" => format!("client notified: {}", text(&e["outcome"])),
            "redriven" => format!("redriven to {} by an operator (parked because: {})", text(&e["to_stage"]), text(&e["parked_because"])),
            other => other.to_owned(),
        };
        out.push_str(&format!("  {at}  {stage:<8} {line}\n"));
        if full && e["type"] == "exchange" {
            out.push_str(&format!("      request  {}\n", e["request"]["body"]));
            out.push_str(&format!("      response {}\n", e["response"]["body"]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_duplicate_names_its_payer_and_an_unknown_outcome_says_so() {
        let dup = json!({"status": "duplicate", "duplicate_of": "b-1", "payment": {"outcome_unknown": false}});
        let out = super::render(&dup, false);
        assert!(out.contains("paid in    batch b-1"), "{out}");
        assert!(!out.contains("outcome unknown"), "{out}");
        let unknown = json!({"status": "parked", "reason": "pay: outcome unknown at gateway (capture)", "payment": {"outcome_unknown": true}});
        let out = super::render(&unknown, false);
        assert!(out.contains("payment    outcome unknown"), "{out}");
        assert!(!out.contains("paid in"), "{out}");
    }
}
