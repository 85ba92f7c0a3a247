//! Configuration of `switchboard serve`, parsed once from flags and
//! environment variables (see [`crate::cli`]) into [`Settings`], whose fields
//! are valid by construction. Errors say which variable is wrong and how to fix it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::api::AdminToken;
use crate::cli::ServeArgs;
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
    }
}
