//! Wiring: opens the store, applies migrations, starts the appender, builds
//! the routes and binds the listener. Tests build an [`Application`] on port 0
//! exactly as `switchboard serve` does.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use poem::listener::{Acceptor, Listener, TcpAcceptor, TcpListener};
use poem::middleware::AddData;
use poem::{Endpoint, EndpointExt, Route, Server, get, post};
use tracing::Instrument;

use crate::api::{self, AdminToken};
use crate::config::Settings;
use crate::engine::Engine;
use crate::engine::replay_backend::ReplayWorkers;
use crate::engine::setup::SetupResponder;
use crate::prometheus;
use crate::store::appender::Appender;
use crate::store::{self, EventStore};
use crate::supervisor::Supervisor;
use crate::webhook::ingest::{self, IngestState, WEBHOOK_PATH};
use crate::workflow::WorkflowSet;
use crate::workflow::registry::Registry;
use tokio::sync::Notify;

/// A bound, ready-to-run server.
pub struct Application {
    workers: Vec<tokio::task::JoinHandle<()>>,
    engine: Arc<Engine>,
    acceptor: TcpAcceptor,
    local_addr: SocketAddr,
    app: poem::endpoint::BoxEndpoint<'static>,
    settings: Settings,
    store: Arc<dyn EventStore>,
    supervisor: Arc<Supervisor>,
    replays: ReplayWorkers,
}

/// All routes: the webhook, the admin API with its docs, the health probes,
/// and `/metrics` when `metrics` is given (else it has a listener of its own).
pub fn routes(
    store: Arc<dyn EventStore>,
    registry: Arc<Registry>,
    wake: Arc<Notify>,
    ingest: Arc<IngestState>,
    admin_token: AdminToken,
    supervisor: Arc<Supervisor>,
    metrics: Option<Arc<prometheus::MetricsGate>>,
) -> impl Endpoint<Output = poem::Response> {
    let service = api::service();
    let docs = service.swagger_ui();
    let spec = service.spec_endpoint();
    let mut route = Route::new()
        .at(
            WEBHOOK_PATH,
            post(ingest::receive).with(AddData::new(ingest)),
        )
        .nest("/docs", docs)
        .at("/openapi.json", spec)
        .nest("/", service.around(api_span));
    if let Some(gate) = metrics {
        route = route.at(
            "/metrics",
            get(prometheus::endpoint).with(AddData::new(gate)),
        );
    }
    route
        .with(AddData::new(store))
        .with(AddData::new(registry))
        .with(AddData::new(wake))
        .with(AddData::new(admin_token))
        .with(AddData::new(supervisor))
        .catch_all_error(api::error::to_json_error)
}

/// `/metrics` and `/healthz` alone, for a separate listen address.
pub fn metrics_routes(
    store: Arc<dyn EventStore>,
    supervisor: Arc<Supervisor>,
    metrics_token: Arc<prometheus::MetricsGate>,
) -> impl Endpoint<Output = poem::Response> {
    Route::new()
        .at("/metrics", get(prometheus::endpoint))
        .nest("/", api::service())
        .with(AddData::new(store))
        .with(AddData::new(supervisor))
        .with(AddData::new(metrics_token))
        .catch_all_error(api::error::to_json_error)
}

/// A server span per admin API request (health probes and `/metrics`, polled
/// all day, get none).
async fn api_span<E: Endpoint>(next: E, req: poem::Request) -> poem::Result<poem::Response> {
    if !req.uri().path().starts_with("/api/") {
        return next.call(req).await.map(poem::IntoResponse::into_response);
    }
    let span = tracing::info_span!(
        parent: None,
        "admin",
        otel.name = %format!("{} {}", req.method(), req.uri().path()),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %req.method(),
        url.path = %req.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    crate::telemetry::set_parent(
        &span,
        req.headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok()),
    );
    // Errors stay errors, so that `to_json_error` still gives them their JSON shape.
    let result = next
        .call(req)
        .instrument(span.clone())
        .await
        .map(poem::IntoResponse::into_response);
    let status = match &result {
        Ok(resp) => resp.status(),
        Err(e) => e.status(),
    };
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    result
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        crate::engine::http::EgressPolicy::from_env().map_err(anyhow::Error::msg)?;
        let store = crate::config::open_store(&settings.database_url).await?;
        store
            .migrate()
            .await
            .context("cannot apply database migrations")?;
        let workflows = load_workflows(&settings.workflows_dir)?;
        crate::workflow::registry::record_versions(store.as_ref(), &workflows)
            .await
            .context("cannot store the workflow versions")?;
        // Destinations (issue 14): the gate, shared through the database on PostgreSQL.
        let gate = crate::destinations::gate_for(store.backend(), &settings.database_url).await?;
        let registry = Arc::new(Registry::with_gate(workflows, gate));
        let wake = Arc::new(Notify::new());
        crate::destinations::attach(&registry.gate, store.clone(), wake.clone()).await;
        let supervisor = Supervisor::new();
        let engine = Arc::new(Engine::new(
            store.clone(),
            registry.clone(),
            wake.clone(),
            settings.worker_concurrency,
        ));
        let (appender, appender_task) = Appender::spawn(
            store.clone(),
            registry.clone(),
            Some(engine.clone()),
            wake.clone(),
            settings.append_timeout,
            &supervisor,
        );
        let replays = ReplayWorkers::new(store.clone(), wake.clone());
        let mut workers = vec![
            appender_task,
            supervise_engine(&supervisor, &engine),
            replays.supervise(&supervisor),
        ];
        workers.extend(supervise_listener(
            &supervisor,
            &settings.database_url,
            &wake,
        ));
        let ingest = Arc::new(IngestState {
            setup: Arc::new(
                SetupResponder::new(registry.clone(), store.clone())
                    .with_cache_bytes(settings.setup_cache_bytes),
            ),
            keys: settings.signing_keys.clone(),
            public_url: settings.public_url.clone(),
            trusted_proxies: settings.trusted_proxies.clone(),
            tolerance: settings.tolerance,
            max_body_bytes: settings.max_body_bytes,
            appender,
        });
        let acceptor = TcpListener::bind(settings.listen)
            .into_acceptor()
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let local_addr = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().copied())
            .context("listener has no address")?;
        prometheus::install();
        let metrics_token = prometheus::MetricsGate::new(settings.metrics_token.clone());
        if let Some(addr) = settings.metrics_listen {
            workers.push(
                serve_metrics(addr, store.clone(), &supervisor, metrics_token.clone()).await?,
            );
        }
        let app = routes(
            store.clone(),
            registry,
            wake,
            ingest,
            settings.admin_token.clone(),
            supervisor.clone(),
            settings.metrics_listen.is_none().then_some(metrics_token),
        )
        .boxed();
        Ok(Self {
            workers,
            engine,
            acceptor,
            local_addr,
            app,
            settings,
            store,
            supervisor,
            replays,
        })
    }

    /// The supervisor of this server's background tasks (fault tests stop them through it).
    pub fn supervisor(&self) -> Arc<Supervisor> {
        self.supervisor.clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn store(&self) -> Arc<dyn EventStore> {
        self.store.clone()
    }

    /// Serves until SIGINT/SIGTERM; then stops accepting connections, and
    /// within the grace period lets in-flight requests and runs finish
    /// (runs still going after it are handed back to other workers).
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.announce();
        let _workers = AbortOnDrop(self.workers);
        let grace = self.settings.shutdown_grace;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let signal = {
            let stop = stop.clone();
            let supervisor = self.supervisor.clone();
            async move {
                shutdown_signal().await;
                // Before the server winds down (and the appender, its requests gone, returns):
                // a task that ends from now on is not restarted.
                supervisor.stop();
                let _ = stop.send(true);
            }
        };
        let server = async {
            let result = Server::new_with_acceptor(self.acceptor)
                .run_with_graceful_shutdown(self.app, signal, Some(grace))
                .await;
            let _ = stop.send(true); // also when the server failed: stop the engine
            result
        };
        let engine = self.engine.clone();
        let supervisor = self.supervisor.clone();
        let replays = self.replays.clone();
        let drain = async move {
            let mut stopped = stopped;
            let _ = stopped.wait_for(|s| *s).await;
            supervisor.stop();
            // Both monitors stop at once, each within the grace.
            let ((), handed_back) = tokio::join!(replays.stop(grace), engine.shutdown(grace));
            handed_back
        };
        let (served, _handed_back) = tokio::join!(server, drain);
        served?;
        tracing::info!("stopped");
        Ok(())
    }

    /// Serves until the future is dropped (tests); the workers stop with it.
    pub async fn run(self) -> std::io::Result<()> {
        let _workers = AbortOnDrop(self.workers);
        Server::new_with_acceptor(self.acceptor).run(self.app).await
    }

    fn announce(&self) {
        let s = &self.settings;
        tracing::info!(
            listen = %self.local_addr,
            database = %store::redact_url(&s.database_url),
            backend = self.store.backend().name(),
            signing_keys = s.signing_keys.len(),
            "switchboard {} listening; webhooks at http://{}{WEBHOOK_PATH}",
            env!("CARGO_PKG_VERSION"),
            self.local_addr,
        );
        match &s.public_url {
            Some(url) => {
                tracing::info!(signed_url = %url, "verifying signatures against SWITCHBOARD_PUBLIC_URL")
            }
            None => tracing::info!(
                "SWITCHBOARD_PUBLIC_URL is not set: verifying signatures against the URL each request arrived at \
                 (scheme and host from X-Forwarded-Proto/X-Forwarded-Host when present, plus the path); \
                 set it to the URL registered in Operator when behind a proxy"
            ),
        }
        if s.admin_token_generated {
            // Printed once, on stderr, outside the log pipeline: this is the only place it appears.
            eprintln!(
                "\nSWITCHBOARD_ADMIN_TOKEN was not set; generated admin token for this run:\n\n    {}\n\n\
                 Use it as `Authorization: Bearer <token>` for /api/v1 and in the /docs Authorize dialog.\n\
                 Set SWITCHBOARD_ADMIN_TOKEN to keep one across restarts.\n",
                s.admin_token.expose()
            );
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}

/// Loads the workflow directory, refusing to start on any error.
fn load_workflows(dir: &std::path::Path) -> anyhow::Result<WorkflowSet> {
    let workflows = WorkflowSet::load(dir).map_err(|diagnostics| {
        anyhow::anyhow!(
            "the workflows in {} are invalid (`switchboard validate` shows the same):\n\n{}",
            dir.display(),
            crate::workflow::diagnostic::render_all(&diagnostics)
        )
    })?;
    for w in &workflows.warnings {
        tracing::warn!("{}", w.to_string().trim_end());
    }
    tracing::info!(dir = %workflows.dir.display(), workflows = workflows.workflows.len(), "workflows loaded");
    Ok(workflows)
}

/// `switchboard worker`: the engine alone, until SIGINT/SIGTERM.
pub async fn run_workers(
    database_url: &str,
    workflows_dir: &std::path::Path,
    concurrency: usize,
    shutdown_grace: std::time::Duration,
    metrics_listen: Option<SocketAddr>,
    metrics_token: Option<AdminToken>,
) -> anyhow::Result<()> {
    let store = crate::config::open_store(database_url).await?;
    store
        .migrate()
        .await
        .context("cannot apply database migrations")?;
    if store.backend() == store::Backend::Sqlite {
        tracing::warn!(
            "a separate worker on SQLite shares one database file with the server; PostgreSQL is meant for scaling out"
        );
    }
    let workflows = load_workflows(workflows_dir)?;
    crate::workflow::registry::record_versions(store.as_ref(), &workflows)
        .await
        .context("cannot store the workflow versions")?;
    // Destinations (issue 14): the gate, shared through the database on PostgreSQL.
    let gate = crate::destinations::gate_for(store.backend(), database_url).await?;
    let registry = Arc::new(Registry::with_gate(workflows, gate));
    crate::engine::http::EgressPolicy::from_env().map_err(anyhow::Error::msg)?;
    let wake = Arc::new(Notify::new());
    crate::destinations::attach(&registry.gate, store.clone(), wake.clone()).await;
    prometheus::install();
    let supervisor = Supervisor::new();
    let mut tasks = Vec::new();
    if let Some(addr) = metrics_listen {
        tasks.push(
            serve_metrics(
                addr,
                store.clone(),
                &supervisor,
                prometheus::MetricsGate::new(metrics_token),
            )
            .await?,
        );
    }
    let engine_store = store.clone();
    let engine = Arc::new(Engine::new(store, registry, wake.clone(), concurrency));
    tracing::info!(
        owner = engine.owner(),
        concurrency,
        "switchboard worker started"
    );
    tasks.push(supervise_engine(&supervisor, &engine));
    tasks.extend(supervise_listener(&supervisor, database_url, &wake));
    let replays = ReplayWorkers::new(engine_store, wake.clone());
    tasks.push(replays.supervise(&supervisor));
    let _workers = AbortOnDrop(tasks);
    shutdown_signal().await;
    supervisor.stop();
    tokio::join!(
        replays.stop(shutdown_grace),
        engine.shutdown(shutdown_grace)
    );
    tracing::info!("stopped");
    Ok(())
}

/// Serves `/metrics` (and the health probes) on their own address, supervised
/// as `metrics-listener` (bound here, so that a bad address stops startup;
/// bound again if it has to restart).
async fn serve_metrics(
    addr: SocketAddr,
    store: Arc<dyn EventStore>,
    supervisor: &Arc<Supervisor>,
    metrics_token: Arc<prometheus::MetricsGate>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let acceptor = TcpListener::bind(addr)
        .into_acceptor()
        .await
        .with_context(|| format!("cannot listen on {addr} for /metrics"))?;
    tracing::info!(listen = %addr, "metrics at http://{addr}/metrics");
    let mut first = Some(acceptor);
    let health = supervisor.clone();
    Ok(supervisor.spawn("metrics-listener", move || {
        let acceptor = first.take();
        let routes = metrics_routes(store.clone(), health.clone(), metrics_token.clone());
        tokio::spawn(async move {
            let served = match acceptor {
                Some(acceptor) => Server::new_with_acceptor(acceptor).run(routes).await,
                None => Server::new(TcpListener::bind(addr)).run(routes).await,
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "the /metrics listener stopped");
            }
        })
    }))
}

/// The workers' claim loop, supervised as `workers`.
fn supervise_engine(
    supervisor: &Arc<Supervisor>,
    engine: &Arc<Engine>,
) -> tokio::task::JoinHandle<()> {
    let engine = engine.clone();
    supervisor.spawn("workers", move || engine.clone().spawn())
}

/// On PostgreSQL, the LISTEN task, supervised as `postgres-listen`.
fn supervise_listener(
    supervisor: &Arc<Supervisor>,
    database_url: &str,
    wake: &Arc<Notify>,
) -> Option<tokio::task::JoinHandle<()>> {
    if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
        return None;
    }
    let url = database_url.to_owned();
    let wake = wake.clone();
    Some(supervisor.spawn("postgres-listen", move || {
        spawn_listener(&url, wake.clone())
    }))
}

/// Aborts background tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// On PostgreSQL, wakes the workers when another instance creates runs.
pub fn spawn_listener(database_url: &str, wake: Arc<Notify>) -> tokio::task::JoinHandle<()> {
    let url = database_url.to_owned();
    tokio::spawn(async move {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return;
        }
        loop {
            match sqlx::postgres::PgListener::connect(&url).await {
                Ok(mut listener) => {
                    if let Err(e) = listener.listen(store::postgres::RUNS_CHANNEL).await {
                        tracing::warn!(error = %e, "LISTEN failed; relying on polling");
                    } else {
                        while listener.recv().await.is_ok() {
                            wake.notify_one();
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot LISTEN for new runs yet"),
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    })
}
