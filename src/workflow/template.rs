//! The one template and expression language of workflows (minijinja), with
//! undefined variables as errors. A string that is exactly one `{{ expr }}`
//! keeps the JSON type of its value; any other string renders as text.

use std::sync::OnceLock;

use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

/// How many instructions one template or expression may execute: far more
/// than any real workflow needs, few enough that a runaway loop stops in
/// milliseconds (templates are evaluated inside the append transaction).
pub const FUEL: u64 = 200_000;

/// The most text one template may render.
pub const MAX_OUTPUT_BYTES: usize = 1024 * 1024;

/// The shared environment: strict about undefined values, no auto-escaping,
/// bounded by [`FUEL`].
pub fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(FUEL));
        env
    })
}

/// A writer that refuses to grow past [`MAX_OUTPUT_BYTES`].
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT_BYTES {
            return Err(std::io::Error::other("output limit"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A template or expression failed: says which and why.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{what} `{source_text}`: {message}")]
pub struct TemplateError {
    pub what: &'static str,
    pub source_text: String,
    pub message: String,
}

fn error(what: &'static str, source_text: &str, e: &minijinja::Error) -> TemplateError {
    let mut message = e.kind().to_string();
    if let Some(detail) = e.detail() {
        message = format!("{message}: {detail}");
    }
    if e.kind() == minijinja::ErrorKind::OutOfFuel {
        message = format!(
            "it ran too long (more than {FUEL} steps, e.g. a loop that is too large) and was stopped"
        );
    }
    if e.kind() == minijinja::ErrorKind::WriteFailure {
        message = format!(
            "it renders more than {} KiB of text and was stopped",
            MAX_OUTPUT_BYTES / 1024
        );
    }
    if e.kind() == minijinja::ErrorKind::UndefinedError {
        message.push_str(
            " (a variable or key is not defined; use `| default(...)` if it may be missing)",
        );
    }
    TemplateError {
        what,
        source_text: source_text.to_owned(),
        message,
    }
}

/// If `s` is exactly one `{{ expr }}`, the expression inside.
pub fn sole_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    (!inner.contains("{{") && !inner.contains("}}")).then_some(inner.trim())
}

/// Checks a template compiles.
pub fn check_template(s: &str) -> Result<(), TemplateError> {
    env()
        .template_from_str(s)
        .map(|_| ())
        .map_err(|e| error("template", s, &e))
}

/// Checks an expression compiles.
pub fn check_expression(s: &str) -> Result<(), TemplateError> {
    env()
        .compile_expression(s)
        .map(|_| ())
        .map_err(|e| error("expression", s, &e))
}

/// Compiles and evaluates an expression to a minijinja value.
fn evaluate(expr: &str, ctx: &Value) -> Result<minijinja::Value, TemplateError> {
    env()
        .compile_expression(expr)
        .and_then(|compiled| compiled.eval(ctx))
        .map_err(|e| error("expression", expr, &e))
}

/// Evaluates an expression to JSON.
pub fn eval(expr: &str, ctx: &Value) -> Result<Value, TemplateError> {
    let value = evaluate(expr, ctx)?;
    if value.is_undefined() {
        return Err(TemplateError {
            what: "expression",
            source_text: expr.to_owned(),
            message: "undefined value (use `| default(...)` if it may be missing)".into(),
        });
    }
    serde_json::to_value(&value).map_err(|e| TemplateError {
        what: "expression",
        source_text: expr.to_owned(),
        message: e.to_string(),
    })
}

/// Evaluates a condition (`when`, `if`): true when the value is truthy.
pub fn truthy(expr: &str, ctx: &Value) -> Result<bool, TemplateError> {
    Ok(evaluate(expr, ctx)?.is_true())
}

/// Renders a string template to text.
pub fn render_str(s: &str, ctx: &Value) -> Result<String, TemplateError> {
    if !s.contains("{{") && !s.contains("{%") {
        return Ok(s.to_owned());
    }
    let mut out = Bounded(Vec::new());
    env()
        .template_from_str(s)
        .and_then(|t| t.render_captured_to(ctx, &mut out).map(drop))
        .map_err(|e| error("template", s, &e))?;
    String::from_utf8(out.0).map_err(|e| TemplateError {
        what: "template",
        source_text: s.to_owned(),
        message: e.to_string(),
    })
}

/// Renders a string that may be a sole expression (keeps its JSON type).
pub fn render_value_str(s: &str, ctx: &Value) -> Result<Value, TemplateError> {
    match sole_expression(s) {
        Some(expr) => eval(expr, ctx),
        None => render_str(s, ctx).map(Value::String),
    }
}

/// Renders every string inside a JSON value (keys stay as written).
pub fn render_json(v: &Value, ctx: &Value) -> Result<Value, TemplateError> {
    Ok(match v {
        Value::String(s) => render_value_str(s, ctx)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| render_json(i, ctx))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_json(v, ctx)?)))
                .collect::<Result<_, TemplateError>>()?,
        ),
        other => other.clone(),
    })
}

/// Every string inside a JSON value, for validation.
pub fn strings_in(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| strings_in(i, out)),
        Value::Object(map) => map.values().for_each(|i| strings_in(i, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Value {
        json!({"event": {"livemode": true, "conversation_id": "conv_1", "payload": {"n": 3, "name": "Zoë"}},
               "steps": {"a": {"json": {"ok": false, "items": [1, 2]}}}})
    }

    #[test]
    fn a_sole_expression_keeps_its_type() {
        assert_eq!(
            render_value_str("{{ event.livemode }}", &ctx()).unwrap(),
            json!(true)
        );
        assert_eq!(
            render_value_str(" {{ event.payload.n }} ", &ctx()).unwrap(),
            json!(3)
        );
        assert_eq!(
            render_value_str("{{ steps.a.json.items }}", &ctx()).unwrap(),
            json!([1, 2])
        );
        assert_eq!(
            render_value_str("{{ steps.a.json.ok }}", &ctx()).unwrap(),
            json!(false)
        );
        assert_eq!(
            render_value_str("n={{ event.payload.n }}", &ctx()).unwrap(),
            json!("n=3")
        );
        assert_eq!(
            render_value_str("{{ a }}{{ b }}", &json!({"a": 1, "b": 2})).unwrap(),
            json!("12")
        );
        assert_eq!(
            render_json(&json!({"x": ["{{ event.payload.name }}", 5]}), &ctx()).unwrap(),
            json!({"x": ["Zoë", 5]})
        );
    }

    #[test]
    fn undefined_is_an_error_unless_defaulted() {
        let err = render_value_str("{{ event.payload.missing }}", &ctx()).unwrap_err();
        assert!(err.to_string().contains("event.payload.missing"), "{err}");
        assert!(err.to_string().contains("default"), "{err}");
        assert!(render_str("x {{ nope.deeper }}", &ctx()).is_err());
        assert_eq!(
            render_value_str("{{ event.payload.missing | default('none') }}", &ctx()).unwrap(),
            json!("none")
        );
    }

    #[test]
    fn conditions_and_compile_checks() {
        assert!(truthy("event.livemode and event.payload.n > 2", &ctx()).unwrap());
        assert!(!truthy("event.payload.name != \"Zoë\"", &ctx()).unwrap());
        assert!(check_expression("event.livemode ==").is_err());
        assert!(check_template("{{ unclosed").is_err());
        assert!(check_template("plain {{ ok }}").is_ok());
    }
}
