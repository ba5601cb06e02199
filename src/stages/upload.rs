//! Upload: every ticket of a stored batch gets its first message, and the
//! batch is marked queued. The API does it right after storing the upload;
//! the sweep does it again for an upload cut short in between (a crash, the
//! bus down), so no stored upload waits for its client to send it again.

use super::{Pipeline, StageError, message_for};
use crate::bus::OutgoingMessage;
use crate::domain::{Batch, Stage, Status, Ticket};
use crate::telemetry;

/// Tickets read and sent per page.
const PAGE: usize = 1_000;

impl Pipeline {
    /// Sends the first message of every ticket still waiting for it, then marks the
    /// batch queued. Safe to repeat: the MessageIds are deterministic.
    pub async fn enqueue_upload(&self, batch: &Batch) -> Result<(), StageError> {
        let mut cursor: Option<String> = None;
        loop {
            let page = self.store.tickets(&batch.batch_id, Some(Status::Lookup), PAGE, cursor.as_deref()).await?;
            let messages: Vec<_> = page.tickets.iter().filter(|t| t.attempt == 0).map(first_message).collect();
            self.bus.send_batch(&Stage::Lookup.queue(), &messages).await?;
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        self.store.mark_enqueued(&batch.batch_id).await?;
        Ok(())
    }
}

/// A ticket's first message, which starts the ticket's own trace, linked with the upload's.
fn first_message(ticket: &Ticket) -> OutgoingMessage {
    let root = tracing::info_span!(
        parent: None,
        "ticket accepted",
        otel.kind = "producer",
        batch_id = %ticket.batch_id,
        ticket_id = %ticket.ticket_id,
        client_id = %ticket.client_id,
        stage = "upload",
        attempt = 0,
        outcome = "accepted",
        "messaging.destination.name" = %Stage::Lookup.queue(),
    );
    let upload = tracing::Span::current();
    telemetry::link(&root, &upload);
    // Both ways; the upload keeps as many links as the SDK allows (128), the tickets' links always stand.
    telemetry::link(&upload, &root);
    let mut message = message_for(ticket, Stage::Lookup, 0, None);
    message.properties.extend(telemetry::context_properties(&root));
    message
}
