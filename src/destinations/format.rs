//! The YAML format of `destinations.yaml` (see README "Destinations"), and
//! its checks: every rule as a [`Diagnostic`] pointing at the value at fault,
//! every unknown key reported (a lenient first pass, like the workflows').

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{BreakerPolicy, DestinationSpec, Destinations, Limits, Rate};
use crate::workflow::diagnostic::{Diagnostic, Severity};
use crate::workflow::format::{Node, UnknownKey, known_entries, unknown_key_errors};

/// The file name, in the workflows directory.
pub const FILE_NAME: &str = "destinations.yaml";

const TOP_KEYS: &[&str] = &["destinations", "default"];
const ENTRY_KEYS: &[&str] = &[
    "name",
    "url",
    "rate",
    "burst",
    "concurrency",
    "circuit_breaker",
];
const DEFAULT_KEYS: &[&str] = &["rate", "burst", "concurrency", "circuit_breaker"];
const BREAKER_KEYS: &[&str] = &["failures", "cool_down", "max_cool_down"];

const DEFAULT_FAILURES: u32 = 5;
const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(30);
const DEFAULT_MAX_COOL_DOWN: Duration = Duration::from_secs(600);

#[derive(Debug, Deserialize)]
struct File {
    #[serde(default)]
    destinations: Vec<EntrySpec>,
    default: Option<LimitsSpec>,
}

#[derive(Debug, Deserialize)]
struct EntrySpec {
    name: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    // Not `#[serde(flatten)]` of a LimitsSpec: flattening loses the positions.
    rate: Option<Spanned<String>>,
    burst: Option<Spanned<i64>>,
    concurrency: Option<Spanned<i64>>,
    circuit_breaker: Option<Spanned<BreakerSpec>>,
}

#[derive(Debug, Default, Deserialize)]
struct LimitsSpec {
    rate: Option<Spanned<String>>,
    burst: Option<Spanned<i64>>,
    concurrency: Option<Spanned<i64>>,
    circuit_breaker: Option<Spanned<BreakerSpec>>,
}

#[derive(Clone, Debug, Deserialize)]
struct BreakerSpec {
    failures: Option<Spanned<i64>>,
    cool_down: Option<Spanned<String>>,
    max_cool_down: Option<Spanned<String>>,
}

struct Checker<'a> {
    file: &'a Path,
    source: &'a str,
    out: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn error<T>(
        &mut self,
        at: &serde_saphyr::Location,
        message: impl Into<String>,
        help: &str,
    ) -> Option<T> {
        self.error_at((at.line() as usize, at.column() as usize), message, help)
    }

    fn error_at<T>(
        &mut self,
        (line, column): (usize, usize),
        message: impl Into<String>,
        help: &str,
    ) -> Option<T> {
        let d = Diagnostic::new(
            Severity::Error,
            self.file,
            self.source,
            line,
            column,
            message,
        );
        self.out
            .push(if help.is_empty() { d } else { d.help(help) });
        None
    }

    fn duration(&mut self, s: &Spanned<String>, field: &str) -> Option<Duration> {
        match humantime::parse_duration(s.value.trim()) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => self.error(
                &s.referenced,
                format!("`{field}` must be longer than zero"),
                "",
            ),
            Err(e) => self.error(
                &s.referenced,
                format!("`{field}`: `{}` is not a duration ({e})", s.value),
                "write a number and a unit: 500ms, 10s, 5m, 1h",
            ),
        }
    }

    fn positive(&mut self, n: &Spanned<i64>, field: &str) -> Option<u32> {
        match u32::try_from(n.value) {
            Ok(v) if v > 0 => Some(v),
            _ => self.error(
                &n.referenced,
                format!(
                    "`{field}` must be a whole number from 1 up, not {}",
                    n.value
                ),
                "",
            ),
        }
    }

    fn limits(&mut self, spec: &LimitsSpec) -> Limits {
        let rate = spec.rate.as_ref().and_then(|r| match parse_rate(&r.value) {
            Ok(rate) => Some(rate),
            Err(why) => self.error(
                &r.referenced,
                format!("`rate`: `{}` {why}", r.value),
                "write requests per period: 100/10s, 5/s, 300/m or N/<duration>",
            ),
        });
        let burst = spec.burst.as_ref().and_then(|b| {
            let v = self.positive(b, "burst")?;
            if rate.is_none() && spec.rate.is_none() {
                return self.error(
                    &b.referenced,
                    "`burst` needs a `rate`",
                    "burst is how many requests the token bucket lets through at once; set `rate` too, or remove `burst`",
                );
            }
            Some(v)
        });
        let rate = rate.map(|mut r| {
            r.burst = burst.unwrap_or(r.count);
            r
        });
        let concurrency = spec
            .concurrency
            .as_ref()
            .and_then(|c| self.positive(c, "concurrency"));
        let breaker = spec.circuit_breaker.as_ref().map(|b| {
            let failures = b
                .value
                .failures
                .as_ref()
                .and_then(|f| self.positive(f, "failures"))
                .unwrap_or(DEFAULT_FAILURES);
            let cool_down = b
                .value
                .cool_down
                .as_ref()
                .and_then(|d| self.duration(d, "cool_down"))
                .unwrap_or(DEFAULT_COOL_DOWN);
            let max = b
                .value
                .max_cool_down
                .as_ref()
                .and_then(|d| self.duration(d, "max_cool_down"));
            if let (Some(m), Some(spec)) = (max, &b.value.max_cool_down)
                && m < cool_down
            {
                self.error::<()>(
                    &spec.referenced,
                    format!(
                        "`max_cool_down` ({}) is shorter than `cool_down` ({})",
                        humantime::format_duration(m),
                        humantime::format_duration(cool_down)
                    ),
                    "the cool-down doubles from `cool_down` up to `max_cool_down`: make max_cool_down at least cool_down",
                );
            }
            BreakerPolicy {
                failures,
                cool_down,
                max_cool_down: max.unwrap_or(DEFAULT_MAX_COOL_DOWN.max(cool_down)).max(cool_down),
            }
        });
        Limits {
            rate,
            concurrency,
            breaker,
        }
    }
}

/// `N/s`, `N/m`, `N/h` or `N/<duration>` (`100/10s`).
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let Some((n, per)) = text.trim().split_once('/') else {
        return Err("is not a rate (no `/`)".into());
    };
    let count: u32 = match n.trim().parse() {
        Ok(c) if c > 0 => c,
        _ => {
            return Err(format!(
                "needs a whole number from 1 up before `/`, not `{n}`"
            ));
        }
    };
    let per = per.trim();
    let period = match per {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        other => match humantime::parse_duration(other) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => return Err("has a period of zero".into()),
            Err(e) => return Err(format!("has no valid period after `/` ({e})")),
        },
    };
    Ok(Rate {
        count,
        period,
        burst: count,
    })
}

/// Parses and checks `destinations.yaml`; every diagnostic when it has an error.
pub fn compile(file: &Path, source: &str) -> Result<Destinations, Vec<Diagnostic>> {
    let mut c = Checker {
        file,
        source,
        out: Vec::new(),
    };
    let parse_error = |e: &serde_saphyr::Error| {
        let (line, column) = e
            .location()
            .map(|l| (l.line() as usize, l.column() as usize))
            .unwrap_or((0, 0));
        let text = e.to_string();
        Diagnostic::new(
            Severity::Error,
            file,
            source,
            line,
            column,
            text.lines().next().unwrap_or("invalid YAML").to_owned(),
        )
    };
    if source.trim().is_empty() {
        return Ok(Destinations::default());
    }
    let tree: Node = serde_saphyr::from_str(source).map_err(|e| vec![parse_error(&e)])?;
    c.out.extend(unknown_key_errors(
        file,
        source,
        &unknown_keys(&tree),
        "the keys are listed in README \"Destinations\" and workflows/destinations.schema.json",
    ));
    let spec: File = match serde_saphyr::from_str(source) {
        Ok(s) => s,
        Err(e) => {
            c.out.push(parse_error(&e));
            return Err(c.out);
        }
    };
    let mut entries: Vec<DestinationSpec> = Vec::new();
    for (i, e) in spec.destinations.iter().enumerate() {
        let limits = c.limits(&LimitsSpec {
            rate: e.rate.clone(),
            burst: e.burst.clone(),
            concurrency: e.concurrency.clone(),
            circuit_breaker: e.circuit_breaker.clone(),
        });
        let Some(name) = &e.name else {
            let at = e.url.as_ref().map_or((0, 0), |u| {
                (u.referenced.line() as usize, u.referenced.column() as usize)
            });
            c.error_at::<()>(
                at,
                format!("destination #{} has no `name`", i + 1),
                "give every destination a name (letters, digits, `-`, `_`): it is how the API and metrics call it",
            );
            continue;
        };
        let valid_name = !name.value.is_empty()
            && name
                .value
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_');
        if !valid_name {
            c.error::<()>(
                &name.referenced,
                format!("destination name `{}` is not allowed", name.value),
                "use letters, digits, `-` and `_` only (the name is part of API paths)",
            );
        }
        if entries.iter().any(|d| d.name == name.value) {
            c.error::<()>(
                &name.referenced,
                format!("destination name `{}` is used twice", name.value),
                "destination names must be unique",
            );
        }
        let Some(url) = &e.url else {
            c.error::<()>(
                &name.referenced,
                format!("destination `{}` has no `url`", name.value),
                "set `url:` to the prefix of the requests it covers, e.g. \"https://crm.example.com/\"",
            );
            continue;
        };
        let prefix = url.value.trim().to_owned();
        match reqwest::Url::parse(&prefix) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                c.error::<()>(
                    &url.referenced,
                    format!("`url`: `{}` is not an http(s) URL", url.value),
                    "write the start of the URLs it covers, scheme and host included: \"https://crm.example.com/\"",
                );
            }
        }
        if let Some(other) = entries.iter().find(|d| d.url == prefix) {
            c.error::<()>(
                &url.referenced,
                format!(
                    "`url` `{prefix}` is already the prefix of destination `{}`",
                    other.name
                ),
                "each URL prefix belongs to one destination (the longest matching prefix wins)",
            );
        }
        if limits.is_empty() {
            c.out.push(
                Diagnostic::new(
                    Severity::Warning,
                    file,
                    source,
                    name.referenced.line() as usize,
                    name.referenced.column() as usize,
                    format!(
                        "destination `{}` sets no `rate`, `concurrency` or `circuit_breaker`: it protects nothing",
                        name.value
                    ),
                )
                .help("add a limit, or remove the entry"),
            );
        }
        entries.push(DestinationSpec {
            name: name.value.clone(),
            url: prefix,
            limits,
        });
    }
    let default = spec
        .default
        .as_ref()
        .map(|d| c.limits(d))
        .unwrap_or_default();
    if c.out.iter().any(Diagnostic::is_error) {
        return Err(c.out);
    }
    Ok(Destinations::new(entries, default, c.out))
}

/// Every key of the file that is not part of the format.
fn unknown_keys(root: &Node) -> Vec<UnknownKey<'_>> {
    let mut out = Vec::new();
    for (k, v) in known_entries(root, "the destinations file", TOP_KEYS, &mut out) {
        match k {
            "destinations" => {
                let Node::Seq(items) = v else { continue };
                for item in items {
                    for (k, v) in known_entries(item, "a destination", ENTRY_KEYS, &mut out) {
                        if k == "circuit_breaker" {
                            known_entries(v, "`circuit_breaker`", BREAKER_KEYS, &mut out);
                        }
                    }
                }
            }
            "default" => {
                for (k, v) in known_entries(v, "`default`", DEFAULT_KEYS, &mut out) {
                    if k == "circuit_breaker" {
                        known_entries(v, "`circuit_breaker`", BREAKER_KEYS, &mut out);
                    }
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        let r = parse_rate("100/10s").unwrap();
        assert_eq!((r.count, r.period), (100, Duration::from_secs(10)));
        assert_eq!(parse_rate("5/s").unwrap().period, Duration::from_secs(1));
        assert_eq!(parse_rate("300/m").unwrap().period, Duration::from_secs(60));
        assert_eq!(
            parse_rate("1/500ms").unwrap().period,
            Duration::from_millis(500)
        );
        assert!(parse_rate("100").is_err());
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("10/soon").is_err());
    }

    #[test]
    fn every_problem_is_reported_with_its_place() {
        let src = "destinations:\n  - name: crm\n    url: \"https://crm.example.com/\"\n    rate: 100/tens\n    bursts: 3\n    circuit_breaker: { failures: 0, cool_down: 30s, max_cool_down: 10s }\n";
        let d = compile(Path::new("destinations.yaml"), src).unwrap_err();
        let msgs: Vec<String> = d
            .iter()
            .map(|d| format!("{}:{} {}", d.line, d.column, d.message))
            .collect();
        assert!(
            msgs.iter().any(|m| m.starts_with("4:11 `rate`")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.starts_with("5:5 unknown field `bursts`")),
            "{msgs:?}"
        );
        assert!(msgs.iter().any(|m| m.contains("`failures`")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("max_cool_down")), "{msgs:?}");
    }

    #[test]
    fn the_issue_example_compiles() {
        let src = "destinations:\n  - name: crm\n    url: \"https://crm.example.com/\"\n    rate: 100/10s\n    burst: 20\n    concurrency: 4\n    circuit_breaker:\n      failures: 5\n      cool_down: 30s\n      max_cool_down: 10m\ndefault:\n  circuit_breaker: { failures: 10, cool_down: 30s, max_cool_down: 10m }\n";
        let d = compile(Path::new("destinations.yaml"), src).unwrap();
        let crm = d.find("https://crm.example.com/v3/contacts").unwrap();
        assert_eq!(crm.name, "crm");
        assert_eq!(crm.limits.rate.unwrap().burst, 20);
        let other = d.find("http://127.0.0.1:9/x").unwrap();
        assert_eq!(other.name, "http://127.0.0.1:9");
        assert_eq!(other.limits.breaker.unwrap().failures, 10);
    }
}
