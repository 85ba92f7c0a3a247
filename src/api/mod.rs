//! The admin API (everything under `/api/v1`, behind the admin token) and
//! the unauthenticated health probes, described with poem-openapi so the
//! spec, the `/docs` UI and `openapi/openapi.json` come from this code.

pub mod auth;
pub mod conversations;
pub mod destinations;
pub mod error;
pub mod events;
pub mod health;
pub mod params;
pub mod runs;

use poem_openapi::OpenApiService;

pub use auth::AdminToken;

/// Every operation of the API, in spec order.
pub type Apis = (
    health::HealthApi,
    events::EventsApi,
    conversations::ConversationsApi,
    runs::RunsApi,
    destinations::DestinationsApi,
);

/// The OpenAPI service; routes need `Arc<dyn EventStore>`, `Arc<Registry>`, the workers' wake
/// `Arc<Notify>` and [`AdminToken`] as request data.
pub fn service() -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (
            health::HealthApi,
            events::EventsApi,
            conversations::ConversationsApi,
            runs::RunsApi,
            destinations::DestinationsApi,
        ),
        "Switchboard",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Admin API of Switchboard, the self-hosted backend for Operator webhooks. \
         Every `/api/v1` operation needs `Authorization: Bearer <SWITCHBOARD_ADMIN_TOKEN>`. \
         Errors have one shape: `{\"error\": {\"code\": \"…\", \"message\": \"…\"}}`.",
    )
}

/// The spec as committed in `openapi/openapi.json` (`switchboard openapi` prints it).
pub fn spec_json() -> String {
    service().spec()
}
