//! Notify: tell the client how the ticket ended. A failed notification never
//! undoes a payment. The batch completes when its last ticket is told
//! (recorded by the pipeline, whichever way the notification ended).

use chrono::Utc;

use super::{Pipeline, Run, StageError};
use crate::domain::ticket::Operation;
use crate::domain::{EventKind, Stage, Ticket};
use crate::providers::client::CallError;
use crate::providers::wire::{OperationRequest, WireMoney};
use crate::store::Versioned;

pub(super) async fn run(p: &Pipeline, current: Versioned<Ticket>) -> Result<Versioned<Ticket>, StageError> {
    let request = request(&current.value);
    let mut run = Run::new(current);
    let result = p.send_once(&mut run, Stage::Notify, Operation::Notify, &request).await?;
    let Run { stored, mut ticket, exchanges, .. } = run;
    let outcome = match result {
        Ok(()) => "sent".to_owned(),
        Err(CallError::Permanent { error, .. }) => format!("refused: {error}"),
        Err(e) => return p.retry_later(&stored, ticket, e.to_string(), e.retry_after(), exchanges).await,
    };
    ticket.notice.clear_claim();
    ticket.notified = true;
    ticket.notification = Some(outcome.clone());
    ticket.retry_at = None;
    ticket.updated_at = Utc::now();
    let told = p.event(&ticket, Stage::Notify, EventKind::Notified { outcome });
    p.commit(&stored, ticket, None, exchanges, vec![told]).await
}

fn request(ticket: &Ticket) -> OperationRequest {
    let paid = ticket.paid();
    let amount = if paid.minor > 0 { paid } else { ticket.amount_due().unwrap_or(ticket.money(0)) };
    let mut message = format!("ticket {} is {}", ticket.ticket_id, ticket.status());
    if paid.minor > 0 {
        message.push_str(&format!(": paid {paid}"));
    }
    if let Some(reason) = ticket.reason() {
        message.push_str(&format!(" ({reason})"));
    }
    OperationRequest {
        batch_id: ticket.batch_id.to_string(),
        ticket_id: ticket.ticket_id.to_string(),
        client_id: ticket.client_id.to_string(),
        authority: ticket.authority.to_string(),
        amount: WireMoney::from(amount),
        message: Some(message),
    }
}
