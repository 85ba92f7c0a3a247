//! The webhook receiver: Operator's deliveries come in here, are verified
//! ([`signature`]), parsed ([`crate::operator::envelope`]) and appended to the store
//! ([`ingest`]) before they are acknowledged.

/// Moved to [`crate::operator::envelope`]; re-exported here so the old paths keep working.
pub use crate::operator::envelope;
pub mod ingest;
pub mod signature;
