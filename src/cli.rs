//! The command line: `serve`, `worker`, `migrate`, `sign`, `sink`, `validate`, `backtest`,
//! `dispatch`, `openapi`, `rebuild-projections`.
//! Every option can also be given as an environment variable (shown in `--help`).

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{DEFAULT_DATABASE_URL, DEFAULT_LISTEN, Settings};
use crate::webhook::signature::{self, SignedParts, SigningKeys};

#[derive(Parser, Debug)]
#[command(
    name = "switchboard",
    version,
    about = "Self-hosted backend for Operator agent webhooks: verifies every delivery, stores it once, runs your workflows.",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the webhook receiver, the admin API and the workers (applies pending migrations first).
    Serve(ServeArgs),
    /// Run workflow workers only (no HTTP): add these next to `serve` to scale out on PostgreSQL.
    Worker(WorkerArgs),
    /// Apply pending database migrations and exit.
    Migrate(DatabaseArgs),
    /// Print the three Operator headers (or a curl command) for a body file, to try the endpoint by hand.
    Sign(SignArgs),
    /// A local HTTP endpoint for trying workflows: prints every request it receives (method,
    /// path, headers, body) and answers 200.
    Sink(SinkArgs),
    /// Check workflow files: every error with file, line and column; exit status 1 on errors.
    Validate(ValidateArgs),
    /// Try a workflow file on the stored events: what would have matched, why not, and the
    /// requests it would have sent (secrets masked). Sends nothing.
    Backtest(BacktestArgs),
    /// Create the runs the workflows in the workflows directory would have started for stored
    /// events and did not (events stored while no workflow matched, a workflow added later, a
    /// `when:` fixed afterwards): exactly one run per workflow and event, however often it is
    /// run. `serve`/`worker` on the same database execute them. `--dry-run` sends and writes
    /// nothing and prints the backtest of each workflow instead.
    Dispatch(DispatchArgs),
    /// Print the admin API's OpenAPI spec (JSON) on stdout.
    Openapi,
    /// Refold the conversation projections from the event log.
    RebuildProjections(DatabaseArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// Where events are stored: sqlite://FILE (created if missing) or postgres://USER@HOST/DB.
    #[arg(long, env = "SWITCHBOARD_DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,

    /// Address to listen on: IP:PORT or HOST:PORT (e.g. 127.0.0.1:8080, 0.0.0.0:8080, localhost:8080).
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = DEFAULT_LISTEN, value_parser = crate::config::parse_listen)]
    pub listen: SocketAddr,

    /// The webhook URL exactly as registered in Operator's dashboard (it is part of what is signed).
    /// Unset: rebuilt from each request's scheme and host (X-Forwarded-Proto/Host honoured) and path.
    #[arg(long, env = "SWITCHBOARD_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Operator's webhook signing key (Developers → Webhooks); several, comma-separated, during rotation.
    #[arg(long, env = "SWITCHBOARD_SIGNING_KEYS", hide_env_values = true)]
    pub signing_keys: Option<String>,

    /// Bearer token for /api/v1. Unset: a random one is generated and printed once at startup.
    #[arg(long, env = "SWITCHBOARD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// How far X-Timestamp may be in the past or the future (e.g. 30s, 2m).
    #[arg(long, env = "SWITCHBOARD_TIMESTAMP_TOLERANCE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub timestamp_tolerance: Duration,

    /// Largest webhook body accepted, in bytes (larger: 413).
    #[arg(long, env = "SWITCHBOARD_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Proxies (comma-separated CIDRs, e.g. 10.0.0.0/8,::1/128) whose X-Forwarded-Proto/Host are
    /// trusted to rebuild the signed URL when SWITCHBOARD_PUBLIC_URL is unset. Unset: none.
    #[arg(long, env = "SWITCHBOARD_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// Memory for cached setup lookup responses (`cache:`), in bytes; the oldest go first.
    #[arg(long, env = "SWITCHBOARD_SETUP_CACHE_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub setup_cache_bytes: usize,

    /// Longest a webhook waits for its commit before it is answered 503 with Retry-After (e.g. 2s, 500ms).
    #[arg(long, env = "SWITCHBOARD_APPEND_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub append_timeout: Duration,

    #[command(flatten)]
    pub engine: EngineArgs,
}

/// What `serve` and `worker` share: the workflows, the workers, shutdown, metrics.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Directory of workflow YAML files (every instance reads the same).
    #[arg(long, env = "SWITCHBOARD_WORKFLOWS", default_value = "./workflows")]
    pub workflows: PathBuf,

    /// Outbound requests in flight at once from this process's workflow runs
    /// (four run slots per request slot: a run saving its outcome holds none).
    #[arg(long, env = "SWITCHBOARD_WORKER_CONCURRENCY", default_value_t = 32)]
    pub worker_concurrency: usize,

    /// On SIGTERM, how long in-flight requests and runs may take before the process exits
    /// (runs still going are then handed back to other workers).
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Serve /metrics (and /healthz) on this address, e.g. 127.0.0.1:9090
    /// (`serve` otherwise serves /metrics on its main address; `worker` only here).
    #[arg(long, env = "SWITCHBOARD_METRICS_LISTEN", value_parser = crate::config::parse_listen)]
    pub metrics_listen: Option<SocketAddr>,

    /// When set, /metrics answers only requests with `Authorization: Bearer <this token>`.
    #[arg(long, env = "SWITCHBOARD_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,

    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Args, Debug, Clone)]
pub struct BacktestArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,

    /// The workflow file to try.
    pub file: PathBuf,

    /// Only events received within this long before now (e.g. 7d, 12h).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,

    /// At most this many (most recent) events.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct DispatchArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,

    /// The workflows directory (the one `serve` loads).
    #[arg(long, env = "SWITCHBOARD_WORKFLOWS", default_value = "./workflows")]
    pub workflows: PathBuf,

    /// Only events received within this long before now (e.g. 1d, 12h); default: every stored event.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,

    /// Only this workflow (repeat for several); default: every workflow that starts runs.
    #[arg(long = "workflow")]
    pub workflow: Vec<String>,

    /// Only events of this type.
    #[arg(long = "type")]
    pub event_type: Option<String>,

    /// Show what would run (a backtest of each workflow) without creating anything.
    #[arg(long)]
    pub dry_run: bool,

    /// With --dry-run: at most this many (most recent) events per workflow.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
}

#[derive(Args, Debug, Clone)]
pub struct ValidateArgs {
    /// Workflow files and/or directories of them (default: SWITCHBOARD_WORKFLOWS, else ./workflows).
    /// Checked together: workflow names must be unique across them all.
    #[arg(env = "SWITCHBOARD_WORKFLOWS", default_value = "./workflows", num_args = 1..)]
    pub paths: Vec<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct SinkArgs {
    /// Address to listen on (IP:PORT or HOST:PORT).
    #[arg(long, default_value = "127.0.0.1:9000", value_parser = crate::config::parse_listen)]
    pub listen: SocketAddr,

    /// The status to answer with (e.g. 500 or 429 to watch retries, 400 to watch a run fail).
    #[arg(long, default_value_t = 200)]
    pub status: u16,
}

#[derive(Args, Debug, Clone)]
pub struct SignArgs {
    /// The body file to sign, byte for byte ("-" reads stdin).
    pub file: PathBuf,

    /// Signing key (the first of SWITCHBOARD_SIGNING_KEYS is used).
    #[arg(long, env = "SWITCHBOARD_SIGNING_KEYS", hide_env_values = true)]
    pub key: Option<String>,

    /// The URL to sign (and, with --curl, to post to): the webhook URL as registered in Operator.
    /// Default: SWITCHBOARD_PUBLIC_URL, else http://<SWITCHBOARD_LISTEN>/webhooks/operator,
    /// the address `serve` listens on (127.0.0.1:8080 unless set).
    #[arg(long, env = "SWITCHBOARD_PUBLIC_URL")]
    pub url: Option<String>,

    /// The address `serve` listens on, used for the default --url.
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: String,

    /// X-Idempotency-Key to use (default: a new random UUID).
    #[arg(long)]
    pub idempotency_key: Option<String>,

    /// X-Timestamp to use, Unix seconds (default: now).
    #[arg(long)]
    pub timestamp: Option<i64>,

    /// Print a complete curl command instead of the three headers.
    #[arg(long)]
    pub curl: bool,
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Worker(args) => match crate::config::check_workflows_dir(&args.engine.workflows) {
            Err(e) => Err(e.into()),
            Ok(()) => {
                crate::startup::run_workers(
                    &args.db.database_url,
                    &args.engine.workflows,
                    args.engine.worker_concurrency,
                    args.engine.shutdown_grace,
                    args.engine.metrics_listen,
                    args.engine
                        .metrics_token
                        .as_deref()
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(crate::api::AdminToken::new),
                )
                .await
            }
        },
        Command::Migrate(args) => migrate(&args).await,
        Command::Sign(args) => sign(&args),
        Command::Sink(args) => crate::sink::run(args.listen, args.status).await,
        Command::Validate(args) => return validate(&args),
        Command::Backtest(args) => backtest(&args).await,
        Command::Dispatch(args) => dispatch(&args).await,
        Command::Openapi => {
            println!("{}", crate::api::spec_json());
            Ok(())
        }
        Command::RebuildProjections(args) => rebuild(&args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", render_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: sqlx repeats its
/// cause inside its own message, which `{:#}` would print two or three times.
fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let settings = Settings::from_args(args)?;
    let app = crate::startup::Application::build(settings).await?;
    app.run_until_stopped().await
}

async fn migrate(args: &DatabaseArgs) -> anyhow::Result<()> {
    let store = crate::config::open_store(&args.database_url).await?;
    store.migrate().await?;
    println!(
        "migrations applied to {}",
        crate::store::redact_url(&args.database_url)
    );
    Ok(())
}

async fn rebuild(args: &DatabaseArgs) -> anyhow::Result<()> {
    let store = crate::config::open_store(&args.database_url).await?;
    store.migrate().await?;
    let n = store.rebuild_projections().await?;
    println!("projections rebuilt from {n} events");
    Ok(())
}

fn validate(args: &ValidateArgs) -> ExitCode {
    use crate::workflow::{WorkflowSet, diagnostic::render_all};
    let mut sources = Vec::new();
    let mut problems = Vec::new();
    for path in &args.paths {
        match workflow_sources(path) {
            Ok(found) => sources.extend(found),
            Err(message) => problems.push(message),
        }
    }
    if !problems.is_empty() {
        for p in problems {
            eprintln!("error: {p}");
        }
        return ExitCode::FAILURE;
    }
    let shown = args
        .paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let dir = match args.paths.as_slice() {
        [one] if one.is_dir() => one.clone(),
        _ => PathBuf::new(),
    };
    match WorkflowSet::from_sources(&dir, sources) {
        Ok(set) => {
            if !set.warnings.is_empty() {
                eprint!("{}", render_all(&set.warnings));
            }
            for w in &set.workflows {
                println!("ok: {} ({}, on {})", w.name, w.file.display(), w.event);
            }
            if !set.destinations.is_empty() {
                println!(
                    "ok: destinations ({} named{})",
                    set.destinations.entries.len(),
                    if set.destinations.default.is_empty() {
                        ""
                    } else {
                        ", and a default"
                    }
                );
            }
            println!("{} workflow(s) valid in {shown}", set.workflows.len());
            ExitCode::SUCCESS
        }
        Err(diagnostics) => {
            eprint!("{}", render_all(&diagnostics));
            ExitCode::FAILURE
        }
    }
}

/// The workflow files a `validate` argument names, with their text: a file as
/// is, a directory's `*.yaml` / `*.yml` (not recursive, in name order).
fn workflow_sources(path: &std::path::Path) -> Result<Vec<(PathBuf, String)>, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "{shown}: no such file or directory (give a workflow file or a directory of them)"
        ),
        _ => format!("{shown}: cannot read: {e}"),
    })?;
    let files = if meta.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| format!("{shown}: cannot read the directory: {e}"))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            })
            .collect();
        files.sort();
        files
    } else if meta.is_file() {
        vec![path.to_owned()]
    } else {
        return Err(format!(
            "{shown} is not a workflow file or a directory of workflow files"
        ));
    };
    files
        .into_iter()
        .map(|f| {
            std::fs::read_to_string(&f)
                .map(|text| (f.clone(), text))
                .map_err(|e| format!("{}: cannot read: {e}", f.display()))
        })
        .collect()
}

async fn backtest(args: &BacktestArgs) -> anyhow::Result<()> {
    use crate::workflow::{backtest, compile, diagnostic::render_all};
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.file.display()))?;
    let (wf, warnings) =
        compile::compile(&args.file, &text).map_err(|d| anyhow::anyhow!("\n{}", render_all(&d)))?;
    if !warnings.is_empty() {
        eprint!("{}", render_all(&warnings));
    }
    // Read-only: never migrates or writes the database it is pointed at.
    let store = backtest::open_read_only(&args.db.database_url).await?;
    let filter = backtest::BacktestFilter {
        received_after: args.since.map(|d| {
            chrono::Utc::now() - chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX)
        }),
        limit: args.limit,
        ..Default::default()
    };
    let results = backtest::run(store.as_ref(), &wf, &filter).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(());
    }
    print_backtest(&wf, &results);
    Ok(())
}

/// Prints a backtest report for people.
fn print_backtest(
    wf: &crate::workflow::Workflow,
    results: &[crate::workflow::backtest::BacktestResult],
) {
    let matched = results.iter().filter(|r| r.matched).count();
    let failing = results.iter().filter(|r| r.would_fail.is_some()).count();
    println!(
        "backtest of `{}` on {} stored {} event(s): {matched} would have run{}\n",
        wf.name,
        results.len(),
        wf.event,
        if failing > 0 {
            format!(", {failing} of them would fail")
        } else {
            String::new()
        }
    );
    for r in results {
        let conv = r.conversation_id.as_deref().unwrap_or("-");
        if let Some(why) = &r.would_fail {
            println!(
                "  ! #{} {} ({conv}): would run, then fail at {why}",
                r.sequence, r.event_id
            );
        } else if r.matched {
            println!("  ✓ #{} {} ({conv})", r.sequence, r.event_id);
            for w in &r.requests {
                match (&w.request, &w.note) {
                    (Some(req), _) => println!(
                        "      {}: {} {}",
                        w.step_id,
                        req["method"].as_str().unwrap_or(""),
                        req["url"].as_str().unwrap_or("")
                    ),
                    (None, Some(note)) => println!("      {}: {note}", w.step_id),
                    (None, None) => {}
                }
            }
            if let Some(answer) = &r.answer {
                println!("      answer: {answer}");
            }
        } else {
            println!(
                "  ✗ #{} {} ({conv}): {}",
                r.sequence,
                r.event_id,
                r.reason.as_deref().unwrap_or("")
            );
        }
    }
}

async fn dispatch(args: &DispatchArgs) -> anyhow::Result<()> {
    use crate::engine::replay::{self, Driver, Ended, Mode, ReplayFilter};
    use crate::workflow::{WorkflowSet, backtest, diagnostic::render_all};
    let set = WorkflowSet::load(&args.workflows).map_err(|d| {
        anyhow::anyhow!(
            "the workflows in {} are invalid (`switchboard validate` shows the same):\n\n{}",
            args.workflows.display(),
            render_all(&d)
        )
    })?;
    let loaded = replay::loaded_versions(&set, None);
    if let Some(unknown) = args
        .workflow
        .iter()
        .find(|w| !loaded.contains_key(w.as_str()))
    {
        anyhow::bail!(
            "--workflow {unknown}: no such workflow starting runs in {} (there: {})",
            args.workflows.display(),
            if loaded.is_empty() {
                "none".to_owned()
            } else {
                loaded.keys().cloned().collect::<Vec<_>>().join(", ")
            }
        );
    }
    let only = (!args.workflow.is_empty()).then_some(args.workflow.as_slice());
    let versions = replay::loaded_versions(&set, only);
    if versions.is_empty() {
        anyhow::bail!(
            "no workflow in {} starts runs, so there is nothing to dispatch; add workflows there (or point --workflows / SWITCHBOARD_WORKFLOWS at them)",
            args.workflows.display()
        );
    }
    // Never migrates: like `backtest`, it works on the database `serve` created.
    let store = backtest::open_read_only(&args.db.database_url).await?;
    let received_after = args.since.map(|d| {
        chrono::Utc::now() - chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX)
    });
    if args.dry_run {
        let filter = backtest::BacktestFilter {
            received_after,
            limit: args.limit,
            ..Default::default()
        };
        for wf in set
            .workflows
            .iter()
            .filter(|w| versions.contains_key(&w.name))
        {
            if args.event_type.as_ref().is_some_and(|t| *t != wf.event) {
                continue;
            }
            let results = backtest::run(store.as_ref(), wf, &filter).await?;
            print_backtest(wf, &results);
            println!();
        }
        println!(
            "dry run: nothing was created (runs that already exist are not created again by a dispatch)"
        );
        return Ok(());
    }
    crate::workflow::registry::record_versions(store.as_ref(), &set).await?;
    let owner = format!("dispatch-cli-{}", uuid::Uuid::new_v4().simple());
    let filter = ReplayFilter {
        event_type: args.event_type.clone(),
        received_after,
        workflows: only.map(<[String]>::to_vec),
        versions,
        ..Default::default()
    };
    let created = replay::create(store.as_ref(), Mode::Dispatch, filter, Some(&owner)).await?;
    println!(
        "dispatch {}: {} stored event(s) selected; workflows: {}",
        created.replay_id,
        created.total,
        replay::loaded_versions(&set, only)
            .iter()
            .map(|(w, v)| format!("{w} ({})", &v[..v.len().min(12)]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let driver = Driver {
        store: store.clone(),
        wake: std::sync::Arc::new(tokio::sync::Notify::new()),
        owner,
        stopping: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    let progress = |r: &crate::store::runs::Replay| {
        eprintln!(
            "  {}/{} events, {} run(s) created",
            r.done, r.total, r.runs_created
        );
    };
    let started = std::time::Instant::now();
    match driver.drive(created.clone(), &progress).await? {
        Ended::Finished(r) => {
            println!(
                "dispatch {} finished: {} event(s), {} run(s) created, {} event(s) without a new run (no match, or its run exists), {} failed, in {:.1} s",
                r.replay_id,
                r.done,
                r.runs_created,
                r.skipped,
                r.failed,
                started.elapsed().as_secs_f64()
            );
            println!(
                "the runs execute on `switchboard serve` / `worker` against this database; follow them with GET /api/v1/runs"
            );
            Ok(())
        }
        Ended::Stopped => anyhow::bail!(
            "dispatch {} was cancelled or taken over before it finished; see GET /api/v1/replays/{}",
            created.replay_id,
            created.replay_id
        ),
    }
}

fn sign(args: &SignArgs) -> anyhow::Result<()> {
    let keys = args
        .key
        .as_deref()
        .and_then(SigningKeys::parse)
        .ok_or_else(|| {
            anyhow::anyhow!("no signing key: pass --key or set SWITCHBOARD_SIGNING_KEYS")
        })?;
    let body = if args.file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        buf
    } else {
        std::fs::read(&args.file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.file.display()))?
    };
    let timestamp = args
        .timestamp
        .unwrap_or_else(|| chrono::Utc::now().timestamp())
        .to_string();
    let idempotency_key = args
        .idempotency_key
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let url = match &args.url {
        Some(u) if !u.trim().is_empty() => u.trim().to_owned(),
        _ => crate::config::local_webhook_url(&args.listen),
    };
    let parts = SignedParts {
        url: &url,
        idempotency_key: &idempotency_key,
        timestamp: &timestamp,
        body: &body,
    };
    let sig = signature::sign(keys.primary(), &parts);
    if args.curl {
        let file = if args.file.as_os_str() == "-" {
            "-".to_owned()
        } else {
            args.file.display().to_string()
        };
        println!(
            "curl -sS -i -X POST '{url}' -H 'Content-Type: application/json' -H 'X-Timestamp: {timestamp}' \
             -H 'X-Idempotency-Key: {idempotency_key}' -H 'X-Signature: {sig}' --data-binary @'{file}'"
        );
    } else {
        println!("X-Timestamp: {timestamp}");
        println!("X-Idempotency-Key: {idempotency_key}");
        println!("X-Signature: {sig}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_chain_says_each_cause_once() {
        let inner = std::io::Error::other("database \"x\" does not exist");
        let e = anyhow::Error::new(inner)
            .context("database error: database \"x\" does not exist")
            .context("cannot apply database migrations");
        assert_eq!(
            super::render_error(&e),
            "cannot apply database migrations: database error: database \"x\" does not exist"
        );
    }
}
