//! Reconciliation: asks each payment provider, by idempotency key and through
//! the same limiter as the payments, about every operation the batch recorded
//! as applied, declined or unknown, and records what agreed and what did not.

use serde_json::{Value, json};

use crate::domain::reconciliation::ReconciliationRun;

/// A run as the batch shows it: who, when, and the counts.
pub(super) fn summary(run: &ReconciliationRun) -> Value {
    json!({
        "run_id": run.run_id,
        "at": run.at,
        "by": run.by,
        "provider": run.provider,
        "checked": run.checked,
        "disagreements": run.disagreements.len(),
        "agrees": run.agrees(),
        "providers": run.providers,
    })
}
