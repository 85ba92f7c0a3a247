//! Operator's side of the contract, at the bottom of the crate: the event
//! envelope and the event kinds Switchboard understands ([`envelope`]).
//! It depends on nothing but [`crate::domain`], so the store, the workflows
//! and the webhook handler all build on it without depending on each other.

pub mod envelope;

pub use envelope::{Envelope, EnvelopeError, EventKind};
