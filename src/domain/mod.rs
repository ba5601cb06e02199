//! The business, with no I/O: money, identifiers, tickets and their journey,
//! batches and their budget, the audit events, and parsing an upload.

pub mod batch;
pub mod event;
pub mod ids;
pub mod money;
pub mod provider;
pub mod reconciliation;
pub mod resolution;
pub mod ticket;
pub mod upload;

pub use batch::{Batch, Budget, BudgetError};
pub use event::{Event, EventKind, Exchange};
pub use ids::{AuthorityCode, BatchId, ClientId, Reference, TicketId};
pub use money::{Currency, Due, Money, WrongCurrency};
pub use provider::ProviderName;
pub use ticket::{Operation, PaidElsewhere, PayProgress, PayStep, Pending, RetryPolicy, Stage, State, Status, Ticket};
pub use upload::{BatchRequest, UploadError};
