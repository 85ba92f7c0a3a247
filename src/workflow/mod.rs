//! Workflows: the YAML files under `SWITCHBOARD_WORKFLOWS` that say what to
//! do when an event arrives.
//!
//! [`format`] is the file as written, [`compile`] checks it into a
//! [`Workflow`] (with [`diagnostic`]s that point at line and column),
//! [`template`] is the template/expression language and [`matching`]
//! decides, for one event, whether a workflow runs and why not.

pub mod answer;
pub mod backtest;
pub mod compile;
pub mod diagnostic;
pub mod format;
pub mod lint;
pub mod matching;
pub mod registry;
pub mod template;
pub mod wait;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

pub use diagnostic::{Diagnostic, Severity};

/// When a workflow is considered.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Trigger {
    /// `conversation.ended`, optionally only for some statuses.
    Ended { statuses: Option<Vec<String>> },
    /// `conversation.custom_fields.updated` for one field; `from`/`to` are
    /// value lists (`null` in `from` means "was not set"); `None` means any.
    FieldChanged {
        field: String,
        from: Option<Vec<Value>>,
        to: Option<Vec<Value>>,
    },
    /// `conversation.setup`.
    Setup,
    /// Any other event type, by name.
    Event(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    /// `initial_delay × 2^(n-1)`, capped at `max_delay`, with full jitter.
    Exponential,
    /// `initial_delay` every time.
    Fixed,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub backoff: Backoff,
    #[serde(with = "duration_text")]
    pub initial_delay: Duration,
    #[serde(with = "duration_text")]
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff: Backoff::Exponential,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(600),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BodySpec {
    None,
    /// Any JSON; every string in it is a template.
    Json(Value),
    /// A text template sent with `content_type`.
    Text {
        template: String,
        content_type: String,
    },
}

/// The request a step sends, as templates.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HttpAction {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub query: Vec<(String, String)>,
    pub body: BodySpec,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Step {
    pub id: String,
    /// `if:` expression; false skips the step.
    pub condition: Option<String>,
    pub http: HttpAction,
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    pub retry: RetryPolicy,
    #[serde(skip)]
    pub cache: Option<Duration>,
    /// A `wait` / `wait_for` step (then `http` is unused); `None` for an HTTP step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait: Option<wait::WaitStep>,
}

/// A checked workflow.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Workflow {
    pub name: String,
    pub description: Option<String>,
    pub file: PathBuf,
    /// `on.event`.
    pub event: String,
    pub trigger: Trigger,
    pub when: Option<String>,
    /// Names of the environment variables the templates may read as `secrets.NAME`.
    pub secrets: Vec<String>,
    pub steps: Vec<Step>,
    #[serde(with = "duration_text")]
    pub deadline: Duration,
    pub respond: Option<Value>,
    pub fallback: Option<Value>,
    /// `order:`: whether this workflow's runs of one conversation run one after another (store/order.rs).
    pub order: wait::Order,
    /// The file's text.
    #[serde(skip)]
    pub source: String,
    /// The version's content address ([`compile::version_hash`]), set when compiled.
    #[serde(skip)]
    pub version: String,
}

mod duration_text {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// The workflows of a directory, in file-name order, with names unique.
#[derive(Clone, Debug, Default)]
pub struct WorkflowSet {
    pub dir: PathBuf,
    pub workflows: Vec<Workflow>,
    /// Warnings found while loading (errors make loading fail).
    pub warnings: Vec<Diagnostic>,
    /// `destinations.yaml` of the directory (issue 14); empty when there is none.
    pub destinations: std::sync::Arc<crate::destinations::Destinations>,
}

impl WorkflowSet {
    /// Loads and checks every `*.yaml` / `*.yml` in `dir` (not recursive).
    /// A missing directory is an empty set. Fails with every diagnostic if any file has an error.
    pub fn load(dir: &Path) -> Result<Self, Vec<Diagnostic>> {
        let mut files = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.is_file()
                        && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                })
                .collect::<Vec<_>>(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => {
                return Err(vec![Diagnostic::new(
                    Severity::Error,
                    dir,
                    "",
                    0,
                    0,
                    format!("cannot read the workflow directory: {e}"),
                )]);
            }
        };
        files.sort();
        let mut sources = Vec::new();
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => sources.push((file, text)),
                Err(e) => {
                    return Err(vec![Diagnostic::new(
                        Severity::Error,
                        &file,
                        "",
                        0,
                        0,
                        format!("cannot read: {e}"),
                    )]);
                }
            }
        }
        Self::from_sources(dir, sources)
    }

    /// Checks workflows given as (file, text) pairs.
    pub fn from_sources(
        dir: &Path,
        sources: Vec<(PathBuf, String)>,
    ) -> Result<Self, Vec<Diagnostic>> {
        let mut diagnostics = Vec::new();
        let mut workflows: Vec<Workflow> = Vec::new();
        let mut names: HashMap<String, PathBuf> = HashMap::new();
        let mut destinations = crate::destinations::Destinations::default();
        for (file, text) in sources {
            // Destinations (issue 14): `destinations.yaml` is not a workflow.
            if crate::destinations::is_destinations_file(&file) {
                match crate::destinations::format::compile(&file, &text) {
                    Ok(d) => {
                        diagnostics.extend(d.warnings.iter().cloned());
                        destinations = d;
                    }
                    Err(d) => diagnostics.extend(d),
                }
                continue;
            }
            match compile::compile(&file, &text) {
                Ok((wf, warnings)) => {
                    diagnostics.extend(warnings);
                    if let Some(other) = names.get(&wf.name) {
                        let line = text
                            .lines()
                            .position(|l| l.trim_start().starts_with("name:"))
                            .map_or(0, |i| i + 1);
                        diagnostics.push(
                            Diagnostic::new(
                                Severity::Error,
                                &file,
                                &text,
                                line,
                                1,
                                format!(
                                    "workflow name `{}` is already used by {}",
                                    wf.name,
                                    other.display()
                                ),
                            )
                            .help("workflow names must be unique; set `name:` or rename the file"),
                        );
                        continue;
                    }
                    names.insert(wf.name.clone(), file.clone());
                    workflows.push(wf);
                }
                Err(d) => diagnostics.extend(d),
            }
        }
        if diagnostics.iter().any(Diagnostic::is_error) {
            return Err(diagnostics);
        }
        Ok(Self {
            dir: dir.to_owned(),
            workflows,
            warnings: diagnostics,
            destinations: std::sync::Arc::new(destinations),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Workflow> {
        self.workflows.iter().find(|w| w.name == name)
    }
}

#[cfg(test)]
mod tests;
