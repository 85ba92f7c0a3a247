//! Traces and logs of the real binary, exported over OTLP/gRPC to an
//! in-process collector: one trace from the webhook to every outbound
//! attempt (retries included), continued after a kill -9, flushed on
//! SIGTERM; JSON logs that carry the trace ids.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::sink::Sink;
use common::{Delivery, ServerProcess, TestDb, client, deliver_to, ended_body, workflow_dir};
use fake_opentelemetry_collector::{ExportedSpan, FakeCollectorServer};

const INBOUND_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const INBOUND_SPAN: &str = "00f067aa0ba902b7";

/// The collector, its spans so far, and the env that points the binary at it.
struct Collector {
    server: FakeCollectorServer,
    spans: Vec<ExportedSpan>,
    endpoint: String,
    /// Where to look when spans are missing (the server's log).
    log: Option<std::path::PathBuf>,
}

impl Collector {
    async fn start() -> Self {
        let server = FakeCollectorServer::start().await.expect("collector");
        let endpoint = server.endpoint();
        Self {
            server,
            spans: Vec::new(),
            endpoint,
            log: None,
        }
    }

    fn env(&self) -> Vec<(&str, &str)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("SWITCHBOARD_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,switchboard=debug"),
        ]
    }

    /// Collects spans until `done` holds for them (or panics after `secs`).
    async fn until(
        &mut self,
        secs: u64,
        done: impl Fn(&[ExportedSpan]) -> bool,
    ) -> &[ExportedSpan] {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let more = self
                .server
                .exported_spans(1, Duration::from_millis(200))
                .await;
            self.spans.extend(more);
            if done(&self.spans) {
                return &self.spans;
            }
            assert!(
                Instant::now() < deadline,
                "spans incomplete after {secs}s ({}): {:#?}",
                self.log
                    .as_ref()
                    .map(|p| std::fs::read_to_string(p).unwrap_or_default())
                    .unwrap_or_default(),
                self.spans
                    .iter()
                    .map(|s| (&s.name, &s.trace_id, &s.span_id, &s.parent_span_id))
                    .collect::<Vec<_>>()
            );
        }
    }
}

fn named<'a>(spans: &'a [ExportedSpan], name: &str) -> Vec<&'a ExportedSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn one<'a>(spans: &'a [ExportedSpan], name: &str) -> &'a ExportedSpan {
    let found = named(spans, name);
    assert_eq!(found.len(), 1, "exactly one `{name}` span: {found:#?}");
    found[0]
}

/// An attribute's value as text (the collector keeps them as `Debug` of OTLP's `AnyValue`).
fn attr(span: &ExportedSpan, key: &str) -> String {
    let raw = span.attributes.get(key).unwrap_or_else(|| {
        panic!(
            "`{}` has no attribute {key}: {:?}",
            span.name, span.attributes
        )
    });
    let re =
        regex::Regex::new(r#"StringValue\("(.*)"\)|(?:IntValue|BoolValue|DoubleValue)\(([^)]*)\)"#)
            .unwrap();
    let caps = re
        .captures(raw)
        .unwrap_or_else(|| panic!("unexpected attribute value {raw}"));
    caps.get(1)
        .or_else(|| caps.get(2))
        .unwrap()
        .as_str()
        .to_owned()
}

/// The trace id inside a `traceparent` header.
fn trace_id_of(traceparent: &str) -> &str {
    traceparent
        .split('-')
        .nth(1)
        .expect("traceparent has a trace id")
}

fn span_id_of(traceparent: &str) -> &str {
    traceparent
        .split('-')
        .nth(2)
        .expect("traceparent has a span id")
}

/// A workflow directory and a log directory for one server process.
struct Dirs {
    _workflows: tempfile::TempDir,
    wf: String,
    logs: tempfile::TempDir,
}

impl Dirs {
    fn new(file: &str, yaml: &str) -> Self {
        let workflows = workflow_dir(&[(file, yaml)]);
        Self {
            wf: workflows.path().display().to_string(),
            _workflows: workflows,
            logs: tempfile::tempdir().unwrap(),
        }
    }

    /// The collector's variables (if any), the workflows, and `extra`.
    fn env<'a>(
        &'a self,
        collector: Option<&'a Collector>,
        extra: &[(&'a str, &'a str)],
    ) -> Vec<(&'a str, &'a str)> {
        let mut env = collector.map(Collector::env).unwrap_or_default();
        env.push(("SWITCHBOARD_WORKFLOWS", self.wf.as_str()));
        env.extend_from_slice(extra);
        env
    }
}

/// A one-step workflow on conversation.ended posting to `url`.
fn one_step(name: &str, url: &str, more: &str) -> String {
    format!(
        "name: {name}\non: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ url: \"{url}\" }}\n{more}"
    )
}

fn two_step_workflow(sink: &Sink) -> String {
    format!(
        "name: traced\non: {{ event: conversation.ended }}\nsteps:\n\
         \x20 - id: first\n    http: {{ url: \"{}\" }}\n    retry: {{ max_attempts: 3, backoff: fixed, initial_delay: 200ms }}\n\
         \x20 - id: second\n    http: {{ url: \"{}\" }}\n",
        sink.url("/flaky/1/first"),
        sink.url("/ok/second"),
    )
}

async fn one_trace_from_webhook_to_every_attempt(db: &TestDb) {
    let mut collector = Collector::start().await;
    let sink = Sink::start().await;
    let dirs = Dirs::new("traced.yaml", &two_step_workflow(&sink));
    let env = dirs.env(Some(&collector), &[]);
    let server = ServerProcess::start(db, dirs.logs.path(), &env).await;
    collector.log = Some(server.log.clone());

    let inbound = format!("00-{INBOUND_TRACE}-{INBOUND_SPAN}-01");
    let body = ended_body("ev_traced", "conv_traced", "completed");
    let resp = common::deliver_with_headers(
        &client(),
        &server.webhook_url(),
        &body,
        &[("traceparent", inbound.as_str())],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let first = sink.wait_for("/flaky/1/first", 2, 15).await;
    let second = sink.wait_for("/ok/second", 1, 15).await;

    let spans = collector
        .until(20, |s| {
            named(s, "attempt").len() >= 3
                && named(s, "step").len() >= 2
                && !named(s, "run").is_empty()
                && !named(s, "dispatch").is_empty()
                && !named(s, "webhook").is_empty()
        })
        .await
        .to_vec();

    // One trace, continuing Operator's traceparent.
    for s in &spans {
        assert_eq!(
            s.trace_id, INBOUND_TRACE,
            "span `{}` is in another trace",
            s.name
        );
    }
    let webhook = one(&spans, "webhook");
    assert_eq!(webhook.parent_span_id, INBOUND_SPAN);
    assert_eq!(webhook.kind, "SPAN_KIND_SERVER");
    assert_eq!(attr(webhook, "http.response.status_code"), "200");
    for name in ["verify", "dedupe", "append", "dispatch"] {
        let s = one(&spans, name);
        assert_eq!(
            s.parent_span_id, webhook.span_id,
            "`{name}` is a child of `webhook`"
        );
    }
    let dispatch = one(&spans, "dispatch");
    assert_eq!(attr(dispatch, "switchboard.workflows.matched"), "traced");
    assert!(
        dispatch.events.iter().any(|e| e.name == "match decision"
            && e.attributes
                .get("switchboard.workflow")
                .is_some_and(|v| v.contains(r#""traced""#))
            && e.attributes
                .get("switchboard.matched")
                .is_some_and(|v| v.contains("BoolValue(true)"))),
        "the match decision is an event of `dispatch`: {:?}",
        dispatch.events
    );
    let run = one(&spans, "run");
    assert_eq!(run.parent_span_id, dispatch.span_id);
    assert_eq!(attr(run, "switchboard.run.status"), "succeeded");
    let run_id = attr(run, "switchboard.run.id");
    assert!(run_id.starts_with("run_"));
    let steps: HashMap<String, &ExportedSpan> = named(&spans, "step")
        .into_iter()
        .map(|s| (attr(s, "switchboard.step"), s))
        .collect();
    assert_eq!(steps.len(), 2, "{steps:#?}");
    for step in steps.values() {
        assert_eq!(step.parent_span_id, run.span_id);
    }
    assert_eq!(attr(steps["first"], "switchboard.step.attempts"), "2");

    // Every span names the event, conversation and agent.
    for s in &spans {
        assert_eq!(attr(s, "operator.event.id"), "ev_traced", "`{}`", s.name);
        assert_eq!(
            attr(s, "operator.conversation.id"),
            "conv_traced",
            "`{}`",
            s.name
        );
        assert_eq!(attr(s, "operator.agent.id"), "ca_test@v1", "`{}`", s.name);
    }

    // Attempts: HTTP client spans under their step; the retry is its own span with its delay.
    let mut attempts = named(&spans, "attempt");
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(attempts.len(), 3);
    let (failed, retried, next) = (attempts[0], attempts[1], attempts[2]);
    for (a, step) in [(failed, "first"), (retried, "first"), (next, "second")] {
        assert_eq!(a.kind, "SPAN_KIND_CLIENT");
        assert_eq!(
            a.parent_span_id, steps[step].span_id,
            "attempt under step `{step}`"
        );
        assert_eq!(attr(a, "http.request.method"), "POST");
        assert_eq!(attr(a, "server.address"), "127.0.0.1");
        assert!(
            attr(a, "url.full").starts_with(&format!("http://127.0.0.1:{}/", sink.addr.port()))
        );
        assert_eq!(attr(a, "switchboard.workflow"), "traced");
        assert_eq!(attr(a, "switchboard.run.id"), run_id);
    }
    assert_eq!(attr(failed, "http.response.status_code"), "500");
    assert_eq!(attr(failed, "error.type"), "500");
    assert_eq!(attr(failed, "switchboard.attempt"), "1");
    assert!(
        attr(failed, "switchboard.retry.delay_ms")
            .parse::<u64>()
            .unwrap()
            >= 200
    );
    assert_eq!(attr(retried, "switchboard.attempt"), "2");
    assert_eq!(attr(retried, "http.response.status_code"), "200");
    assert!(!retried.attributes.contains_key("error.type"));

    // The outbound traceparent continues each attempt's span.
    let seen: Vec<&str> = first
        .iter()
        .chain(second.iter())
        .map(|r| r.headers["traceparent"].as_str())
        .collect();
    for (tp, a) in seen.iter().zip([failed, retried, next]) {
        assert_eq!(trace_id_of(tp), INBOUND_TRACE);
        assert_eq!(
            span_id_of(tp),
            a.span_id,
            "the sink's parent is the attempt span"
        );
    }

    // JSON logs: every line parses; lines inside spans carry the trace ids.
    let log = std::fs::read_to_string(&server.log).unwrap();
    let mut with_trace = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["trace_id"] == INBOUND_TRACE {
            assert_eq!(v["span_id"].as_str().map(str::len), Some(16), "{line}");
            with_trace += 1;
        }
    }
    assert!(with_trace > 0, "no log line carried the trace id:\n{log}");
}

async fn a_resumed_attempt_keeps_the_original_trace_after_kill_9(db: &TestDb) {
    let mut collector = Collector::start().await;
    let sink = Sink::start().await;
    let dirs = Dirs::new(
        "slow.yaml",
        &one_step("slow", &sink.url("/slow-once/3000/crm"), ""),
    );
    let (logs, env) = (&dirs.logs, dirs.env(Some(&collector), &[]));
    let mut server = ServerProcess::start(db, logs.path(), &env).await;
    let r = deliver_to(
        &client(),
        &server.webhook_url(),
        &ended_body("ev_resumed", "conv_resumed", "completed"),
        Delivery::default(),
    )
    .await;
    assert_eq!(r.status(), 200);
    let first = sink.wait_for("/slow-once", 1, 10).await;
    let original = trace_id_of(&first[0].headers["traceparent"]).to_owned();
    server.kill9(); // the attempt is in flight
    let _server = ServerProcess::start(db, logs.path(), &env).await;
    let both = sink.wait_for("/slow-once", 2, 15).await;
    assert_eq!(trace_id_of(&both[1].headers["traceparent"]), original);
    let spans = collector
        .until(15, |s| {
            !named(s, "run").is_empty() && !named(s, "attempt").is_empty()
        })
        .await;
    let run = one(spans, "run");
    assert_eq!(
        run.trace_id, original,
        "the run span is in the webhook's trace"
    );
    let resumed = named(spans, "attempt")
        .into_iter()
        .find(|a| span_id_of(&both[1].headers["traceparent"]) == a.span_id)
        .expect("the resumed attempt's span was exported");
    assert_eq!(resumed.trace_id, original);
    let step = one(spans, "step");
    assert_eq!(resumed.parent_span_id, step.span_id);
    assert_eq!(step.parent_span_id, run.span_id);
}

async fn sigterm_finishes_the_run_in_flight_flushes_traces_and_exits_0(db: &TestDb) {
    let mut collector = Collector::start().await;
    let sink = Sink::start().await;
    let dirs = Dirs::new(
        "slow.yaml",
        &one_step("slow", &sink.url("/slow/1500/crm"), ""),
    );
    let logs = &dirs.logs;
    let mut env = dirs.env(Some(&collector), &[("SWITCHBOARD_SHUTDOWN_GRACE", "10s")]);
    // A long batch delay: only the shutdown flush can deliver the spans in time.
    env.retain(|(k, _)| *k != "OTEL_BSP_SCHEDULE_DELAY");
    env.push(("OTEL_BSP_SCHEDULE_DELAY", "60000"));
    let mut server = ServerProcess::start(db, logs.path(), &env).await;
    let r = deliver_to(
        &client(),
        &server.webhook_url(),
        &ended_body("ev_term", "conv_term", "completed"),
        Delivery::default(),
    )
    .await;
    assert_eq!(r.status(), 200);
    sink.wait_for("/slow/1500", 1, 10).await;
    server.terminate();
    let status = server.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    let spans = collector.until(5, |s| !named(s, "run").is_empty()).await;
    assert_eq!(
        attr(one(spans, "run"), "switchboard.run.status"),
        "succeeded"
    );
    let store = switchboard::store::connect(db.url()).await.unwrap();
    let runs = store
        .list_runs(&switchboard::store::runs::RunQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0].status, "succeeded",
        "the run in flight finished within the grace"
    );
}

async fn after_the_grace_runs_in_flight_are_handed_back(db: &TestDb) {
    let sink = Sink::start().await;
    let dirs = Dirs::new(
        "slow.yaml",
        &one_step(
            "slow",
            &sink.url("/slow-once/20000/crm"),
            "    timeout: 30s\n",
        ),
    );
    let logs = &dirs.logs;
    let env = dirs.env(None, &[("SWITCHBOARD_SHUTDOWN_GRACE", "300ms")]);
    let mut server = ServerProcess::start(db, logs.path(), &env).await;
    let r = deliver_to(
        &client(),
        &server.webhook_url(),
        &ended_body("ev_handback", "conv_handback", "completed"),
        Delivery::default(),
    )
    .await;
    assert_eq!(r.status(), 200);
    sink.wait_for("/slow-once", 1, 10).await;
    server.terminate();
    let status = server.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
    let store = switchboard::store::connect(db.url()).await.unwrap();
    let run = store
        .list_runs(&switchboard::store::runs::RunQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .remove(0);
    assert_eq!(run.status, "running");
    let lease = run.lease_until.expect("a lease");
    assert!(
        lease <= chrono::Utc::now(),
        "the lease was released at shutdown (it ends {lease}), so another worker takes the run at once"
    );
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("handed back"), "{log}");
    // The next process takes it over and the sink sees the same key again.
    let _next = ServerProcess::start(db, logs.path(), &env).await;
    let both = sink.wait_for("/slow-once", 2, 10).await;
    assert_eq!(
        both[0].headers["idempotency-key"],
        both[1].headers["idempotency-key"]
    );
}

async fn the_setup_answer_is_traced_with_its_deadline_and_fallback(db: &TestDb) {
    let mut collector = Collector::start().await;
    let sink = Sink::start().await;
    let dirs = Dirs::new(
        "setup.yaml",
        &format!(
            "name: ctx\non: {{ event: conversation.setup }}\nsteps:\n  - id: lookup\n    http: {{ method: GET, url: \"{}\" }}\n\
             deadline: 300ms\nrespond:\n  context: {{ name: \"{{{{ steps.lookup.json.name }}}}\" }}\n\
             fallback:\n  context: {{ name: unknown }}\n",
            sink.url("/slow/2000/lookup")
        ),
    );
    let (logs, env) = (&dirs.logs, dirs.env(Some(&collector), &[]));
    let server = ServerProcess::start(db, logs.path(), &env).await;
    collector.log = Some(server.log.clone());
    let resp = deliver_to(
        &client(),
        &server.webhook_url(),
        &common::fixture("conversation_setup_inbound_phone.json"),
        Delivery::default(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        answer["context"]["name"], "unknown",
        "the fallback answered"
    );
    let spans = collector
        .until(10, |s| {
            !named(s, "setup").is_empty()
                && !named(s, "webhook").is_empty()
                && !named(s, "attempt").is_empty()
        })
        .await;
    let webhook = one(spans, "webhook");
    let setup = one(spans, "setup");
    assert_eq!(setup.parent_span_id, webhook.span_id);
    assert_eq!(setup.trace_id, webhook.trace_id);
    assert_eq!(attr(setup, "switchboard.workflow"), "ctx");
    assert_eq!(attr(setup, "switchboard.setup.deadline_ms"), "300");
    assert_eq!(attr(setup, "switchboard.setup.fallback"), "true");
    assert!(attr(setup, "switchboard.setup.reason").contains("deadline"));
    let lookup = one(spans, "attempt");
    assert_eq!(
        lookup.parent_span_id, setup.span_id,
        "the lookup is a child of `setup`"
    );
    assert_eq!(attr(lookup, "http.request.method"), "GET");
    let seen = sink.wait_for("/slow/2000/lookup", 1, 5).await;
    assert_eq!(
        trace_id_of(&seen[0].headers["traceparent"]),
        webhook.trace_id
    );
}

/// An OTLP/HTTP receiver: the decoded export requests posted to `/v1/traces`.
async fn http_receiver() -> (
    String,
    std::sync::Arc<
        std::sync::Mutex<
            Vec<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
        >,
    >,
    tokio::task::JoinHandle<()>,
) {
    use poem::{EndpointExt, Route, handler, post, web::Data};
    use prost::Message;
    type Store = std::sync::Arc<
        std::sync::Mutex<
            Vec<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
        >,
    >;
    #[handler]
    async fn traces(
        req: &poem::Request,
        body: poem::Body,
        Data(store): Data<&Store>,
    ) -> &'static str {
        assert_eq!(
            req.header("content-type"),
            Some("application/x-protobuf"),
            "OTLP/HTTP sends protobuf"
        );
        let bytes = body.into_vec().await.unwrap();
        let decoded =
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
                bytes.as_slice(),
            )
            .expect("a valid ExportTraceServiceRequest");
        store.lock().unwrap().push(decoded);
        ""
    }
    let store: Store = Default::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let app = Route::new()
        .at("/v1/traces", post(traces))
        .data(store.clone());
    let server = tokio::spawn(async move {
        let _ = poem::Server::new(poem::listener::TcpListener::bind(addr))
            .run(app)
            .await;
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    (format!("http://{addr}"), store, server)
}

async fn http_protobuf_export_names_the_service(db: &TestDb) {
    let (endpoint, received, server) = http_receiver().await;
    let logs = tempfile::tempdir().unwrap();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
    ];
    let srv = ServerProcess::start(db, logs.path(), &env).await;
    let r = deliver_to(
        &client(),
        &srv.webhook_url(),
        &ended_body("ev_http", "conv_http", "completed"),
        Delivery::default(),
    )
    .await;
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = received.lock().unwrap().clone();
        let resources: Vec<_> = got.iter().flat_map(|r| r.resource_spans.iter()).collect();
        let webhook = resources.iter().find(|rs| {
            rs.scope_spans
                .iter()
                .flat_map(|ss| ss.spans.iter())
                .any(|s| s.name == "webhook")
        });
        if let Some(rs) = webhook {
            let attrs: HashMap<String, String> = rs
                .resource
                .as_ref()
                .unwrap()
                .attributes
                .iter()
                .map(|kv| (kv.key.clone(), format!("{:?}", kv.value)))
                .collect();
            assert!(
                attrs["service.name"].contains(r#""switchboard""#),
                "{attrs:?}"
            );
            assert!(
                attrs["deployment.environment"].contains(r#""test""#),
                "{attrs:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no webhook span over OTLP/HTTP: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.abort();
}

async fn a_collector_that_is_down_fails_nothing(db: &TestDb) {
    let sink = Sink::start().await;
    let dirs = Dirs::new("ok.yaml", &one_step("ok", &sink.url("/ok/down"), ""));
    let (logs, wf) = (&dirs.logs, dirs.wf.clone());
    // Nothing listens on port 9 here: every export fails.
    let env = [
        ("SWITCHBOARD_WORKFLOWS", wf.as_str()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ];
    let srv = ServerProcess::start(db, logs.path(), &env).await;
    for i in 0..20 {
        let r = deliver_to(
            &client(),
            &srv.webhook_url(),
            &ended_body(&format!("ev_down_{i}"), "conv_down", "completed"),
            Delivery::default(),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(sink.wait_for("/ok/down", 20, 15).await.len(), 20);
}

on_both_backends!(
    a_collector_that_is_down_fails_nothing,
    http_protobuf_export_names_the_service,
    the_setup_answer_is_traced_with_its_deadline_and_fallback,
    one_trace_from_webhook_to_every_attempt,
    a_resumed_attempt_keeps_the_original_trace_after_kill_9,
    sigterm_finishes_the_run_in_flight_flushes_traces_and_exits_0,
    after_the_grace_runs_in_flight_are_handed_back,
);
