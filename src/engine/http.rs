//! One HTTP action: render a step's request from its templates, send it with
//! a timeout, and classify what happened. Used by workflow runs (and by setup
//! lookups), so there is one implementation of an outbound call.

use std::collections::BTreeMap;
use std::time::Duration;

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
    Http3xx,
    Http4xx,
    Http5xx,
    /// A template or expression failed (not retried).
    Template,
    /// A declared secret is not set (not retried).
    Secret,
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
            ErrorClass::Request => "request",
        }
    }
}

/// A request ready to send.
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
    /// The request as recorded in the attempt history.
    pub fn record(&self) -> Value {
        let headers: BTreeMap<&str, &str> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        json!({
            "method": self.method.as_str(),
            "url": self.url.as_str(),
            "headers": headers,
            "body": self.body_record,
        })
    }
}

/// Renders a step's request in a template context.
pub fn render(action: &HttpAction, ctx: &Value) -> Result<Request, (ErrorClass, String)> {
    let t = |e: TemplateError| (ErrorClass::Template, e.to_string());
    let url_text = template::render_str(&action.url, ctx).map_err(t)?;
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

/// A URL fit for a span's `url.full`: user and password removed (secrets in
/// templates are already rendered as `***` in the masked request).
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
    let class = if e.is_timeout() {
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

/// Sends a request with `extra` headers (Idempotency-Key, User-Agent, traceparent) and a timeout.
pub async fn send(
    client: &reqwest::Client,
    req: &Request,
    extra: &[(&str, String)],
    timeout: Duration,
) -> Result<Response, (ErrorClass, String)> {
    let mut builder = client
        .request(req.method.clone(), req.url.clone())
        .timeout(timeout);
    for (k, v) in extra {
        builder = builder.header(*k, v);
    }
    for (k, v) in &req.headers {
        builder = builder.header(k, v);
    }
    if let Some((bytes, content_type)) = &req.body {
        if !req
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            builder = builder.header("content-type", content_type);
        }
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

/// The HTTP client every outbound call uses (`User-Agent: switchboard/<version>`).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(super::user_agent())
        .build()
        .expect("HTTP client")
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
/// timeouts, 408, 429 and 5xx are retryable; other statuses are final.
pub fn failure(result: &Result<Response, (ErrorClass, String)>) -> Option<Failure> {
    match result {
        Ok(resp) => status_class(resp.status).map(|(class, retryable)| Failure {
            class,
            message: format!("HTTP {}", resp.status),
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

/// Replaces every secret value in `text` with `***`.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_owned();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s.as_str(), "***");
    }
    out
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
}
