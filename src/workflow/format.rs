//! The YAML format of a workflow file, as written (see README "Workflows").
//!
//! These types mirror the file one to one, reject unknown keys and keep the
//! position of every value that validation may complain about, so each
//! error can point at a line and column. [`super::compile`] turns them into
//! the checked [`super::Workflow`].

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use serde_json::Value;
use serde_saphyr::Spanned;

/// `one` or `[one, two]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    Many(Vec<T>),
    One(T),
}

impl<T> OneOrMany<T> {
    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Keeps an explicit `null` as `Some(Value::Null)` (absent stays `None`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowFile {
    pub name: Option<Spanned<String>>,
    pub description: Option<String>,
    pub on: TriggerSpec,
    pub when: Option<Spanned<String>>,
    #[serde(default)]
    pub secrets: Vec<Spanned<String>>,
    #[serde(default)]
    pub steps: Vec<StepSpec>,
    /// Setup workflows: time budget for the whole answer.
    pub deadline: Option<Spanned<String>>,
    /// Setup workflows: the answer (templates inside).
    pub respond: Option<Spanned<Value>>,
    /// Setup workflows: the answer when a step or template fails or the deadline passes.
    pub fallback: Option<Spanned<Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerSpec {
    pub event: Spanned<String>,
    pub status: Option<Spanned<OneOrMany<String>>>,
    pub field: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "present")]
    pub from: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub to: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    pub id: Spanned<String>,
    #[serde(rename = "if")]
    pub condition: Option<Spanned<String>>,
    pub http: HttpSpec,
    pub timeout: Option<Spanned<String>>,
    pub retry: Option<RetrySpec>,
    /// Setup lookups: cache the response for this long, keyed on the rendered request.
    pub cache: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    pub method: Option<Spanned<String>>,
    pub url: Spanned<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub query: BTreeMap<String, Spanned<String>>,
    pub json: Option<Spanned<Value>>,
    pub body: Option<Spanned<String>>,
    pub content_type: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    pub max_attempts: Option<Spanned<u32>>,
    pub backoff: Option<Spanned<String>>,
    pub initial_delay: Option<Spanned<String>>,
    pub max_delay: Option<Spanned<String>>,
}
