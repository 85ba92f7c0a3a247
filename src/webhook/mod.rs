//! The webhook receiver: Operator's deliveries come in here, are verified
//! ([`signature`]), parsed ([`envelope`]) and appended to the store
//! ([`ingest`]) before they are acknowledged.

pub mod envelope;
pub mod ingest;
pub mod signature;
