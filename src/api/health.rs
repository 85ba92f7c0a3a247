//! `/healthz` (the process answers) and `/readyz` (the database answers and
//! every background task the process needs is running); no auth, no data.

use std::sync::Arc;

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};

use crate::store::EventStore;
use crate::supervisor::Supervisor;

#[derive(Tags)]
enum HealthTags {
    /// Liveness and readiness probes.
    Health,
}

#[derive(Object)]
pub struct Health {
    /// `ok` or `unavailable`.
    pub status: String,
    /// When unavailable: what is down (the database, or a background task by
    /// name, e.g. `appender`, `workers`, `postgres-listen`) and why.
    #[oai(skip_serializing_if_is_none)]
    pub reason: Option<String>,
}

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// The database answers and every background task runs.
    #[oai(status = 200)]
    Ready(Json<Health>),
    /// The database does not answer, or a background task is down (being restarted).
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
            reason: None,
        })
    }

    /// The process is up, its database answers and its background tasks run.
    #[oai(path = "/readyz", method = "get")]
    async fn readyz(
        &self,
        store: Data<&Arc<dyn EventStore>>,
        supervisor: Data<&Arc<Supervisor>>,
    ) -> ReadyResponse {
        let down = supervisor.down();
        if !down.is_empty() {
            let reason = down
                .iter()
                .map(|t| {
                    format!(
                        "background task `{}` is down ({}); it is being restarted",
                        t.name, t.reason
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            return ReadyResponse::NotReady(Json(Health {
                status: "unavailable".into(),
                reason: Some(reason),
            }));
        }
        match store.ping().await {
            Ok(()) => ReadyResponse::Ready(Json(Health {
                status: "ok".into(),
                reason: None,
            })),
            Err(e) => {
                tracing::warn!(error = %e, "readiness check failed");
                ReadyResponse::NotReady(Json(Health {
                    status: "unavailable".into(),
                    reason: Some("the database does not answer".into()),
                }))
            }
        }
    }
}
