//! Destinations (issue 14): the state of every protected destination, and
//! a reset that closes a breaker.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};

use super::auth::AdminAuth;
use super::error::{ApiError, ErrorBody};
use crate::store::EventStore;
use crate::workflow::registry::Registry;

#[derive(Tags)]
enum DestinationTags {
    /// The systems workflows call, as `destinations.yaml` protects them: rate limits,
    /// concurrency caps, Retry-After pauses and circuit breakers.
    Destinations,
}

/// One recent failed request.
#[derive(Object, Debug)]
pub struct DestinationError {
    pub at: DateTime<Utc>,
    /// Why it failed (secrets masked).
    pub message: String,
}

/// One destination.
#[derive(Object, Debug)]
pub struct DestinationView {
    /// Its name in `destinations.yaml`; for the `default:` entry, the origin (`https://host:port`).
    pub name: String,
    /// The URL prefix it covers.
    pub url: String,
    /// The circuit breaker: `closed`, `open` or `half_open`.
    pub state: String,
    /// Open: when the next probe may go. Half open: when the probe in flight is given up on.
    #[oai(skip_serializing_if_is_none)]
    pub until: Option<DateTime<Utc>>,
    /// Paused by a `Retry-After` (429 or 503) until then.
    #[oai(skip_serializing_if_is_none)]
    pub paused_until: Option<DateTime<Utc>>,
    /// Requests in flight now (from this instance).
    pub in_flight: u32,
    /// Runs held now (waiting for this destination, as seen by this instance).
    pub held_runs: u64,
    /// The last failed requests, newest first (at most 5).
    pub last_errors: Vec<DestinationError>,
    /// Share of the requests of the last 5 minutes that did not fail (connect,
    /// timeout, 5xx, 429 are failures); absent when there were none.
    #[oai(skip_serializing_if_is_none)]
    pub success_rate_5m: Option<f64>,
    /// Requests answered in the last 5 minutes.
    pub requests_5m: u64,
}

pub struct DestinationsApi;

#[OpenApi(prefix_path = "/api/v1")]
impl DestinationsApi {
    /// Every destination of `destinations.yaml` (and every origin its `default:` has
    /// seen), with its breaker state, requests in flight, held runs and recent health.
    #[oai(
        path = "/destinations",
        method = "get",
        tag = "DestinationTags::Destinations"
    )]
    async fn list_destinations(
        &self,
        _auth: AdminAuth,
        registry: Data<&Arc<Registry>>,
    ) -> Result<Json<Vec<DestinationView>>, ApiError> {
        registry.gate.refresh().await;
        Ok(Json(
            registry
                .gate
                .snapshot()
                .into_iter()
                .map(|s| DestinationView {
                    name: s.name,
                    url: s.url,
                    state: s.state.as_str().to_owned(),
                    until: s.until,
                    paused_until: s.paused_until,
                    in_flight: s.in_flight,
                    held_runs: s.held_runs as u64,
                    last_errors: s
                        .last_errors
                        .into_iter()
                        .map(|(at, message)| DestinationError { at, message })
                        .collect(),
                    success_rate_5m: s.success_rate,
                    requests_5m: s.requests_5m as u64,
                })
                .collect(),
        ))
    }

    /// Closes the destination's circuit breaker and ends a Retry-After pause:
    /// held runs go on at once (for every instance on PostgreSQL).
    #[oai(
        path = "/destinations/:name/reset",
        method = "post",
        tag = "DestinationTags::Destinations"
    )]
    async fn reset_destination(
        &self,
        _auth: AdminAuth,
        registry: Data<&Arc<Registry>>,
        store: Data<&Arc<dyn EventStore>>,
        wake: Data<&Arc<tokio::sync::Notify>>,
        name: Path<String>,
    ) -> Result<Json<DestinationView>, ApiError> {
        let reset = registry.gate.reset(&name).await;
        if reset {
            // Runs held by a breaker or a pause go on now (those of other
            // destinations still held are simply held again).
            store
                .wake_held(&["circuit_open", "paused_until"], Utc::now())
                .await?;
            wake.notify_waiters();
        }
        if !reset {
            let known: Vec<String> = registry
                .gate
                .snapshot()
                .into_iter()
                .map(|s| format!("`{}`", s.name))
                .collect();
            return Err(ApiError::NotFound(ErrorBody::new(
                "not_found",
                if known.is_empty() {
                    format!(
                        "no destination named `{}`: no destinations are configured (add destinations.yaml to the workflows directory)",
                        name.0
                    )
                } else {
                    format!(
                        "no destination named `{}`; the destinations are {}",
                        name.0,
                        known.join(", ")
                    )
                },
            )));
        }
        let Json(all) = self.list_destinations(_auth, registry).await?;
        all.into_iter()
            .find(|d| d.name == name.0)
            .map(Json)
            .ok_or_else(|| ApiError::not_found("destination", &name))
    }
}
