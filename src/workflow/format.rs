//! The YAML format of a workflow file, as written (see README "Workflows").
//!
//! These types mirror the file one to one and keep the position of every
//! value that validation may complain about, so each error can point at a
//! line and column. Unknown keys are found by a lenient first pass over the
//! whole tree ([`Node`], [`unknown_keys`]), so every one of them is reported,
//! not only the first. [`super::compile`] turns them into
//! the checked [`super::Workflow`].

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer};
use serde_json::Value;
use serde_saphyr::Spanned;

use super::diagnostic::{Diagnostic, Severity};
use super::lint::did_you_mean;

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
    /// `conversation` (default) or `none` (see [`super::wait::Order`]).
    pub order: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
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
pub struct StepSpec {
    pub id: Spanned<String>,
    #[serde(rename = "if")]
    pub condition: Option<Spanned<String>>,
    /// One of `http`, `wait`, `wait_for` (checked by the compiler).
    pub http: Option<HttpSpec>,
    /// `wait: 1h`: a durable pause.
    pub wait: Option<Spanned<String>>,
    /// `wait_for:`: a durable wait for a later event of the conversation.
    pub wait_for: Option<Spanned<WaitForSpec>>,
    pub timeout: Option<Spanned<String>>,
    pub retry: Option<RetrySpec>,
    /// Setup lookups: cache the response for this long, keyed on the rendered request.
    pub cache: Option<Spanned<String>>,
}

/// `wait_for:` as written.
#[derive(Debug, Deserialize)]
pub struct WaitForSpec {
    pub event: Option<Spanned<String>>,
    pub status: Option<Spanned<OneOrMany<String>>>,
    pub field: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "present")]
    pub from: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub to: Option<Value>,
    pub when: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
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
pub struct RetrySpec {
    pub max_attempts: Option<Spanned<u32>>,
    pub backoff: Option<Spanned<String>>,
    pub initial_delay: Option<Spanned<String>>,
    pub max_delay: Option<Spanned<String>>,
}

/// A YAML document as a tree that keeps the position of every mapping key:
/// the lenient first pass that finds every unknown key of a file (the typed
/// pass would stop at the first).
#[derive(Debug)]
pub enum Node {
    Map(Vec<(Spanned<String>, Node)>),
    Seq(Vec<Node>),
    Scalar,
}

/// A mapping key as text, whatever scalar it is.
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Asked for a string, so `on` stays `on` (not YAML 1.1's `true`).
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping key")
            }
            fn visit_str<E>(self, s: &str) -> Result<KeyText, E> {
                Ok(KeyText(s.to_owned()))
            }
            fn visit_bool<E>(self, b: bool) -> Result<KeyText, E> {
                Ok(KeyText(b.to_string()))
            }
            fn visit_i64<E>(self, n: i64) -> Result<KeyText, E> {
                Ok(KeyText(n.to_string()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<KeyText, E> {
                Ok(KeyText(n.to_string()))
            }
            fn visit_f64<E>(self, n: f64) -> Result<KeyText, E> {
                Ok(KeyText(n.to_string()))
            }
            fn visit_unit<E>(self) -> Result<KeyText, E> {
                Ok(KeyText("null".into()))
            }
        }
        d.deserialize_string(V)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_i128<E>(self, _: i128) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_u128<E>(self, _: u128) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_str<E>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_bytes<E>(self, _: &[u8]) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(n) = a.next_element::<Node>()? {
                    items.push(n);
                }
                Ok(Node::Seq(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(k) = a.next_key::<Spanned<KeyText>>()? {
                    let v = a.next_value::<Node>()?;
                    entries.push((Spanned::new(k.value.0, k.referenced, k.defined), v));
                }
                Ok(Node::Map(entries))
            }
        }
        d.deserialize_any(V)
    }
}

/// The keys each part of a workflow file may have (the typed structs above, as lists).
pub const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "on",
    "when",
    "secrets",
    "steps",
    "deadline",
    "respond",
    "fallback",
    "order",
];
pub const ON_KEYS: &[&str] = &["event", "status", "field", "from", "to"];
pub const STEP_KEYS: &[&str] = &[
    "id", "if", "http", "wait", "wait_for", "timeout", "retry", "cache",
];
pub const WAIT_FOR_KEYS: &[&str] = &["event", "status", "field", "from", "to", "when", "timeout"];
pub const HTTP_KEYS: &[&str] = &[
    "method",
    "url",
    "headers",
    "query",
    "json",
    "body",
    "content_type",
];
pub const RETRY_KEYS: &[&str] = &["max_attempts", "backoff", "initial_delay", "max_delay"];

/// A key that is not part of the format: the key, the part of the file it
/// is in, and the keys allowed there.
pub type UnknownKey<'n> = (&'n Spanned<String>, &'static str, &'static [&'static str]);

/// The entries of the mapping `node` whose keys `allowed` lists; every
/// other key is added to `out`, as unknown in `part`. Nothing for a non-mapping.
pub fn known_entries<'n>(
    node: &'n Node,
    part: &'static str,
    allowed: &'static [&'static str],
    out: &mut Vec<UnknownKey<'n>>,
) -> Vec<(&'n str, &'n Node)> {
    let Node::Map(entries) = node else {
        return Vec::new();
    };
    let mut known = Vec::new();
    for (k, v) in entries {
        if allowed.contains(&k.value.as_str()) {
            known.push((k.value.as_str(), v));
        } else {
            out.push((k, part, allowed));
        }
    }
    known
}

/// One error per unknown key, at the key: the keys allowed there, and a
/// "did you mean" when one is close, else `listed` (where the keys are documented).
pub fn unknown_key_errors(
    file: &Path,
    source: &str,
    unknown: &[UnknownKey<'_>],
    listed: &str,
) -> Vec<Diagnostic> {
    unknown
        .iter()
        .map(|(key, part, allowed)| {
            let message = format!(
                "unknown field `{}` in {part}, expected one of {}",
                key.value,
                allowed
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let help = match did_you_mean(&key.value, allowed.iter().copied()) {
                Some(k) => format!("did you mean `{k}`?"),
                None => listed.to_owned(),
            };
            Diagnostic::new(
                Severity::Error,
                file,
                source,
                key.referenced.line() as usize,
                key.referenced.column() as usize,
                message,
            )
            .help(help)
        })
        .collect()
}

/// Every key of the tree that is not part of the format.
pub fn unknown_keys(root: &Node) -> Vec<UnknownKey<'_>> {
    let mut out = Vec::new();
    for (k, v) in known_entries(root, "the workflow", TOP_KEYS, &mut out) {
        match k {
            "on" => {
                known_entries(v, "`on`", ON_KEYS, &mut out);
            }
            "steps" => {
                let Node::Seq(steps) = v else { continue };
                for step in steps {
                    for (k, v) in known_entries(step, "a step", STEP_KEYS, &mut out) {
                        match k {
                            "http" => {
                                known_entries(v, "`http`", HTTP_KEYS, &mut out);
                            }
                            "retry" => {
                                known_entries(v, "`retry`", RETRY_KEYS, &mut out);
                            }
                            "wait_for" => {
                                known_entries(v, "`wait_for`", WAIT_FOR_KEYS, &mut out);
                            }
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}
