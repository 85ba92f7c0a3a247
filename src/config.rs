//! Configuration of `switchboard serve`, parsed once from flags and
//! environment variables (see [`crate::cli`]) into [`Settings`], whose fields
//! are valid by construction. Errors say which variable is wrong and how to fix it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::api::AdminToken;
use crate::cli::ServeArgs;
use crate::store::{EventStore, StoreError, redact_url};
use crate::webhook::signature::{SigningKeys, Tolerance};

/// The default database: an SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://switchboard.db";
/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Validated settings for the server.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    pub listen: SocketAddr,
    /// The webhook URL registered in Operator (what is signed); `None`: rebuilt per request.
    pub public_url: Option<String>,
    pub signing_keys: SigningKeys,
    pub admin_token: AdminToken,
    /// True when no token was configured and one was generated for this run.
    pub admin_token_generated: bool,
    pub workflows_dir: PathBuf,
    pub tolerance: Tolerance,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    /// Runs executed at once by this process's workers.
    pub worker_concurrency: usize,
    /// A separate address for `/metrics`; `None` serves it on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// Peers whose `X-Forwarded-Proto/Host` may rebuild the signed URL (without `public_url`).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Bytes of cached setup lookup responses kept in memory.
    pub setup_cache_bytes: usize,
    /// Longest a webhook waits for its commit before its 503 (`SWITCHBOARD_APPEND_TIMEOUT`).
    pub append_timeout: Duration,
    /// Bearer token `/metrics` requires, when set (`SWITCHBOARD_METRICS_TOKEN`).
    pub metrics_token: Option<AdminToken>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no signing key: set SWITCHBOARD_SIGNING_KEYS (or --signing-keys) to the webhook signing key \
         shown in Operator's dashboard under Developers → Webhooks. During a key rotation give both keys, \
         comma-separated."
    )]
    MissingSigningKey,
    #[error(
        "SWITCHBOARD_PUBLIC_URL `{0}` is not an http(s) URL: give the webhook URL exactly as registered in Operator, e.g. https://hooks.example.com/webhooks/operator"
    )]
    PublicUrlScheme(String),
    #[error(
        "SWITCHBOARD_PUBLIC_URL `{0}` has a query string: Operator signs the URL without it, so remove everything from `?`"
    )]
    PublicUrlQuery(String),
    #[error(
        "SWITCHBOARD_ADMIN_TOKEN is set but empty: unset it to have one generated, or give a long random value"
    )]
    EmptyAdminToken,
    #[error("SWITCHBOARD_MAX_BODY_BYTES must be at least 1")]
    ZeroBodyLimit,
    #[error(
        "SWITCHBOARD_APPEND_TIMEOUT must be more than 0 (e.g. 2s): it is how long a webhook may wait for its commit"
    )]
    ZeroAppendTimeout,
    #[error(
        "SWITCHBOARD_TRUSTED_PROXIES: `{0}` is not an IP address or CIDR range: give addresses or ranges, comma-separated, e.g. 10.0.0.0/8,192.168.1.7"
    )]
    TrustedProxy(String),
    #[error(
        "{0}: no such file or directory: set SWITCHBOARD_WORKFLOWS (or --workflows) to the \
         directory that holds your workflow YAML files (an empty directory runs none)"
    )]
    WorkflowsDirMissing(String),
    #[error(
        "{0} is not a directory of workflow files: set SWITCHBOARD_WORKFLOWS (or --workflows) to the \
         directory that holds your workflow YAML files (an empty directory runs none)"
    )]
    WorkflowsDir(String),
}

/// Refuses a workflows directory that does not exist (a typo would otherwise
/// turn every automation off without a word); `validate` says the same.
pub fn check_workflows_dir(dir: &Path) -> Result<(), ConfigError> {
    if dir.is_dir() {
        Ok(())
    } else if !dir.exists() {
        Err(ConfigError::WorkflowsDirMissing(dir.display().to_string()))
    } else {
        Err(ConfigError::WorkflowsDir(dir.display().to_string()))
    }
}

/// Parses a listen address: `IP:PORT`, or `HOST:PORT` resolved now (IPv4 first),
/// so `localhost:8080` works.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let form = "give IP:PORT or HOST:PORT, e.g. 127.0.0.1:8080, 0.0.0.0:8080 or localhost:8080";
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("`{s}` has no port: {form}"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("`{s}` is not an address to listen on: {form}"));
    }
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{host}` ({e}): {form}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("`{host}` resolves to no address: {form}"))
}

/// The webhook URL of a local `serve` listening on `listen` (what `sign` posts to by default).
pub fn local_webhook_url(listen: &str) -> String {
    let addr = match parse_listen(listen) {
        Ok(a) if a.ip().is_unspecified() => {
            let ip: IpAddr = if a.is_ipv4() {
                Ipv4Addr::LOCALHOST.into()
            } else {
                Ipv6Addr::LOCALHOST.into()
            };
            SocketAddr::new(ip, a.port()).to_string()
        }
        Ok(_) | Err(_) => listen.trim().to_owned(),
    };
    format!("http://{addr}{}", crate::webhook::ingest::WEBHOOK_PATH)
}

/// Opens the store `SWITCHBOARD_DATABASE_URL` names; on failure, one message
/// that says what failed (refused, unknown host, no such database or role,
/// authentication), where (host, port, database), and how to fix it.
pub async fn open_store(url: &str) -> anyhow::Result<Arc<dyn EventStore>> {
    check_database_url(url).map_err(|m| anyhow::anyhow!(m))?;
    match crate::store::connect(url).await {
        Ok(store) => Ok(store),
        Err(e) => Err(anyhow::anyhow!(describe_connect_error(url, e).await)),
    }
}

/// Refuses database URLs that cannot work, before connecting.
pub fn check_database_url(url: &str) -> Result<(), String> {
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let path = rest.trim_start_matches("//");
        let path = path.split('?').next().unwrap_or("");
        if path.is_empty() {
            return Err(format!(
                "SWITCHBOARD_DATABASE_URL `{url}` names no file: give the SQLite file's path, \
                 e.g. sqlite://./switchboard.db or sqlite:///var/lib/switchboard/switchboard.db"
            ));
        }
        if path != ":memory:" {
            let parent = Path::new(path)
                .parent()
                .filter(|p| !p.as_os_str().is_empty());
            if let Some(dir) = parent
                && !dir.is_dir()
            {
                return Err(format!(
                    "SWITCHBOARD_DATABASE_URL `{url}`: the directory {} does not exist; \
                     create it (mkdir -p {}) or give another path",
                    dir.display(),
                    dir.display()
                ));
            }
        }
    }
    Ok(())
}

/// Says what failed when the pool could not open. The pool hides the cause
/// of a refused connection behind its own timeout, so on PostgreSQL one
/// direct connection is tried to find it.
async fn describe_connect_error(url: &str, err: StoreError) -> String {
    let shown = redact_url(url);
    let is_pg = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let options = if is_pg {
        sqlx::postgres::PgConnectOptions::from_str(url).ok()
    } else {
        None
    };
    let Some(options) = options else {
        return match err {
            StoreError::Database(sqlx::Error::Configuration(e)) => format!(
                "SWITCHBOARD_DATABASE_URL `{shown}` is not a valid database URL ({e}): \
                 use sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DATABASE"
            ),
            StoreError::Database(sqlx::Error::Database(db)) => {
                format!("cannot open the database {shown}: {}", db.message())
            }
            other => format!("cannot open the database {shown}: {}", root_message(&other)),
        };
    };
    let cause = match err {
        StoreError::Database(sqlx::Error::PoolTimedOut) => {
            use sqlx::ConnectOptions;
            match tokio::time::timeout(Duration::from_secs(5), options.connect()).await {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => sqlx::Error::PoolTimedOut,
                Err(_) => sqlx::Error::PoolTimedOut,
            }
        }
        StoreError::Database(e) => e,
        other => {
            return format!("cannot open the database {shown}: {}", root_message(&other));
        }
    };
    pg_connect_message(&options, &cause)
}

fn pg_connect_message(options: &sqlx::postgres::PgConnectOptions, err: &sqlx::Error) -> String {
    let host = options.get_host();
    let port = options.get_port();
    let user = options.get_username();
    let db = options.get_database().unwrap_or(user);
    let at = format!("PostgreSQL at {host}:{port}");
    match err {
        sqlx::Error::Database(e) => {
            let code = e.code().unwrap_or_default();
            match code.as_ref() {
                "3D000" => format!(
                    "database `{db}` does not exist on {at}: create it \
                     (`createdb -h {host} -p {port} -U {user} {db}`) or fix the name in SWITCHBOARD_DATABASE_URL"
                ),
                "28000" if e.message().contains("role") => format!(
                    "role `{user}` does not exist on {at} (database `{db}`): create it \
                     (`createuser -h {host} -p {port} -U postgres --createdb {user}`) or fix the user in SWITCHBOARD_DATABASE_URL"
                ),
                "28P01" | "28000" => format!(
                    "authentication failed for user `{user}` on {at} (database `{db}`): \
                     check the user and password in SWITCHBOARD_DATABASE_URL (and the server's pg_hba.conf)"
                ),
                _ => format!(
                    "{at} refused the connection to database `{db}`: {}",
                    e.message()
                ),
            }
        }
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => format!(
            "connection refused by {host}:{port} (database `{db}`): is PostgreSQL running there? \
             Check the host and port in SWITCHBOARD_DATABASE_URL (`pg_isready -h {host} -p {port}` tells)"
        ),
        sqlx::Error::Io(io) if io.to_string().contains("lookup address") => format!(
            "unknown host `{host}` (port {port}, database `{db}`): the name does not resolve; \
             fix the host in SWITCHBOARD_DATABASE_URL"
        ),
        sqlx::Error::PoolTimedOut => format!(
            "no answer from {at} (database `{db}`) within 5 s: check the host, the port and any \
             firewall (`pg_isready -h {host} -p {port}`)"
        ),
        sqlx::Error::Tls(e) => format!(
            "TLS with {at} (database `{db}`) failed: {e}; check `sslmode` in SWITCHBOARD_DATABASE_URL"
        ),
        other => format!(
            "cannot connect to {at}, database `{db}`: {}",
            root_message(other)
        ),
    }
}

/// The innermost message of an error chain (sqlx repeats each cause in its own text).
fn root_message(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

impl Settings {
    pub fn from_args(args: ServeArgs) -> Result<Self, ConfigError> {
        let signing_keys = args
            .signing_keys
            .as_deref()
            .and_then(SigningKeys::parse)
            .ok_or(ConfigError::MissingSigningKey)?;
        let public_url = match args.public_url.map(|u| u.trim().to_owned()) {
            None => None,
            Some(u) if u.is_empty() => None,
            Some(u) if !(u.starts_with("https://") || u.starts_with("http://")) => {
                return Err(ConfigError::PublicUrlScheme(u));
            }
            Some(u) if u.contains('?') => return Err(ConfigError::PublicUrlQuery(u)),
            Some(u) => Some(u),
        };
        let (admin_token, admin_token_generated) = match args.admin_token {
            Some(t) if t.trim().is_empty() => return Err(ConfigError::EmptyAdminToken),
            Some(t) => (AdminToken::new(t.trim()), false),
            None => (AdminToken::generate(), true),
        };
        if args.max_body_bytes == 0 {
            return Err(ConfigError::ZeroBodyLimit);
        }
        check_workflows_dir(&args.engine.workflows)?;
        let trusted_proxies = args
            .trusted_proxies
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<ipnet::IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| ConfigError::TrustedProxy(p.to_owned()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if args.append_timeout.is_zero() {
            return Err(ConfigError::ZeroAppendTimeout);
        }
        let tolerance_secs = i64::try_from(args.timestamp_tolerance.as_secs()).unwrap_or(i64::MAX);
        Ok(Self {
            database_url: args.db.database_url,
            listen: args.listen,
            public_url,
            signing_keys,
            admin_token,
            admin_token_generated,
            workflows_dir: args.engine.workflows,
            tolerance: Tolerance {
                max_age_secs: tolerance_secs,
                max_future_secs: tolerance_secs,
            },
            max_body_bytes: args.max_body_bytes,
            shutdown_grace: args.engine.shutdown_grace,
            worker_concurrency: args.engine.worker_concurrency.max(1),
            metrics_listen: args.engine.metrics_listen,
            trusted_proxies,
            setup_cache_bytes: args.setup_cache_bytes,
            append_timeout: args.append_timeout,
            metrics_token: args
                .engine
                .metrics_token
                .as_deref()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(AdminToken::new),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Settings, ConfigError> {
        let mut full = vec!["switchboard", "serve"];
        full.extend_from_slice(args);
        match crate::cli::Cli::try_parse_from(full).unwrap().command {
            crate::cli::Command::Serve(a) => Settings::from_args(a),
            _ => unreachable!(),
        }
    }

    #[test]
    fn needs_a_signing_key_and_says_where_to_find_it() {
        // The test process must not carry the variable for this check.
        if std::env::var_os("SWITCHBOARD_SIGNING_KEYS").is_some() {
            eprintln!("skipped: SWITCHBOARD_SIGNING_KEYS is set in this environment");
            return;
        }
        let err = parse(&[]).unwrap_err().to_string();
        assert!(err.contains("Developers → Webhooks"), "{err}");
    }

    #[test]
    fn validates_public_url_and_tolerance() {
        let s = parse(&["--signing-keys", "k1,k2", "--timestamp-tolerance", "45s"]).unwrap();
        assert_eq!(s.signing_keys.len(), 2);
        assert_eq!(s.tolerance.max_age_secs, 45);
        assert!(s.admin_token_generated);
        assert!(matches!(
            parse(&["--signing-keys", "k", "--public-url", "ftp://x"]),
            Err(ConfigError::PublicUrlScheme(_))
        ));
        assert!(matches!(
            parse(&["--signing-keys", "k", "--public-url", "https://x/y?a=1"]),
            Err(ConfigError::PublicUrlQuery(_))
        ));
        let s = parse(&[
            "--signing-keys",
            "k",
            "--public-url",
            "https://x/y/",
            "--admin-token",
            "t",
        ])
        .unwrap();
        assert_eq!(s.public_url.as_deref(), Some("https://x/y/"));
        assert!(!s.admin_token_generated);
        let s = parse(&[
            "--signing-keys",
            "k",
            "--trusted-proxies",
            "10.0.0.0/8, 127.0.0.1,::1/128",
        ])
        .unwrap();
        assert_eq!(s.trusted_proxies.len(), 3);
        assert_eq!(s.setup_cache_bytes, 32 * 1024 * 1024);
        let err = parse(&["--signing-keys", "k", "--trusted-proxies", "10.0.0.0/33"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`10.0.0.0/33` is not an IP address or CIDR"),
            "{err}"
        );
    }

    #[test]
    fn listen_takes_host_names_and_says_what_form_it_wants() {
        assert_eq!(
            parse_listen("localhost:8080").unwrap(),
            "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(parse_listen("0.0.0.0:9").unwrap().to_string(), "0.0.0.0:9");
        let err = parse_listen("8080").unwrap_err();
        assert!(
            err.contains("has no port") && err.contains("HOST:PORT"),
            "{err}"
        );
        let err = parse_listen("localhost:http").unwrap_err();
        assert!(err.contains("IP:PORT or HOST:PORT"), "{err}");
    }

    #[test]
    fn sign_posts_where_serve_listens() {
        assert_eq!(
            local_webhook_url("127.0.0.1:9123"),
            "http://127.0.0.1:9123/webhooks/operator"
        );
        assert_eq!(
            local_webhook_url("0.0.0.0:8081"),
            "http://127.0.0.1:8081/webhooks/operator"
        );
        assert_eq!(
            local_webhook_url("localhost:8082"),
            "http://localhost:8082/webhooks/operator"
        );
    }

    #[test]
    fn postgres_connection_errors_name_the_failure_once() {
        let options =
            sqlx::postgres::PgConnectOptions::from_str("postgres://app@db.internal:5433/events")
                .unwrap();
        let lookup = sqlx::Error::Io(std::io::Error::other(
            "failed to lookup address information: Name or service not known",
        ));
        let m = pg_connect_message(&options, &lookup);
        assert!(m.starts_with("unknown host `db.internal`"), "{m}");
        let refused = sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into());
        let m = pg_connect_message(&options, &refused);
        assert!(
            m.starts_with("connection refused by db.internal:5433"),
            "{m}"
        );
        let m = pg_connect_message(&options, &sqlx::Error::PoolTimedOut);
        assert!(
            m.contains("no answer from PostgreSQL at db.internal:5433"),
            "{m}"
        );
    }

    #[test]
    fn sqlite_urls_need_a_path() {
        assert!(
            check_database_url("sqlite://")
                .unwrap_err()
                .contains("sqlite://./switchboard.db")
        );
        assert!(check_database_url("sqlite:").is_err());
        assert!(check_database_url("sqlite://switchboard.db").is_ok());
        assert!(check_database_url("sqlite://./switchboard.db").is_ok());
        assert!(check_database_url("sqlite::memory:").is_ok());
    }
}
