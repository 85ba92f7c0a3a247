//! One HTTP action: render a step's request from its templates (once, with
//! the real secret values), mask it for the record, send it under the
//! egress policy with a timeout and without following redirects, and
//! classify what happened. Workflow runs and setup lookups both go through
//! [`prepare`] and [`exchange`], so there is one implementation of an
//! outbound call.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

use crate::workflow::template::{self, TemplateError};
use crate::workflow::{BodySpec, HttpAction};

/// The largest part of a response body kept.
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// Why an attempt failed, as recorded and counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    Dns,
    Connect,
    Tls,
    Timeout,
    /// A redirect: not followed (not retried).
    Http3xx,
    Http4xx,
    Http5xx,
    /// A template or expression failed (not retried).
    Template,
    /// A declared secret is not set (not retried).
    Secret,
    /// The destination address is refused by the egress policy (not retried).
    Egress,
    /// The attempt's outcome could not be stored (not retried).
    Store,
    /// Anything else about the request (bad URL, protocol error).
    Request,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Dns => "dns",
            ErrorClass::Connect => "connect",
            ErrorClass::Tls => "tls",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Http3xx => "http_3xx",
            ErrorClass::Http4xx => "http_4xx",
            ErrorClass::Http5xx => "http_5xx",
            ErrorClass::Template => "template",
            ErrorClass::Secret => "secret",
            ErrorClass::Egress => "egress",
            ErrorClass::Store => "store",
            ErrorClass::Request => "request",
        }
    }
}

// ---------------------------------------------------------------- secrets

/// Replaces secret values in text and JSON with `***`, in every form a
/// value takes on its way out: plain, percent-encoded (path, query and form
/// encodings) and JSON-escaped.
#[derive(Clone, Debug, Default)]
pub struct Masker {
    /// Longest first, so a form that contains another is replaced whole.
    forms: Vec<String>,
}

const MASK: &str = "***";

impl Masker {
    pub fn new<'a>(values: impl IntoIterator<Item = &'a String>) -> Self {
        let mut forms = Vec::new();
        let mut all: Vec<String> = Vec::new();
        for v in values.into_iter().filter(|v| !v.is_empty()) {
            all.push(v.clone());
            // Mounted secrets often end in a newline; a URL secret is normalised by parsing.
            let trimmed = v.trim();
            if !trimmed.is_empty() && trimmed != v {
                all.push(trimmed.to_owned());
            }
            if let Ok(url) = reqwest::Url::parse(trimmed) {
                all.push(url.as_str().to_owned());
                all.push(redacted_url(&url));
                if let Some(password) = url.password() {
                    all.push(password.to_owned());
                }
            }
        }
        for v in all.iter().filter(|v| !v.is_empty()) {
            forms.push(v.clone());
            // minijinja's `tojson` escapes `< > & '`.
            let json = serde_json::to_string(v).expect("a string serializes");
            let html_safe = json
                .replace('<', "\\u003c")
                .replace('>', "\\u003e")
                .replace('&', "\\u0026")
                .replace('\'', "\\u0027");
            forms.push(html_safe[1..html_safe.len() - 1].to_owned());
            forms.push(utf8_percent_encode(v, COMPONENT).to_string());
            forms.push(utf8_percent_encode(v, NON_ALPHANUMERIC).to_string());
            let json = serde_json::to_string(v).expect("a string serializes");
            forms.push(json[1..json.len() - 1].to_owned());
            let mut url = reqwest::Url::parse("http://x/").expect("a valid URL");
            url.query_pairs_mut().append_pair("k", v);
            if let Some(q) = url.query() {
                forms.push(q.trim_start_matches("k=").to_owned());
            }
            if let Ok(mut url) = reqwest::Url::parse("http://x/") {
                if let Ok(mut segments) = url.path_segments_mut() {
                    segments.pop().push(v);
                }
                forms.push(url.path().trim_start_matches('/').to_owned());
            }
            if let Ok(url) = reqwest::Url::parse(&format!("http://x/?{v}"))
                && let Some(q) = url.query()
            {
                forms.push(q.to_owned());
            }
        }
        forms.retain(|f| !f.is_empty());
        forms.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        forms.dedup();
        Self { forms }
    }

    pub fn is_empty(&self) -> bool {
        self.forms.is_empty()
    }

    /// `text` with every secret form replaced by `***`.
    pub fn text(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for f in &self.forms {
            if out.contains(f.as_str()) {
                out = out.replace(f.as_str(), MASK);
            }
        }
        out
    }

    /// Every string (and key) inside `v`, masked.
    pub fn value(&self, v: &Value) -> Value {
        if self.forms.is_empty() {
            return v.clone();
        }
        match v {
            Value::String(s) => Value::String(self.text(s)),
            Value::Array(items) => Value::Array(items.iter().map(|i| self.value(i)).collect()),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (self.text(k), self.value(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

/// Replaces every secret value (in all its forms, see [`Masker`]) in `text` with `***`.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    Masker::new(secrets).text(text)
}

// ---------------------------------------------------------------- egress policy

/// Which destination addresses outbound calls may connect to
/// (`SWITCHBOARD_EGRESS_DENY`, `SWITCHBOARD_EGRESS_ALLOW`). Checked on the
/// resolved address of every connection.
#[derive(Clone, Debug, PartialEq)]
pub struct EgressPolicy {
    pub deny: Vec<IpNet>,
    /// When set, only these.
    pub allow: Option<Vec<IpNet>>,
}

/// Link-local (which holds most clouds' metadata services) and the other
/// well-known metadata addresses, IPv4 and IPv6.
pub const DEFAULT_EGRESS_DENY: &str =
    "169.254.0.0/16,fe80::/10,fd00:ec2::254/128,100.100.100.200/32,168.63.129.16/32";

impl Default for EgressPolicy {
    fn default() -> Self {
        Self {
            deny: parse_nets("", DEFAULT_EGRESS_DENY).expect("valid defaults"),
            allow: None,
        }
    }
}

fn parse_nets(var: &str, text: &str) -> Result<Vec<IpNet>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    format!(
                        "{var}: `{s}` is not a CIDR (like 10.0.0.0/8 or fd00::/8) or an IP address"
                    )
                })
        })
        .collect()
}

impl EgressPolicy {
    /// From `SWITCHBOARD_EGRESS_DENY` (default [`DEFAULT_EGRESS_DENY`]; empty
    /// denies nothing) and `SWITCHBOARD_EGRESS_ALLOW` (when set, only these).
    pub fn from_env() -> Result<Self, String> {
        let deny = match std::env::var("SWITCHBOARD_EGRESS_DENY") {
            Ok(v) => parse_nets("SWITCHBOARD_EGRESS_DENY", &v)?,
            Err(_) => Self::default().deny,
        };
        let allow = match std::env::var("SWITCHBOARD_EGRESS_ALLOW") {
            Ok(v) if !v.trim().is_empty() => Some(parse_nets("SWITCHBOARD_EGRESS_ALLOW", &v)?),
            _ => None,
        };
        Ok(Self { deny, allow })
    }

    /// Err: why the address is refused.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        let ip = ip.to_canonical();
        if let Some(net) = self.deny.iter().find(|n| n.contains(&ip)) {
            return Err(format!(
                "egress policy refuses {ip}: it is in {net} (SWITCHBOARD_EGRESS_DENY)"
            ));
        }
        if let Some(allow) = &self.allow
            && !allow.iter().any(|n| n.contains(&ip))
        {
            return Err(format!(
                "egress policy refuses {ip}: it is not in SWITCHBOARD_EGRESS_ALLOW"
            ));
        }
        Ok(())
    }
}

/// Resolves names with the system resolver, then drops (or refuses) the
/// addresses the policy does not allow.
struct PolicyResolver(Arc<EgressPolicy>);

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match policy.check(a.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        refused.get_or_insert(why);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = refused.unwrap_or_else(|| format!("no address found for {host}"));
                return Err(format!("{why} (resolved from {host})").into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// The HTTP client every outbound call uses, with its egress policy.
#[derive(Clone)]
pub struct Client {
    inner: reqwest::Client,
    policy: Arc<EgressPolicy>,
}

impl Client {
    /// Redirects are not followed; every resolved address is checked against `policy`.
    pub fn new(policy: EgressPolicy) -> Self {
        let policy = Arc::new(policy);
        let inner = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(PolicyResolver(policy.clone()))
            .build()
            .expect("HTTP client");
        Self { inner, policy }
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }
}

/// The client with the policy from the environment (an invalid policy is
/// refused at startup, see [`EgressPolicy::from_env`]; here it falls back to the default).
pub fn client() -> Client {
    Client::new(EgressPolicy::from_env().unwrap_or_else(|e| {
        tracing::error!("{e}; using the default egress policy");
        EgressPolicy::default()
    }))
}

// ---------------------------------------------------------------- rendering

/// What a templated value may contain in a URL path or query without being
/// encoded: the unreserved characters.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A request ready to send (real values; see [`Prepared`] for the record).
#[derive(Clone, Debug)]
pub struct Request {
    pub method: reqwest::Method,
    pub url: reqwest::Url,
    pub headers: Vec<(String, String)>,
    pub body: Option<(Vec<u8>, String)>,
    /// The body as recorded: JSON when it was JSON, else text.
    pub body_record: Value,
}

impl Request {
    /// Every header as sent, in order: `User-Agent`, `extra` (Idempotency-Key,
    /// traceparent) unless the step sets them itself, the step's headers, and
    /// `Content-Type` for a body unless the step sets it.
    pub fn wire_headers(&self, extra: &[(&str, String)]) -> Vec<(String, String)> {
        let set_by_step = |name: &str| {
            self.headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case(name))
        };
        let mut out = Vec::new();
        if !set_by_step("user-agent") {
            out.push(("user-agent".to_owned(), super::user_agent()));
        }
        for (k, v) in extra {
            if !set_by_step(k) {
                out.push(((*k).to_owned(), v.clone()));
            }
        }
        out.extend(self.headers.iter().cloned());
        if let Some((_, content_type)) = &self.body
            && !set_by_step("content-type")
        {
            out.push(("content-type".to_owned(), content_type.clone()));
        }
        out
    }

    /// The request as recorded: method, URL, every header sent and the body (unmasked).
    pub fn record(&self, extra: &[(&str, String)]) -> Value {
        let headers: BTreeMap<String, String> = self.wire_headers(extra).into_iter().collect();
        json!({
            "method": self.method.as_str(),
            "url": redacted_url(&self.url),
            "headers": headers,
            "body": self.body_record,
        })
    }
}

/// Renders a URL template: each `{{ expression }}` in the path is
/// percent-encoded as a path segment, in the query as a query value (so a
/// value cannot add segments, parameters or a fragment); in the scheme and
/// host it is taken as is. A URL that is one whole expression (a secret
/// holding a URL, say) is taken as is.
pub fn render_url(url: &str, ctx: &Value) -> Result<String, TemplateError> {
    if template::sole_expression(url).is_some() {
        return template::render_str(url, ctx);
    }
    let mut out = String::new();
    let mut rest = url;
    while let Some(start) = rest.find("{{") {
        literal(&rest[..start], url)?;
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        let end = after.find("}}").ok_or_else(|| TemplateError {
            what: "template",
            source_text: url.to_owned(),
            message: "`{{` without a closing `}}`".into(),
        })? + 2;
        let value = template::render_str(&after[..end], ctx)?;
        let in_host = match out.find("://") {
            Some(i) => !out[i + 3..].contains(['/', '?', '#']),
            None => out.is_empty(),
        };
        if in_host {
            // After `scheme://`, a value is part of the host: it may not end the host
            // early (`evil.com/x#`) or add userinfo (`user@evil.com`). A value that
            // starts the URL (a base URL from a secret, say) is the author's choice.
            if !out.is_empty()
                && value.chars().any(|c| {
                    matches!(c, '/' | '\\' | '?' | '#' | '@') || c.is_whitespace() || c.is_control()
                })
            {
                return Err(TemplateError {
                    what: "template",
                    source_text: url.to_owned(),
                    message: format!(
                        "the value `{value}` would change the URL's host (a host part may not hold `/ \\ ? # @`, spaces or control characters)"
                    ),
                });
            }
            out.push_str(&value);
        } else {
            let encoded = utf8_percent_encode(&value, COMPONENT).to_string();
            if !out.contains(['?', '#']) && (encoded == "." || encoded == "..") {
                return Err(TemplateError {
                    what: "template",
                    source_text: url.to_owned(),
                    message: format!("the value `{value}` would change the URL's path"),
                });
            }
            out.push_str(&encoded);
        }
        rest = &after[end..];
    }
    literal(rest, url)?;
    out.push_str(rest);
    Ok(out)
}

fn literal(text: &str, url: &str) -> Result<(), TemplateError> {
    if text.contains("{%") || text.contains("{#") || text.contains("}}") {
        return Err(TemplateError {
            what: "template",
            source_text: url.to_owned(),
            message: "a URL may hold `{{ expressions }}` only (no `{% %}` blocks or comments); compute the value in an expression".into(),
        });
    }
    Ok(())
}

/// Renders a step's request in a template context (with the real values).
pub fn render(action: &HttpAction, ctx: &Value) -> Result<Request, (ErrorClass, String)> {
    let t = |e: TemplateError| (ErrorClass::Template, e.to_string());
    let url_text = render_url(&action.url, ctx).map_err(t)?;
    let mut url = reqwest::Url::parse(url_text.trim()).map_err(|e| {
        (
            ErrorClass::Request,
            format!("`{url_text}` is not a valid URL: {e}"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err((
            ErrorClass::Request,
            format!("`{url_text}` is not an http(s) URL"),
        ));
    }
    if !action.query.is_empty() {
        let mut pairs = url.query_pairs_mut();
        for (k, v) in &action.query {
            pairs.append_pair(k, &template::render_str(v, ctx).map_err(t)?);
        }
    }
    let mut headers = Vec::new();
    for (k, v) in &action.headers {
        headers.push((k.clone(), template::render_str(v, ctx).map_err(t)?));
    }
    let (body, body_record) = match &action.body {
        BodySpec::None => (None, Value::Null),
        BodySpec::Json(j) => {
            let rendered = template::render_json(j, ctx).map_err(t)?;
            let bytes = serde_json::to_vec(&rendered).expect("JSON serializes");
            (Some((bytes, "application/json".to_owned())), rendered)
        }
        BodySpec::Text {
            template: text,
            content_type,
        } => {
            let rendered = template::render_str(text, ctx).map_err(t)?;
            (
                Some((rendered.clone().into_bytes(), content_type.clone())),
                Value::String(rendered),
            )
        }
    };
    let method = reqwest::Method::from_bytes(action.method.as_bytes()).map_err(|_| {
        (
            ErrorClass::Request,
            format!("`{}` is not an HTTP method", action.method),
        )
    })?;
    Ok(Request {
        method,
        url,
        headers,
        body,
        body_record,
    })
}

/// A rendered request and what may be shown of it.
pub struct Prepared {
    pub real: Request,
    /// The URL with secrets masked (and user/password redacted), for spans and logs.
    pub shown_url: String,
}

/// Renders once with the real values; an error's message is already masked.
pub fn prepare(action: &HttpAction, ctx: &Value, masker: &Masker) -> Result<Prepared, Failure> {
    match render(action, ctx) {
        Ok(real) => Ok(Prepared {
            shown_url: masker.text(&redacted_url(&real.url)),
            real,
        }),
        Err((class, message)) => Err(Failure {
            class,
            message: masker.text(&message),
            retryable: false,
            retry_after: None,
        }),
    }
}

/// A URL fit for a span's `url.full`: user and password removed.
pub fn redacted_url(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    if !url.username().is_empty() {
        let _ = url.set_username("REDACTED");
    }
    if url.password().is_some() {
        let _ = url.set_password(Some("REDACTED"));
    }
    url.to_string()
}

// ---------------------------------------------------------------- sending

/// What came back.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    /// The first [`MAX_RESPONSE_BODY`] bytes, as text.
    pub body: String,
    pub json: Option<Value>,
}

impl Response {
    /// What later steps read as `steps.<id>`.
    pub fn as_step_result(&self) -> Value {
        json!({"status": self.status, "headers": self.headers, "json": self.json, "body": self.body})
    }

    /// The response with every secret form masked.
    pub fn masked(&self, masker: &Masker) -> Response {
        if masker.is_empty() {
            return self.clone();
        }
        Response {
            status: self.status,
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), masker.text(v)))
                .collect(),
            body: masker.text(&self.body),
            json: self.json.as_ref().map(|j| masker.value(j)),
        }
    }
}

fn chain_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Classifies a transport error.
pub fn classify(e: &reqwest::Error) -> (ErrorClass, String) {
    let text = chain_text(e);
    let lower = text.to_ascii_lowercase();
    let class = if lower.contains("egress policy refuses") {
        ErrorClass::Egress
    } else if e.is_timeout() {
        ErrorClass::Timeout
    } else if lower.contains("dns error")
        || lower.contains("failed to lookup")
        || lower.contains("name or service not known")
    {
        ErrorClass::Dns
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake")
    {
        ErrorClass::Tls
    } else if e.is_connect() {
        ErrorClass::Connect
    } else {
        ErrorClass::Request
    };
    (class, text)
}

/// Sends `req` with exactly `headers` (see [`Request::wire_headers`]) and a
/// timeout, under the client's egress policy. Redirects are not followed.
pub async fn send(
    client: &Client,
    req: &Request,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<Response, (ErrorClass, String)> {
    // The resolver checks names; an IP literal is never resolved, so check it here.
    if let Some(ip) = req.url.host_str().and_then(|h| {
        h.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
    }) {
        client
            .policy
            .check(ip)
            .map_err(|e| (ErrorClass::Egress, e))?;
    }
    let mut builder = client
        .inner
        .request(req.method.clone(), req.url.clone())
        .timeout(timeout);
    for (k, v) in headers {
        builder = builder.header(k, v);
    }
    if let Some((bytes, _)) = &req.body {
        builder = builder.body(bytes.clone());
    }
    let read = async {
        let mut resp = builder.send().await.map_err(|e| classify(&e))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect::<BTreeMap<_, _>>();
        let mut body = Vec::new();
        while body.len() < MAX_RESPONSE_BODY {
            match resp.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(e) => return Err(classify(&e)),
            }
        }
        body.truncate(MAX_RESPONSE_BODY);
        let json = serde_json::from_slice(&body).ok();
        Ok(Response {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            json,
        })
    };
    // The client timeout covers the headers; this one covers the whole exchange.
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result,
        Err(_) => Err((
            ErrorClass::Timeout,
            format!(
                "no complete response within {}",
                humantime::format_duration(timeout)
            ),
        )),
    }
}

/// One exchange, as recorded: everything in it already masked.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// `{method, url, headers, body}` exactly as sent, secrets masked.
    pub request: Value,
    /// The response (masked), when one came.
    pub response: Option<Response>,
    /// Why it failed (masked message), or `None` for a 2xx.
    pub failure: Option<Failure>,
    pub duration_ms: i64,
}

/// Sends a prepared request with `extra` headers and records the exchange
/// (the one path for run attempts and setup lookups). The span (current)
/// gets the result attributes.
pub async fn exchange(
    client: &Client,
    prepared: &Prepared,
    extra: &[(&str, String)],
    timeout: Duration,
    masker: &Masker,
) -> Exchange {
    let clock = std::time::Instant::now();
    let headers = prepared.real.wire_headers(extra);
    let request = masker.value(&prepared.real.record(extra));
    let result = send(client, &prepared.real, &headers, timeout).await;
    let duration_ms = clock.elapsed().as_millis() as i64;
    let failure = failure(&result).map(|f| Failure {
        message: masker.text(&f.message),
        ..f
    });
    super::trace::record_result(&tracing::Span::current(), &result, failure.as_ref());
    Exchange {
        request,
        response: result.ok().map(|r| r.masked(masker)),
        failure,
        duration_ms,
    }
}

/// Why an attempt failed, and whether (and after what the server asked) to try again.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub class: ErrorClass,
    pub message: String,
    pub retryable: bool,
    /// The server's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
}

/// Classifies an attempt's result: `None` for a 2xx response. Connection errors, DNS, TLS,
/// timeouts, 408, 429 and 5xx are retryable; other statuses (a redirect too) are final.
pub fn failure(result: &Result<Response, (ErrorClass, String)>) -> Option<Failure> {
    match result {
        Ok(resp) => status_class(resp.status).map(|(class, retryable)| Failure {
            class,
            message: match (class, resp.headers.get("location")) {
                (ErrorClass::Http3xx, Some(to)) => format!(
                    "HTTP {} redirect to {to} (redirects are not followed; use the final URL)",
                    resp.status
                ),
                (ErrorClass::Http3xx, None) => {
                    format!("HTTP {} (redirects are not followed)", resp.status)
                }
                _ => format!("HTTP {}", resp.status),
            },
            retryable,
            retry_after: resp
                .headers
                .get("retry-after")
                .and_then(|v| super::backoff::parse_retry_after(v, chrono::Utc::now())),
        }),
        Err((class, message)) => Some(Failure {
            class: *class,
            message: message.clone(),
            retryable: matches!(
                class,
                ErrorClass::Dns | ErrorClass::Connect | ErrorClass::Tls | ErrorClass::Timeout
            ),
            retry_after: None,
        }),
    }
}

/// Whether an HTTP status is a success, a retryable failure, or a final one.
pub fn status_class(status: u16) -> Option<(ErrorClass, bool)> {
    match status {
        200..=299 => None,
        408 | 429 => Some((ErrorClass::Http4xx, true)),
        500..=599 => Some((ErrorClass::Http5xx, true)),
        300..=399 => Some((ErrorClass::Http3xx, false)),
        _ => Some((ErrorClass::Http4xx, false)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(status_class(204), None);
        assert_eq!(status_class(429), Some((ErrorClass::Http4xx, true)));
        assert_eq!(status_class(503), Some((ErrorClass::Http5xx, true)));
        assert_eq!(status_class(400), Some((ErrorClass::Http4xx, false)));
        assert_eq!(status_class(301), Some((ErrorClass::Http3xx, false)));
    }

    #[test]
    fn renders_query_headers_and_typed_json() {
        let action = HttpAction {
            method: "POST".into(),
            url: "https://x.example/calls/{{ event.id }}".into(),
            headers: vec![("Authorization".into(), "Bearer {{ secrets.T }}".into())],
            query: vec![("source".into(), "operator & co".into())],
            body: BodySpec::Json(json!({"live": "{{ event.live }}", "n": "{{ event.id }}"})),
        };
        let ctx = json!({"event": {"id": "ev_1", "live": true}, "secrets": {"T": "s3cr3t"}});
        let r = render(&action, &ctx).unwrap();
        assert_eq!(
            r.url.as_str(),
            "https://x.example/calls/ev_1?source=operator+%26+co"
        );
        assert_eq!(r.body_record, json!({"live": true, "n": "ev_1"}));
        assert_eq!(r.headers[0].1, "Bearer s3cr3t");
        assert_eq!(
            scrub("auth Bearer s3cr3t!", &["s3cr3t".into()]),
            "auth Bearer ***!"
        );
        let bad = HttpAction {
            url: "{{ event.nope }}".into(),
            ..action
        };
        assert_eq!(render(&bad, &ctx).unwrap_err().0, ErrorClass::Template);
    }

    #[test]
    fn templated_url_values_are_encoded_where_they_land() {
        let ctx = json!({"v": "../admin?drop=1#x", "host": "h.example:8080", "u": "https://hooks.example/services/T/B?x=1"});
        assert_eq!(
            render_url("https://{{ host }}/records/{{ v }}?q={{ v }}", &ctx).unwrap(),
            "https://h.example:8080/records/..%2Fadmin%3Fdrop%3D1%23x?q=..%2Fadmin%3Fdrop%3D1%23x"
        );
        assert_eq!(
            render_url("{{ u }}", &ctx).unwrap(),
            "https://hooks.example/services/T/B?x=1"
        );
        assert!(render_url("https://x/a/{{ '..' }}", &ctx).is_err());
        assert!(render_url("https://x/{% if true %}a{% endif %}", &ctx).is_err());
        // A value in the host cannot end the host early or add userinfo.
        for evil in [
            "evil.com/x#",
            "evil.com?",
            "me@evil.com",
            "evil.com\\x",
            "a b",
        ] {
            let ctx = json!({"region": evil});
            assert!(
                render_url("https://{{ region }}.api.example.com/v1", &ctx).is_err(),
                "{evil}"
            );
        }
        let ctx = json!({"region": "eu-1", "base": "https://api.example.com"});
        assert_eq!(
            render_url("https://{{ region }}.api.example.com/v1", &ctx).unwrap(),
            "https://eu-1.api.example.com/v1"
        );
        assert_eq!(
            render_url("{{ base }}/v1/{{ region }}", &ctx).unwrap(),
            "https://api.example.com/v1/eu-1"
        );
    }

    #[test]
    fn masks_filtered_trimmed_and_userinfo_forms_of_a_secret() {
        // minijinja's tojson escapes `&`, `<`, `>`, `'`.
        let ctx = json!({"t": "a&b<c>'d"});
        let m = Masker::new(&["a&b<c>'d".to_owned()]);
        let json = template::render_str("{{ t | tojson }}", &ctx).unwrap();
        assert_eq!(m.text(&json), "\"***\"", "{json}");
        // A mounted secret with a newline, a URL that parsing normalises.
        let m = Masker::new(&["https://Hooks.Example:443/T/B\n".to_owned()]);
        let url = reqwest::Url::parse("https://Hooks.Example:443/T/B").unwrap();
        assert_eq!(m.text(url.as_str()), "***");
        // A password in a URL's userinfo is not recorded.
        let action = HttpAction {
            method: "POST".into(),
            url: "https://u:p%3Db@h.example/x".into(),
            headers: vec![],
            query: vec![],
            body: BodySpec::None,
        };
        let req = render(&action, &json!({})).unwrap();
        assert!(!req.record(&[])["url"].as_str().unwrap().contains("p%3Db"));
    }

    #[test]
    fn masks_every_form_of_a_secret() {
        let m = Masker::new(&["a+b/c= d\"".to_owned()]);
        for shown in [
            "a+b/c= d\"",
            "a%2Bb%2Fc%3D%20d%22",
            "a%2Bb%2Fc%3D+d%22",
            "a+b/c= d\\\"",
        ] {
            assert_eq!(m.text(&format!("x{shown}y")), "x***y", "{shown}");
        }
    }

    #[test]
    fn egress_policy() {
        let p = EgressPolicy::default();
        assert!(p.check("169.254.169.254".parse().unwrap()).is_err());
        assert!(p.check("::ffff:169.254.169.254".parse().unwrap()).is_err());
        assert!(p.check("fd00:ec2::254".parse().unwrap()).is_err());
        assert!(p.check("127.0.0.1".parse().unwrap()).is_ok());
        let only = EgressPolicy {
            deny: vec![],
            allow: Some(parse_nets("X", "127.0.0.0/8").unwrap()),
        };
        assert!(only.check("127.0.0.9".parse().unwrap()).is_ok());
        assert!(only.check("10.0.0.1".parse().unwrap()).is_err());
        assert!(parse_nets("X", "10.0.0.0/33").is_err());
    }
}
