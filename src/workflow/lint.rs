//! Static checks of a template or expression beyond its syntax: the root
//! variables it reads (minijinja's `undeclared_variables`) and the filters,
//! tests and functions it calls (read from the compiled instructions). Each
//! unknown name comes back with its position inside the template and, when
//! one is close, a "did you mean".

use std::collections::{BTreeSet, HashMap};

use minijinja::ErrorKind;
use minijinja::machinery::{Instruction, get_compiled_template};

use super::template;

/// Which root variables a template may read where it is used.
#[derive(Clone, Debug, Default)]
pub struct Roots {
    /// Names available here.
    pub allowed: Vec<&'static str>,
    /// Known roots that are not available here, with why (shown as the error).
    pub unavailable: Vec<(&'static str, String)>,
}

/// One unknown name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub message: String,
    pub help: Option<String>,
    /// 1-based line inside the template text.
    pub line: usize,
    /// 1-based column inside that line of the template text.
    pub column: usize,
    /// The name as written, to find it in the file.
    pub name: String,
}

/// The filters minijinja ships (suggestions only: existence is asked of the environment).
const FILTER_NAMES: &[&str] = &[
    "abs",
    "attr",
    "batch",
    "bool",
    "capitalize",
    "count",
    "d",
    "default",
    "dictsort",
    "e",
    "escape",
    "first",
    "float",
    "groupby",
    "indent",
    "int",
    "items",
    "join",
    "last",
    "length",
    "lines",
    "list",
    "lower",
    "map",
    "max",
    "min",
    "pprint",
    "reject",
    "rejectattr",
    "replace",
    "reverse",
    "round",
    "safe",
    "select",
    "selectattr",
    "slice",
    "sort",
    "split",
    "string",
    "sum",
    "title",
    "tojson",
    "trim",
    "unique",
    "upper",
    "urlencode",
];

/// The tests minijinja ships (suggestions only).
const TEST_NAMES: &[&str] = &[
    "boolean",
    "defined",
    "divisibleby",
    "endingwith",
    "eq",
    "equalto",
    "escaped",
    "even",
    "false",
    "filter",
    "float",
    "ge",
    "gt",
    "in",
    "integer",
    "iterable",
    "le",
    "lower",
    "lt",
    "mapping",
    "ne",
    "none",
    "number",
    "odd",
    "safe",
    "sameas",
    "sequence",
    "startingwith",
    "string",
    "test",
    "true",
    "undefined",
    "upper",
];

/// Does the shared environment know this filter? (Asked by applying it: an
/// unknown filter is the only way to get `UnknownFilter`.)
fn filter_exists(name: &str) -> bool {
    !matches!(
        template::env().render_str(&format!("{{{{ none | {name} }}}}"), ()),
        Err(e) if e.kind() == ErrorKind::UnknownFilter
    )
}

fn test_exists(name: &str) -> bool {
    !matches!(
        template::env().render_str(&format!("{{{{ none is {name} }}}}"), ()),
        Err(e) if e.kind() == ErrorKind::UnknownTest
    )
}

fn globals() -> Vec<String> {
    template::env()
        .globals()
        .map(|(k, _)| k.to_owned())
        .collect()
}

/// The closest candidate, if close enough to be a likely typo.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .filter(|c| *c != name)
        .map(|c| (strsim::jaro_winkler(name, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

fn hint(name: &str, candidates: &[&str]) -> Option<String> {
    did_you_mean(name, candidates.iter().copied()).map(|c| format!("did you mean `{c}`?"))
}

/// Checks a template (`{{ … }}` inside text). Templates that do not compile give no findings
/// (their syntax error is reported elsewhere).
pub fn check_template(source: &str, roots: &Roots) -> Vec<Finding> {
    check(source, roots, 0)
}

/// Checks an expression (`when:`, `if:`).
pub fn check_expression(source: &str, roots: &Roots) -> Vec<Finding> {
    // Compiled as `{{ expr }}`: positions on the first line shift by the three added characters.
    check(&format!("{{{{ {source} }}}}"), roots, 3)
}

fn check(source: &str, roots: &Roots, shift: usize) -> Vec<Finding> {
    let Ok(tmpl) = template::env().template_from_str(source) else {
        return Vec::new();
    };
    let undeclared = tmpl.undeclared_variables(false);
    let instructions = &get_compiled_template(&tmpl).instructions;
    let at = |idx: u32| -> (usize, usize) {
        instructions
            .get_span(idx)
            .map(|s| {
                let line = s.start_line as usize;
                let col = s.start_col as usize + 1;
                (
                    line,
                    if line == 1 {
                        col.saturating_sub(shift).max(1)
                    } else {
                        col
                    },
                )
            })
            .unwrap_or((1, 1))
    };
    // First place each name is read or called, and whether it is only ever called.
    let mut first: HashMap<&str, ((usize, usize), bool)> = HashMap::new();
    let mut filters: Vec<(&str, (usize, usize))> = Vec::new();
    let mut tests: Vec<(&str, (usize, usize))> = Vec::new();
    for idx in 0..instructions.len() as u32 {
        match instructions.get(idx) {
            Some(Instruction::Lookup(name)) => {
                let e = first.entry(name).or_insert((at(idx), false));
                e.1 = false;
            }
            Some(Instruction::CallFunction(name, _)) => {
                first.entry(name).or_insert((at(idx), true));
            }
            Some(Instruction::ApplyFilter(name, _, _)) => filters.push((name, at(idx))),
            Some(Instruction::PerformTest(name, _, _)) => tests.push((name, at(idx))),
            _ => {}
        }
    }
    let globals = globals();
    let mut out = Vec::new();
    let names: BTreeSet<&String> = undeclared.iter().collect();
    for name in names {
        if roots.allowed.contains(&name.as_str()) || globals.contains(name) {
            continue;
        }
        let ((line, column), called) = first.get(name.as_str()).copied().unwrap_or(((1, 1), false));
        let (message, help) =
            if let Some((_, why)) = roots.unavailable.iter().find(|(n, _)| *n == name.as_str()) {
                (format!("`{name}` is not available here: {why}"), None)
            } else if called {
                let known: Vec<&str> = globals.iter().map(String::as_str).collect();
                (
                    format!("unknown function `{name}`"),
                    hint(name, &known)
                        .or_else(|| Some(format!("the functions are: {}", known.join(", ")))),
                )
            } else {
                let mut known: Vec<&str> = roots.allowed.clone();
                known.extend(roots.unavailable.iter().map(|(n, _)| *n));
                let listing = format!(
                    "a template here can read {}",
                    roots
                        .allowed
                        .iter()
                        .map(|r| format!("`{r}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                (
                    format!("unknown variable `{name}`"),
                    Some(match hint(name, &known) {
                        Some(h) => format!("{h} ({listing})"),
                        None => listing,
                    }),
                )
            };
        out.push(Finding {
            message,
            help,
            line,
            column,
            name: name.clone(),
        });
    }
    for (name, (line, column)) in filters {
        if !filter_exists(name) {
            let known: Vec<&str> = FILTER_NAMES
                .iter()
                .copied()
                .filter(|f| filter_exists(f))
                .collect();
            out.push(Finding {
                message: format!("unknown filter `{name}`"),
                help: hint(name, &known)
                    .or_else(|| Some(format!("the filters are: {}", known.join(", ")))),
                line,
                column,
                name: name.to_owned(),
            });
        }
    }
    for (name, (line, column)) in tests {
        if !test_exists(name) {
            let known: Vec<&str> = TEST_NAMES
                .iter()
                .copied()
                .filter(|t| test_exists(t))
                .collect();
            out.push(Finding {
                message: format!("unknown test `{name}`"),
                help: hint(name, &known)
                    .or_else(|| Some(format!("the tests are: {}", known.join(", ")))),
                line,
                column,
                name: name.to_owned(),
            });
        }
    }
    out.sort_by_key(|f| (f.line, f.column));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step_roots() -> Roots {
        Roots {
            allowed: vec!["event", "conversation", "steps", "secrets", "run"],
            unavailable: vec![("change", "only on custom field updates".into())],
        }
    }

    #[test]
    fn unknown_roots_filters_tests_and_functions_are_found_where_they_are() {
        let f = check_template("id={{ evnt.conversation_id }}", &step_roots());
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].message, "unknown variable `evnt`");
        assert_eq!((f[0].line, f[0].column), (1, 7));
        assert!(
            f[0].help
                .as_deref()
                .unwrap()
                .starts_with("did you mean `event`?"),
            "{f:?}"
        );

        let f = check_template("a\n{{ event.id | nosuchfilter }}", &step_roots());
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].message, "unknown filter `nosuchfilter`");
        assert_eq!(f[0].line, 2);

        let f = check_template("{{ event.id | uper }}", &step_roots());
        assert_eq!(f[0].help.as_deref(), Some("did you mean `upper`?"));

        let f = check_expression("event.id is definde", &step_roots());
        assert_eq!(f[0].message, "unknown test `definde`");
        assert_eq!(f[0].help.as_deref(), Some("did you mean `defined`?"));

        let f = check_expression("rnage(3) and change.to", &step_roots());
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[0].message, "unknown function `rnage`");
        assert_eq!(f[0].help.as_deref(), Some("did you mean `range`?"));
        assert_eq!((f[0].line, f[0].column), (1, 1));
        assert_eq!(
            f[1].message,
            "`change` is not available here: only on custom field updates"
        );
        assert_eq!((f[1].line, f[1].column), (1, 14));
    }

    #[test]
    fn locals_globals_and_known_names_pass() {
        let ok = "{% for x in event.items %}{{ x | upper }}{% endfor %}{% set y = 1 %}{{ y }}{{ range(2) | list | length }}{{ steps.a.json is defined }}{{ secrets.T | default('') }}";
        assert_eq!(check_template(ok, &step_roots()), vec![]);
        assert_eq!(check_template("{{ broken", &step_roots()), vec![]);
    }
}
