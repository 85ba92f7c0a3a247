//! A local HTTP sink standing in for the user's systems: records every
//! request and answers by path.
//!
//! - `/ok/...`: 200 `{"id": "crm-<n>", "ok": true}`
//! - `/flaky/<k>/...`: the first k requests to that path answer 500 then 503 alternately, then 200
//! - `/status/<code>/...`: that status
//! - `/slow/<ms>/...`: waits, then 200 (`/slow-once/<ms>/...`: only the first time)
//! - `/retry-after/<secs>/...`: first request 429 with Retry-After, then 200
//! - `/nul/...`: 200 with a raw NUL byte in a text body; `/nul-json/...`: 200 with `\u0000` in a JSON string
//! - `/redirect/...`: 301 to `/ok/redirected`
//! - `/echo/...`: 200, the request's `x-echo` header as the response's, the query as the body

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use poem::http::StatusCode;
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::{Body, Request, Response, Route, Server, handler, web::Data};

#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub query: Option<String>,
    pub method: String,
    pub headers: HashMap<String, String>,
    pub body: String,
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Default)]
struct State {
    received: Mutex<Vec<Received>>,
    counts: Mutex<HashMap<String, usize>>,
    /// Requests being answered now, and the most there ever were at once.
    in_flight: Mutex<(usize, usize)>,
}

/// Counts a request in flight until dropped.
struct InFlight(Arc<State>);

impl InFlight {
    fn new(state: &Arc<State>) -> Self {
        let mut f = state.in_flight.lock().unwrap();
        f.0 += 1;
        f.1 = f.1.max(f.0);
        Self(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.lock().unwrap().0 -= 1;
    }
}

pub struct Sink {
    pub addr: SocketAddr,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[handler]
async fn record(req: &Request, body: Body, state: Data<&Arc<State>>) -> Response {
    let _in_flight = InFlight::new(&state);
    let path = req.uri().path().to_owned();
    let body = body.into_string().await.unwrap_or_default();
    let n = {
        let mut counts = state.counts.lock().unwrap();
        let c = counts.entry(path.clone()).or_default();
        *c += 1;
        *c
    };
    state.received.lock().unwrap().push(Received {
        path: path.clone(),
        query: req.uri().query().map(str::to_owned),
        method: req.method().to_string(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    v.to_str().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
        body,
        at: Instant::now(),
    });
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ok = || {
        Response::builder()
            .status(StatusCode::OK)
            .content_type("application/json")
            .body(serde_json::json!({"id": format!("crm-{n}"), "ok": true, "name": "Zoë", "vip": true}).to_string())
    };
    match parts.as_slice() {
        ["flaky", k, ..] if n <= k.parse::<usize>().unwrap_or(0) => {
            let code = if n % 2 == 1 { 500 } else { 503 };
            Response::builder()
                .status(StatusCode::from_u16(code).unwrap())
                .body("temporarily broken")
        }
        ["status", code, ..] => Response::builder()
            .status(StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap())
            .body(format!("answered {code}")),
        ["slow-once", ms, ..] if n == 1 => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(1000))).await;
            ok()
        }
        ["slow", ms, ..] => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(1000))).await;
            ok()
        }
        ["retry-after", secs, ..] if n == 1 => Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .header("retry-after", *secs)
            .body("slow down"),
        ["nul", ..] => Response::builder()
            .status(StatusCode::OK)
            .content_type("text/plain")
            .body("before\0after"),
        ["nul-json", ..] => Response::builder()
            .status(StatusCode::OK)
            .content_type("application/json")
            .body(r#"{"note": "a\u0000b"}"#),
        ["redirect", ..] => Response::builder()
            .status(StatusCode::MOVED_PERMANENTLY)
            .header("location", "/ok/redirected")
            .body("moved"),
        ["echo", ..] => Response::builder()
            .status(StatusCode::OK)
            .header(
                "x-echo",
                req.headers()
                    .get("x-echo")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default(),
            )
            .body(req.uri().query().unwrap_or_default().to_owned()),
        _ => ok(),
    }
}

impl Sink {
    pub async fn start() -> Self {
        let acceptor = TcpListener::bind("127.0.0.1:0")
            .into_acceptor()
            .await
            .unwrap();
        let addr = *acceptor.local_addr()[0].as_socket_addr().unwrap();
        let state = Arc::new(State::default());
        let app = poem::EndpointExt::data(Route::new().at("/*path", record), state.clone());
        let server = tokio::spawn(async move {
            let _ = Server::new_with_acceptor(acceptor).run(app).await;
        });
        Self {
            addr,
            state,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The most requests this sink was answering at once.
    #[allow(dead_code)]
    pub fn max_in_flight(&self) -> usize {
        self.state.in_flight.lock().unwrap().1
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    pub fn received_on(&self, prefix: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path.starts_with(prefix))
            .collect()
    }

    /// Waits until `n` requests arrived whose path starts with `prefix` (or panics after `secs`).
    pub async fn wait_for(&self, prefix: &str, n: usize, secs: u64) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.received_on(prefix);
            if got.len() >= n {
                return got;
            }
            if Instant::now() > deadline {
                panic!(
                    "sink got {} of {n} requests on {prefix} within {secs}s: {:?}",
                    got.len(),
                    got.iter().map(|r| &r.path).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
