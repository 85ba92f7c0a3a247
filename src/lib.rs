//! Switchboard: the self-hosted backend for Operator's agent webhooks.
//!
//! Data flows one way: [`webhook`] verifies a delivery and hands it to the
//! [`store`] (append-only, SQLite or PostgreSQL); [`workflow`] describes what
//! should happen next; [`api`] lets people read it all back. [`cli`] and
//! [`config`] turn the command line into [`startup`]'s running server.

pub mod api;
pub mod cli;
pub mod config;
pub mod destinations;
pub mod domain;
pub mod engine;
pub mod operator;
pub mod prometheus;
pub mod sink;
pub mod startup;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod webhook;
pub mod workflow;
