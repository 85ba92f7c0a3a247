//! `/healthz` (the process answers) and `/readyz` (the database answers); no auth, no data.

use std::sync::Arc;

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};

use crate::store::EventStore;

#[derive(Tags)]
enum HealthTags {
    /// Liveness and readiness probes.
    Health,
}

#[derive(Object)]
pub struct Health {
    /// `ok` or `unavailable`.
    pub status: String,
}

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// The database answers.
    #[oai(status = 200)]
    Ready(Json<Health>),
    /// The database does not answer.
    #[oai(status = 503)]
    NotReady(Json<Health>),
}

pub struct HealthApi;

#[OpenApi(tag = "HealthTags::Health")]
impl HealthApi {
    /// The process is up.
    #[oai(path = "/healthz", method = "get")]
    async fn healthz(&self) -> Json<Health> {
        Json(Health {
            status: "ok".into(),
        })
    }

    /// The process is up and its database answers.
    #[oai(path = "/readyz", method = "get")]
    async fn readyz(&self, store: Data<&Arc<dyn EventStore>>) -> ReadyResponse {
        match store.ping().await {
            Ok(()) => ReadyResponse::Ready(Json(Health {
                status: "ok".into(),
            })),
            Err(e) => {
                tracing::warn!(error = %e, "readiness check failed");
                ReadyResponse::NotReady(Json(Health {
                    status: "unavailable".into(),
                }))
            }
        }
    }
}
