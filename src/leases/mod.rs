//! Leases: which instance may spend which share of a provider's capacity,
//! decided by a service (Azure Storage blob leases, or the embedded store for
//! every process sharing a data folder), never by the clocks of the instances.
//!
//! A lease names a resource (`{provider}/{slice}`), is held for a term, and
//! must be renewed before the term ends; an instance that crashed loses its
//! leases when their terms run out. Beside the leases the seam keeps the two
//! other facts every instance must share: who is running and wants capacity
//! (so shares are fair), and until when a provider asked everyone to wait.

pub mod blob;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

/// The shortest and longest lease term, as Azure Storage allows them.
pub const MIN_TERM: Duration = Duration::from_secs(15);
pub const MAX_TERM: Duration = Duration::from_secs(60);

/// Proof of holding a lease, given by the service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseId(pub String);

/// An instance that announced itself within the last term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub instance: String,
    /// How many of the group's slices it has work for (0: none).
    pub wants: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The service could not be reached or answered an error: hold on to
    /// nothing you cannot renew, and ask again.
    #[error("lease service unavailable: {0}")]
    Unavailable(String),
    #[error("lease term {0:?} is outside 15-60 s")]
    Term(Duration),
}

pub type Result<T, E = LeaseError> = std::result::Result<T, E>;

pub(crate) fn check_term(term: Duration) -> Result<()> {
    if term < MIN_TERM || term > MAX_TERM {
        return Err(LeaseError::Term(term));
    }
    Ok(())
}

#[async_trait]
pub trait Leases: Send + Sync + 'static {
    /// Takes `resource` for `term` if no one holds it (or its last lease ran
    /// out); `None` while someone else holds it.
    async fn acquire(&self, resource: &str, instance: &str, term: Duration) -> Result<Option<LeaseId>>;
    /// Starts a new term of a lease still held; `false` when it was lost
    /// (ran out and was taken, or released).
    async fn renew(&self, resource: &str, lease: &LeaseId, term: Duration) -> Result<bool>;
    /// Gives a lease back at once; a lease no longer held is not an error.
    async fn release(&self, resource: &str, lease: &LeaseId) -> Result<()>;
    /// The resources under `prefix` held now, with who holds them.
    async fn holders(&self, prefix: &str) -> Result<Vec<(String, String)>>;
    /// Says `instance` is running (and how many slices of `group` it has work
    /// for) for the next `term`; returns every member of `group` seen within its term.
    async fn announce(&self, group: &str, instance: &str, wants: u32, term: Duration) -> Result<Vec<Member>>;
    /// Leaves `group` at once (an instance that stops).
    async fn leave(&self, group: &str, instance: &str) -> Result<()>;
    /// Nobody calls `resource` for the next `for_`, counted from the service's
    /// now (a pause that ends later wins).
    async fn pause(&self, resource: &str, for_: Duration) -> Result<()>;
    /// Until when `resource` is paused, if it is now.
    async fn paused_until(&self, resource: &str) -> Result<Option<DateTime<Utc>>>;
}
