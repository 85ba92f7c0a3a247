//! From a parsed [`WorkflowFile`] to a checked [`Workflow`]: every rule of
//! the format is enforced here, each failure as a [`Diagnostic`] pointing at
//! the value at fault.

use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use regex::Regex;
use serde_json::Value;
use serde_saphyr::{Location, Spanned};

/// A 1-based position in the file.
#[derive(Clone, Copy, Debug)]
struct Pos {
    line: usize,
    column: usize,
}

fn pos(l: &Location) -> Pos {
    Pos {
        line: l.line() as usize,
        column: l.column() as usize,
    }
}

use super::diagnostic::{Diagnostic, Severity};
use super::format::{self, HttpSpec, StepSpec, WorkflowFile};
use super::wait::{Order, WaitFor, WaitStep};
use super::{Backoff, BodySpec, HttpAction, RetryPolicy, Step, Trigger, Workflow};
use super::{lint, template};
use crate::webhook::envelope::{ENDED_STATUSES, EventKind};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_DEADLINE: Duration = Duration::from_secs(2);

struct Checker<'a> {
    file: &'a Path,
    source: &'a str,
    out: Vec<Diagnostic>,
    /// A `conversation.setup` workflow (answers inline: no `run`).
    is_setup: bool,
    /// A `conversation.custom_fields.updated` workflow (templates see `change`).
    has_change: bool,
}

/// Where a template or expression is used, which decides the roots it can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// `when:`, decided before any step runs.
    When,
    /// A step's `if:` and request templates.
    Step,
    /// A setup answer (`respond`, `fallback`).
    Answer,
}

impl Checker<'_> {
    fn at(&mut self, loc: Pos, severity: Severity, message: impl Into<String>) -> &mut Diagnostic {
        let d = Diagnostic::new(
            severity,
            self.file,
            self.source,
            loc.line,
            loc.column,
            message,
        );
        self.out.push(d);
        self.out.last_mut().expect("just pushed")
    }

    fn error(&mut self, loc: Pos, message: impl Into<String>) -> &mut Diagnostic {
        self.at(loc, Severity::Error, message)
    }

    fn duration(
        &mut self,
        spec: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
    ) -> Duration {
        let Some(s) = spec else { return default };
        match humantime::parse_duration(s.value.trim()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.error(
                    pos(&s.referenced),
                    format!("`{field}` must be longer than zero"),
                );
                default
            }
            Err(e) => {
                self.error(
                    pos(&s.referenced),
                    format!("`{field}`: `{}` is not a duration ({e})", s.value),
                )
                .help = Some("write a number and a unit: 500ms, 10s, 5m, 1h".into());
                default
            }
        }
    }

    fn expression(&mut self, spec: &Spanned<String>, field: &str, scope: Scope) {
        if let Err(e) = template::check_expression(&spec.value) {
            self.error(
                pos(&spec.referenced),
                format!("`{field}` does not compile: {}", e.message),
            )
            .help = Some(
                "expressions use minijinja syntax, e.g. event.payload.status == \"completed\""
                    .into(),
            );
            return;
        }
        let findings = lint::check_expression(&spec.value, &self.roots(scope));
        self.findings(findings, pos(&spec.referenced), field);
    }

    fn template(&mut self, text: &str, loc: Pos, field: &str, refs: &Refs<'_>, scope: Scope) {
        if let Err(e) = template::check_template(text) {
            self.error(loc, format!("`{field}` does not compile: {}", e.message))
                .help = Some("templates use minijinja syntax: {{ event.conversation_id }}".into());
            return;
        }
        let findings = lint::check_template(text, &self.roots(scope));
        self.findings(findings, loc, field);
        self.references(text, loc, field, refs);
    }

    /// The root variables a template can read in `scope` of this workflow.
    fn roots(&self, scope: Scope) -> lint::Roots {
        let mut roots = lint::Roots {
            allowed: vec!["event", "conversation"],
            ..Default::default()
        };
        if self.has_change {
            roots.allowed.push("change");
        } else {
            roots.unavailable.push((
                "change",
                "it is only set in workflows on conversation.custom_fields.updated".into(),
            ));
        }
        let later = |name: &str| match scope {
            Scope::When => Some(format!(
                "`when` is decided before any step runs; it reads only event, conversation{} (use a step's `if:` for {name})",
                if self.has_change { " and change" } else { "" }
            )),
            _ => None,
        };
        for name in ["steps", "secrets"] {
            match later(name) {
                Some(why) => roots.unavailable.push((name, why)),
                None => roots.allowed.push(name),
            }
        }
        if let Some(why) = later("run") {
            roots.unavailable.push(("run", why));
        } else if self.is_setup {
            roots.unavailable.push((
                "run",
                "a conversation.setup workflow answers inline, without a run".into(),
            ));
        } else {
            roots.allowed.push("run");
        }
        roots
    }

    /// Reports the unknown names of a template that starts at `loc` in the file.
    fn findings(&mut self, findings: Vec<lint::Finding>, loc: Pos, field: &str) {
        for f in findings {
            let at = self
                .exact(loc, f.line, f.column, &f.name)
                .unwrap_or_else(|| self.locate(loc, f.line, &f.name));
            self.error(at, format!("`{field}`: {}", f.message)).help = f.help;
        }
    }

    /// Where a template position falls in the file when the template is a
    /// one-line scalar starting at `loc` (plain or quoted, no escapes before it),
    /// if `name` is indeed written there.
    fn exact(&self, loc: Pos, line: usize, column: usize, name: &str) -> Option<Pos> {
        if line != 1 {
            return None;
        }
        let text = self.source.lines().nth(loc.line.checked_sub(1)?)?;
        let chars: Vec<char> = text.chars().collect();
        let start = loc.column.checked_sub(1)?;
        let quoted = matches!(chars.get(start), Some('"' | '\''));
        let at = start + usize::from(quoted) + column - 1;
        let found: String = chars.get(at..at + name.chars().count())?.iter().collect();
        (found == name).then_some(Pos {
            line: loc.line,
            column: at + 1,
        })
    }

    /// Finds `name` (as a word) in the file at or after the template's start, on
    /// the template's `line` or later; `loc` itself when it cannot be found.
    fn locate(&self, loc: Pos, line: usize, name: &str) -> Pos {
        let Ok(word) = Regex::new(&format!(r"\b{}\b", regex::escape(name))) else {
            return loc;
        };
        let first = loc.line + line.saturating_sub(1);
        for (i, text) in self
            .source
            .lines()
            .enumerate()
            .skip(first.saturating_sub(1))
            .take(200)
        {
            let from = if i + 1 == loc.line {
                text.char_indices()
                    .nth(loc.column.saturating_sub(1))
                    .map_or(text.len(), |(b, _)| b)
            } else {
                0
            };
            if let Some(m) = word.find_at(text, from) {
                return Pos {
                    line: i + 1,
                    column: text[..m.start()].chars().count() + 1,
                };
            }
        }
        loc
    }

    /// Checks `steps.X` names an earlier step and `secrets.X` a declared secret.
    fn references(&mut self, text: &str, loc: Pos, field: &str, refs: &Refs<'_>) {
        for (kind, name) in referenced_names(text) {
            match kind {
                "steps" if !refs.earlier_steps.contains(name) => {
                    let msg = if refs.all_steps.contains(name) {
                        format!(
                            "`{field}` uses steps.{name}, which runs later; a step can only read steps before it"
                        )
                    } else {
                        format!("`{field}` uses steps.{name}, but no step has id `{name}`")
                    };
                    self.error(loc, msg);
                }
                "secrets" if !refs.secrets.contains(name) => {
                    self.error(
                        loc,
                        format!("`{field}` uses secrets.{name}, which is not declared"),
                    )
                    .help = Some(format!("add `{name}` to the workflow's `secrets:` list"));
                }
                _ => {}
            }
        }
    }

    /// Locates a string inside the file, for values whose position the parser does not keep.
    fn find(&self, near: Pos, needle: &str) -> Pos {
        let start_line = near.line.max(1);
        for (i, line) in self.source.lines().enumerate().skip(start_line - 1) {
            if let Some(col) = line.find(needle) {
                return Pos {
                    line: i + 1,
                    column: line[..col].chars().count() + 1,
                };
            }
        }
        near
    }
}

struct Refs<'a> {
    earlier_steps: HashSet<&'a str>,
    all_steps: &'a HashSet<&'a str>,
    secrets: &'a HashSet<&'a str>,
}

fn reference_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r#"\b(steps|secrets)(?:\.([A-Za-z_][A-Za-z0-9_]*)|\[\s*["']([^"']+)["']\s*\])"#)
            .expect("valid regex")
    })
}

/// `(steps|secrets, name)` for every reference in a template or expression.
pub fn referenced_names(text: &str) -> Vec<(&str, &str)> {
    reference_pattern()
        .captures_iter(text)
        .filter_map(|c| {
            let kind = c.get(1)?.as_str();
            let name = c.get(2).or_else(|| c.get(3))?.as_str();
            Some((kind, name))
        })
        .collect()
}

fn parse_error(file: &Path, source: &str, e: &serde_saphyr::Error) -> Diagnostic {
    let (line, column) = e
        .location()
        .map(|l| (l.line() as usize, l.column() as usize))
        .unwrap_or((0, 0));
    // The parser's message may carry its own position and snippet; keep its first line.
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("invalid YAML");
    static PREFIX: OnceLock<Regex> = OnceLock::new();
    let prefix = PREFIX
        .get_or_init(|| Regex::new(r"^(error: )?(line \d+ column \d+: )?").expect("valid regex"));
    let first = prefix.replace(first, "").into_owned();
    Diagnostic::new(Severity::Error, file, source, line, column, first)
}

/// Parses and checks one workflow file. On success returns the workflow and its warnings;
/// otherwise every diagnostic (errors and warnings).
pub fn compile(file: &Path, source: &str) -> Result<(Workflow, Vec<Diagnostic>), Vec<Diagnostic>> {
    // First pass: the tree as it is, for every unknown key with its position.
    let tree: format::Node =
        serde_saphyr::from_str(source).map_err(|e| vec![parse_error(file, source, &e)])?;
    let mut c = Checker {
        file,
        source,
        out: Vec::new(),
        is_setup: false,
        has_change: false,
    };
    c.out.extend(format::unknown_key_errors(
        file,
        source,
        &format::unknown_keys(&tree),
        "the keys a workflow may use are listed in README \"Workflows\" and workflows/workflow.schema.json",
    ));
    // Second pass: the typed file (unknown keys ignored: reported above).
    let spec: WorkflowFile = match serde_saphyr::from_str(source) {
        Ok(spec) => spec,
        Err(e) => {
            c.out.push(parse_error(file, source, &e));
            return Err(c.out);
        }
    };
    let mut workflow = check(&mut c, spec);
    workflow.version = version_hash(&workflow.name, source);
    if c.out.iter().any(Diagnostic::is_error) {
        Err(c.out)
    } else {
        Ok((workflow, c.out))
    }
}

fn check(c: &mut Checker<'_>, spec: WorkflowFile) -> Workflow {
    let name = match &spec.name {
        Some(n) if n.value.trim().is_empty() => {
            c.error(pos(&n.referenced), "`name` must not be empty");
            String::new()
        }
        Some(n) => n.value.trim().to_owned(),
        None => c
            .file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let event = spec.on.event.value.trim().to_owned();
    let is_setup = event == EventKind::SETUP;
    c.is_setup = is_setup;
    c.has_change = event == EventKind::CUSTOM_FIELDS_UPDATED;
    let trigger = check_trigger(c, &spec, &event);

    if let Some(w) = &spec.when {
        c.expression(w, "when", Scope::When);
    }
    let mut secrets = HashSet::new();
    for s in &spec.secrets {
        if !secrets.insert(s.value.as_str()) {
            c.at(
                pos(&s.referenced),
                Severity::Warning,
                format!("secret `{}` is declared twice", s.value),
            );
        }
        if std::env::var_os(&s.value).is_none() {
            c.at(
                pos(&s.referenced),
                Severity::Warning,
                format!(
                    "secret `{}` is declared but the environment variable {} is not set here",
                    s.value, s.value
                ),
            )
            .help = Some(
                "steps that read it will fail until it is set in the server's environment".into(),
            );
        }
    }
    let all_steps: HashSet<&str> = spec.steps.iter().map(|s| s.id.value.as_str()).collect();
    let mut seen = HashSet::new();
    let mut steps = Vec::new();
    for step in &spec.steps {
        let id = step.id.value.trim();
        if id.is_empty() {
            c.error(pos(&step.id.referenced), "step `id` must not be empty");
        } else if !seen.insert(id) {
            c.error(
                pos(&step.id.referenced),
                format!("step id `{id}` is used twice"),
            )
            .help = Some("give every step of a workflow its own id".into());
        }
        let refs = Refs {
            earlier_steps: seen.iter().copied().filter(|s| *s != id).collect(),
            all_steps: &all_steps,
            secrets: &secrets,
        };
        steps.push(check_step(c, step, &refs, is_setup));
    }
    let deadline = c.duration(&spec.deadline, "deadline", DEFAULT_DEADLINE);
    let refs_all = Refs {
        earlier_steps: all_steps.clone(),
        all_steps: &all_steps,
        secrets: &secrets,
    };
    for (field, value) in [("respond", &spec.respond), ("fallback", &spec.fallback)] {
        let Some(v) = value else { continue };
        if !is_setup {
            c.error(
                pos(&v.referenced),
                format!("`{field}` is only for `on: {{event: conversation.setup}}` workflows"),
            )
            .help = Some("other events are answered at once; use steps to act on them".into());
            continue;
        }
        check_answer(c, field, v, &refs_all);
    }
    if let Some(d) = &spec.deadline {
        if !is_setup {
            c.at(
                pos(&d.referenced),
                Severity::Warning,
                "`deadline` only applies to conversation.setup workflows",
            );
        }
        for (step, spec_step) in steps.iter().zip(&spec.steps) {
            if step.timeout >= deadline {
                let loc = spec_step
                    .timeout
                    .as_ref()
                    .map(|t| pos(&t.referenced))
                    .unwrap_or(pos(&spec_step.id.referenced));
                c.at(
                    loc,
                    Severity::Warning,
                    format!(
                        "step `{}` may take {} but the deadline is {}: the fallback answers before it can finish",
                        step.id,
                        humantime::format_duration(step.timeout),
                        humantime::format_duration(deadline)
                    ),
                );
            }
        }
    }
    let mut secret_names: Vec<String> = spec.secrets.iter().map(|s| s.value.clone()).collect();
    secret_names.dedup();
    Workflow {
        name,
        description: spec.description,
        file: c.file.to_owned(),
        event,
        trigger,
        when: spec.when.map(|w| w.value),
        secrets: secret_names,
        steps,
        deadline,
        respond: spec.respond.map(|r| r.value),
        fallback: spec.fallback.map(|f| f.value),
        order: check_order(c, &spec.order),
        source: c.source.to_owned(),
        version: String::new(),
    }
}

/// The content address of a workflow: sha256 (hex) of its name and its YAML
/// normalised (parsed and written back as compact JSON with sorted keys), so
/// comments, whitespace, quoting and key order do not make a new version.
pub fn version_hash(name: &str, source: &str) -> String {
    use sha2::Digest;
    let normalised = serde_saphyr::from_str::<serde_json::Value>(source)
        .map(|v| canonical_json(&v))
        .unwrap_or_else(|_| source.to_owned());
    let mut h = sha2::Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update(normalised.as_bytes());
    hex::encode(h.finalize())
}

/// JSON with object keys sorted at every level (whatever serde_json's map order is).
fn canonical_json(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical_json(&m[k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical_json).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

fn check_trigger(c: &mut Checker<'_>, spec: &WorkflowFile, event: &str) -> Trigger {
    let on = &spec.on;
    if event.is_empty() {
        c.error(
            pos(&on.event.referenced),
            "`on.event` must name an event type",
        );
    }
    let known = [
        EventKind::SETUP,
        EventKind::ENDED,
        EventKind::CUSTOM_FIELDS_UPDATED,
    ];
    if !event.is_empty() && !known.contains(&event) {
        c.at(
            pos(&on.event.referenced),
            Severity::Warning,
            format!(
                "`{event}` is not an event type Operator is known to send ({})",
                known.join(", ")
            ),
        );
    }
    if let Some(s) = &on.status
        && event != EventKind::ENDED
    {
        c.error(
            pos(&s.referenced),
            "`on.status` only applies to conversation.ended",
        );
    }
    if event != EventKind::CUSTOM_FIELDS_UPDATED {
        if let Some(f) = &on.field {
            c.error(
                pos(&f.referenced),
                "`on.field` only applies to conversation.custom_fields.updated",
            );
        }
        if on.from.is_some() || on.to.is_some() {
            let loc = c.find(
                pos(&on.event.referenced),
                if on.from.is_some() { "from:" } else { "to:" },
            );
            c.error(
                loc,
                "`on.from` / `on.to` only apply to conversation.custom_fields.updated",
            );
        }
    }
    match event {
        EventKind::ENDED => {
            let statuses = on.status.as_ref().map(|s| s.value.clone().into_vec());
            if let (Some(list), Some(s)) = (&statuses, &on.status) {
                for st in list {
                    if !ENDED_STATUSES.contains(&st.as_str()) {
                        c.error(
                            pos(&s.referenced),
                            format!("`{st}` is not a conversation.ended status"),
                        )
                        .help = Some(format!("use one or more of: {}", ENDED_STATUSES.join(", ")));
                    }
                }
                if list.is_empty() {
                    c.error(
                        pos(&s.referenced),
                        "`on.status` is an empty list: the workflow could never run",
                    );
                }
            }
            Trigger::Ended { statuses }
        }
        EventKind::CUSTOM_FIELDS_UPDATED => {
            let field = match &on.field {
                Some(f) if !f.value.trim().is_empty() => f.value.trim().to_owned(),
                _ => {
                    c.error(pos(&on.event.referenced), "conversation.custom_fields.updated needs `on.field`: the custom field to watch")
                        .help = Some("add `field: <name>` under `on:`".into());
                    String::new()
                }
            };
            let list = |v: &Option<Value>| {
                v.as_ref().map(|v| match v {
                    Value::Array(items) => items.clone(),
                    other => vec![other.clone()],
                })
            };
            Trigger::FieldChanged {
                field,
                from: list(&on.from),
                to: list(&on.to),
            }
        }
        EventKind::SETUP => Trigger::Setup,
        other => Trigger::Event(other.to_owned()),
    }
}

fn check_answer(c: &mut Checker<'_>, field: &str, v: &Spanned<Value>, refs: &Refs<'_>) {
    match &v.value {
        Value::Object(map) => {
            for key in map.keys() {
                if key != "context" && key != "override_config" {
                    let loc = c.find(pos(&v.referenced), key);
                    c.error(
                        loc,
                        format!("`{field}.{key}` is not part of a setup answer"),
                    )
                    .help = Some(
                        "a setup answer has `context` and optionally `override_config`".into(),
                    );
                }
            }
            for key in ["context", "override_config"] {
                if let Some(inner) = map.get(key)
                    && !inner.is_object()
                {
                    let loc = c.find(pos(&v.referenced), key);
                    c.error(loc, format!("`{field}.{key}` must be a mapping"));
                }
            }
            let mut strings = Vec::new();
            template::strings_in(&v.value, &mut strings);
            for s in strings {
                let loc = c.find(pos(&v.referenced), s.lines().next().unwrap_or(&s));
                c.template(&s, loc, field, refs, Scope::Answer);
            }
        }
        _ => {
            c.error(
                pos(&v.referenced),
                format!("`{field}` must be a mapping with `context`"),
            );
        }
    }
}

fn check_step(c: &mut Checker<'_>, step: &StepSpec, refs: &Refs<'_>, is_setup: bool) -> Step {
    let id = step.id.value.trim().to_owned();
    if let Some(cond) = &step.condition {
        c.expression(cond, "if", Scope::Step);
        c.references(&cond.value, pos(&cond.referenced), "if", refs);
    }
    // A step is one of `http`, `wait`, `wait_for` (durable waits: see super::wait).
    let wait = check_wait_kind(c, step, refs, is_setup);
    let http = match &step.http {
        Some(h) => check_http(c, h, refs),
        None => HttpAction {
            method: "POST".into(),
            url: String::new(),
            headers: vec![],
            query: vec![],
            body: BodySpec::None,
        },
    };
    let timeout = c.duration(&step.timeout, "timeout", DEFAULT_TIMEOUT);
    let retry = match &step.retry {
        None => RetryPolicy::default(),
        Some(r) => {
            let mut policy = RetryPolicy::default();
            if let Some(m) = &r.max_attempts {
                if m.value == 0 {
                    c.error(
                        pos(&m.referenced),
                        "`retry.max_attempts` counts the first attempt: it must be at least 1",
                    );
                }
                policy.max_attempts = m.value.max(1);
            }
            if let Some(b) = &r.backoff {
                policy.backoff = match b.value.as_str() {
                    "exponential" => Backoff::Exponential,
                    "fixed" => Backoff::Fixed,
                    other => {
                        c.error(
                            pos(&b.referenced),
                            format!("`retry.backoff` is `{other}`; use `exponential` or `fixed`"),
                        );
                        Backoff::Exponential
                    }
                };
            }
            policy.initial_delay = c.duration(
                &r.initial_delay,
                "retry.initial_delay",
                policy.initial_delay,
            );
            policy.max_delay = c.duration(&r.max_delay, "retry.max_delay", policy.max_delay);
            if policy.initial_delay > policy.max_delay {
                let loc = r
                    .max_delay
                    .as_ref()
                    .map(|d| pos(&d.referenced))
                    .unwrap_or(pos(&step.id.referenced));
                c.error(
                    loc,
                    "`retry.max_delay` is shorter than `retry.initial_delay`",
                );
            }
            policy
        }
    };
    let cache = step
        .cache
        .as_ref()
        .map(|_| c.duration(&step.cache, "cache", Duration::ZERO));
    if let Some(cache_spec) = &step.cache
        && !is_setup
    {
        c.at(
            pos(&cache_spec.referenced),
            Severity::Warning,
            "`cache` only applies to conversation.setup lookups",
        );
    }
    Step {
        id,
        condition: step.condition.as_ref().map(|c| c.value.clone()),
        http,
        timeout,
        retry,
        cache,
        wait,
    }
}

fn check_http(c: &mut Checker<'_>, http: &HttpSpec, refs: &Refs<'_>) -> HttpAction {
    let method = match &http.method {
        None => "POST".to_owned(),
        Some(m) => {
            let upper = m.value.trim().to_ascii_uppercase();
            if !["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
                .contains(&upper.as_str())
            {
                c.error(
                    pos(&m.referenced),
                    format!("`http.method` `{}` is not an HTTP method", m.value),
                )
                .help = Some("use GET, POST, PUT, PATCH or DELETE".into());
            }
            upper
        }
    };
    c.template(
        &http.url.value,
        pos(&http.url.referenced),
        "http.url",
        refs,
        Scope::Step,
    );
    let url_literal = http.url.value.trim_start();
    if !url_literal.starts_with("http://")
        && !url_literal.starts_with("https://")
        && !url_literal.starts_with("{{")
    {
        c.error(
            pos(&http.url.referenced),
            "`http.url` must start with http:// or https://",
        );
    }
    for (k, v) in &http.headers {
        c.template(
            &v.value,
            pos(&v.referenced),
            &format!("http.headers.{k}"),
            refs,
            Scope::Step,
        );
    }
    for (k, v) in &http.query {
        c.template(
            &v.value,
            pos(&v.referenced),
            &format!("http.query.{k}"),
            refs,
            Scope::Step,
        );
    }
    let body = match (&http.json, &http.body) {
        (Some(_), Some(b)) => {
            c.error(
                pos(&b.referenced),
                "a step has either `http.json` or `http.body`, not both",
            );
            BodySpec::None
        }
        (Some(j), None) => {
            let mut strings = Vec::new();
            template::strings_in(&j.value, &mut strings);
            for s in strings {
                let loc = c.find(pos(&j.referenced), s.lines().next().unwrap_or(&s));
                c.template(&s, loc, "http.json", refs, Scope::Step);
            }
            BodySpec::Json(j.value.clone())
        }
        (None, Some(b)) => {
            c.template(&b.value, pos(&b.referenced), "http.body", refs, Scope::Step);
            BodySpec::Text {
                template: b.value.clone(),
                content_type: http
                    .content_type
                    .clone()
                    .unwrap_or_else(|| "text/plain; charset=utf-8".into()),
            }
        }
        (None, None) => BodySpec::None,
    };
    HttpAction {
        method,
        url: http.url.value.clone(),
        headers: http
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect(),
        query: http
            .query
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect(),
        body,
    }
}

/// `order:`: `conversation` (the default) or `none`.
fn check_order(c: &mut Checker<'_>, spec: &Option<Spanned<String>>) -> Order {
    match spec.as_ref().map(|o| (o, o.value.trim())) {
        None | Some((_, "conversation")) => Order::Conversation,
        Some((_, "none")) => Order::None,
        Some((o, other)) => {
            c.error(
                pos(&o.referenced),
                format!("`order` is `{other}`; use `conversation` or `none`"),
            )
            .help = Some(
                "`conversation` (the default) runs one conversation's runs one after another; `none` lets them overlap"
                    .into(),
            );
            Order::Conversation
        }
    }
}

/// Which kind a step is: `None` for `http`, else the checked `wait` / `wait_for`.
fn check_wait_kind(
    c: &mut Checker<'_>,
    step: &StepSpec,
    refs: &Refs<'_>,
    is_setup: bool,
) -> Option<WaitStep> {
    let id = step.id.value.trim();
    let kinds = [
        step.http.is_some(),
        step.wait.is_some(),
        step.wait_for.is_some(),
    ];
    let n = kinds.iter().filter(|k| **k).count();
    if n == 0 {
        c.error(
            pos(&step.id.referenced),
            format!("step `{id}` does nothing: it needs `http`, `wait` or `wait_for`"),
        )
        .help = Some("add `http: {url: ...}` to send a request, `wait: 1h` to pause, or `wait_for: {event: ..., timeout: 24h}`".into());
        return None;
    }
    if n > 1 {
        c.error(
            pos(&step.id.referenced),
            format!(
                "step `{id}` has more than one of `http`, `wait`, `wait_for`; a step does one thing"
            ),
        )
        .help = Some("split it into steps of their own".into());
    }
    if step.http.is_some() {
        return None;
    }
    let here = step
        .wait
        .as_ref()
        .map(|w| pos(&w.referenced))
        .or_else(|| step.wait_for.as_ref().map(|w| pos(&w.referenced)))
        .unwrap_or(pos(&step.id.referenced));
    if is_setup {
        c.error(
            here,
            "a conversation.setup workflow answers inline, within its deadline: it cannot wait",
        );
    }
    if let Some(t) = &step.timeout {
        c.error(
            pos(&t.referenced),
            "a step's `timeout` applies to `http` steps; a `wait_for` has its own `wait_for.timeout`",
        );
    }
    if step.retry.is_some() {
        let loc = c.find(pos(&step.id.referenced), "retry:");
        c.error(loc, "`retry` applies to `http` steps only");
    }
    if let Some(w) = &step.wait {
        return match super::wait::parse_duration(&w.value) {
            Ok(duration) => Some(WaitStep::Timer { duration }),
            Err(e) => {
                c.error(pos(&w.referenced), format!("`wait`: {e}")).help =
                    Some("write a number and a unit: 500ms, 30s, 5m, 1h, 1d".into());
                None
            }
        };
    }
    let spec = step.wait_for.as_ref()?;
    check_wait_for(c, &spec.value, pos(&spec.referenced), refs).map(WaitStep::Event)
}

fn check_wait_for(
    c: &mut Checker<'_>,
    w: &format::WaitForSpec,
    at: Pos,
    refs: &Refs<'_>,
) -> Option<WaitFor> {
    let known = [EventKind::ENDED, EventKind::CUSTOM_FIELDS_UPDATED];
    let event = match &w.event {
        None => {
            c.error(at, "`wait_for` needs `event`: the event type to wait for")
                .help = Some(format!("use one of: {}", known.join(", ")));
            String::new()
        }
        Some(e) => {
            let event = e.value.trim().to_owned();
            if !known.contains(&event.as_str()) {
                c.error(
                    pos(&e.referenced),
                    format!("`wait_for.event`: `{event}` is not an event type a run can wait for"),
                )
                .help = Some(format!("use one of: {}", known.join(", ")));
            }
            event
        }
    };
    let event_at = w.event.as_ref().map_or(at, |e| pos(&e.referenced));
    let timeout = match &w.timeout {
        None => {
            c.error(at, "`wait_for` needs `timeout`: how long to wait at most")
                .help = Some("add `timeout: 24h` (ms, s, m, h, d); after it the run goes on with `steps.<id>.timed_out` true".into());
            None
        }
        Some(t) => match super::wait::parse_duration(&t.value) {
            Ok(d) => Some(d),
            Err(e) => {
                c.error(pos(&t.referenced), format!("`wait_for.timeout`: {e}"))
                    .help = Some("write a number and a unit: 500ms, 30s, 5m, 1h, 1d".into());
                None
            }
        },
    };
    if let Some(s) = &w.status
        && event != EventKind::ENDED
    {
        c.error(
            pos(&s.referenced),
            format!("`wait_for.status` only applies to conversation.ended, not `{event}`"),
        );
    }
    let mut status = None;
    if let Some(s) = &w.status
        && event == EventKind::ENDED
    {
        let list = s.value.clone().into_vec();
        for st in &list {
            if !ENDED_STATUSES.contains(&st.as_str()) {
                c.error(
                    pos(&s.referenced),
                    format!("`{st}` is not a conversation.ended status"),
                )
                .help = Some(format!("use one or more of: {}", ENDED_STATUSES.join(", ")));
            }
        }
        status = Some(list);
    }
    let list = |v: &Option<Value>| {
        v.as_ref().map(|v| match v {
            Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        })
    };
    let is_fields = event == EventKind::CUSTOM_FIELDS_UPDATED;
    if !is_fields && !event.is_empty() {
        if let Some(f) = &w.field {
            c.error(
                pos(&f.referenced),
                format!("`wait_for.field` only applies to conversation.custom_fields.updated, not `{event}`"),
            )
            .help = Some("for conversation.ended, wait on `status`".into());
        }
        if w.from.is_some() || w.to.is_some() {
            let loc = c.find(event_at, if w.from.is_some() { "from:" } else { "to:" });
            c.error(
                loc,
                format!("`wait_for.from` / `wait_for.to` only apply to conversation.custom_fields.updated, not `{event}`"),
            );
        }
    }
    let field = match &w.field {
        Some(f) if is_fields && !f.value.trim().is_empty() => Some(f.value.trim().to_owned()),
        _ if is_fields => {
            c.error(
                event_at,
                "waiting for conversation.custom_fields.updated needs `wait_for.field`: the custom field to watch",
            )
            .help = Some("add `field: <name>` under `wait_for:`".into());
            None
        }
        _ => None,
    };
    if let Some(when) = &w.when {
        // An expression over the arriving event (the run's own context is not in scope).
        if let Err(e) = template::check_expression(&when.value) {
            c.error(
                pos(&when.referenced),
                format!("`wait_for.when` does not compile: {}", e.message),
            );
        } else {
            let mut roots = lint::Roots {
                allowed: vec!["event", "conversation"],
                ..Default::default()
            };
            if is_fields {
                roots.allowed.push("change");
            }
            for name in ["steps", "secrets", "run"] {
                roots.unavailable.push((
                    name,
                    "`wait_for.when` is decided as the event arrives; it reads only the arriving event, conversation and change".into(),
                ));
            }
            let findings = lint::check_expression(&when.value, &roots);
            c.findings(findings, pos(&when.referenced), "wait_for.when");
        }
        let _ = refs;
    }
    Some(WaitFor {
        event,
        status,
        field: if is_fields { field } else { None },
        from: if is_fields { list(&w.from) } else { None },
        to: if is_fields { list(&w.to) } else { None },
        when: w.when.as_ref().map(|w| w.value.clone()),
        timeout: timeout?,
    })
}
