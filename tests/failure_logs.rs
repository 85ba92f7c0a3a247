//! Loud failures (issue 15): every run that fails for good logs exactly one
//! WARN line with its run id, workflow, step and cause, a missing secret or a
//! template error included, naming secrets but never showing their values.
//! The real binary, its JSON log read back. And secrets, in all their
//! forms, reach neither the log nor any span attribute (issue 11, defect 6).

mod common;

use std::time::{Duration, Instant};

use common::sink::Sink;
use common::{
    Delivery, ServerProcess, TestDb, client, deliver_to, ended_body, runs_of, workflow_dir,
};
use serde_json::Value;

async fn every_failed_run_logs_one_warning(db: &TestDb) {
    let sink = Sink::start().await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let missing = format!("SB_MISSING_{}", &suffix[..8]);
    let present = format!("SB_PRESENT_{}", &suffix[..8]);
    let value = format!("v4lue-{}", &suffix[..12]);
    let workflows = workflow_dir(&[
        (
            "missing-secret.yaml",
            &format!(
                "on: {{ event: conversation.ended }}\nsecrets: [{missing}]\nsteps:\n  - id: notify\n    http: {{ url: \"{}\", headers: {{ X-Key: \"{{{{ secrets.{missing} }}}}\" }} }}\n",
                sink.url("/ok/never")
            ),
        ),
        (
            "template-error.yaml",
            &format!(
                "on: {{ event: conversation.ended }}\nsteps:\n  - id: render\n    http: {{ url: \"{}\", json: {{ x: \"{{{{ event.payload.nope.deeper }}}}\" }} }}\n",
                sink.url("/ok/never")
            ),
        ),
        (
            "rejected.yaml",
            &format!(
                "on: {{ event: conversation.ended }}\nsecrets: [{present}]\nsteps:\n  - id: post\n    http: {{ url: \"{}\", query: {{ key: \"{{{{ secrets.{present} }}}}\" }} }}\n",
                sink.url("/status/400/rejected")
            ),
        ),
    ]);
    let logs = tempfile::tempdir().unwrap();
    let wf_dir = workflows.path().display().to_string();
    let server = ServerProcess::start(
        db,
        logs.path(),
        &[
            ("SWITCHBOARD_WORKFLOWS", wf_dir.as_str()),
            ("SWITCHBOARD_LOG_FORMAT", "json"),
            (present.as_str(), value.as_str()),
        ],
    )
    .await;
    let resp = deliver_to(
        &client(),
        &server.webhook_url(),
        &ended_body("ev_loud", "conv_loud", "completed"),
        Delivery::default(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(15);
    let runs = loop {
        let runs = runs_of(&server.base()).await;
        if runs.len() == 3 && runs.iter().all(|r| r["status"] == "failed") {
            break runs;
        }
        assert!(Instant::now() < deadline, "runs: {runs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await; // the log is written after the save
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(!log.contains(&value), "a secret value reached the log");
    for run in &runs {
        let id = run["id"].as_str().unwrap();
        let warnings: Vec<Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["level"] == "WARN" && l.to_string().contains(id))
            .collect();
        assert_eq!(
            warnings.len(),
            1,
            "run {id} ({}) logged {warnings:?}",
            run["workflow"]
        );
        let line = warnings[0].to_string();
        assert!(line.contains(run["workflow"].as_str().unwrap()), "{line}");
        let (step, cause) = match run["workflow"].as_str().unwrap() {
            "missing-secret" => ("notify", missing.as_str()),
            "template-error" => ("render", "nope"),
            _ => ("post", "HTTP 400"),
        };
        assert!(line.contains(&format!("\"step\":\"{step}\"")), "{line}");
        assert!(line.contains(cause), "{line}");
    }
    drop(server);
}

/// A secret URL and a secret in the query of a failing request: the spans
/// (exported over OTLP to an in-process collector) and the log show `***`.
async fn secrets_reach_no_span_and_no_log_line(db: &TestDb) {
    use fake_opentelemetry_collector::FakeCollectorServer;
    let mut collector = FakeCollectorServer::start().await.expect("collector");
    let endpoint = collector.endpoint();
    let sink = Sink::start().await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let url_name = format!("SB_URL_{}", &suffix[..8]);
    let token_name = format!("SB_TOK_{}", &suffix[..8]);
    let hook = sink.url(&format!("/status/400/hook-{}", &suffix[..10]));
    let token = format!("a+b/c={}", &suffix[10..18]);
    let workflows = workflow_dir(&[(
        "hook.yaml",
        &format!(
            "on: {{ event: conversation.ended }}\nsecrets: [{url_name}, {token_name}]\nsteps:\n  - id: post\n    http:\n      url: \"{{{{ secrets.{url_name} }}}}\"\n      query: {{ t: \"{{{{ secrets.{token_name} }}}}\" }}\n"
        ),
    )]);
    let logs = tempfile::tempdir().unwrap();
    let wf_dir = workflows.path().display().to_string();
    let server = ServerProcess::start(
        db,
        logs.path(),
        &[
            ("SWITCHBOARD_WORKFLOWS", wf_dir.as_str()),
            ("SWITCHBOARD_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,switchboard=debug"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            (url_name.as_str(), hook.as_str()),
            (token_name.as_str(), token.as_str()),
        ],
    )
    .await;
    deliver_to(
        &client(),
        &server.webhook_url(),
        &ended_body("ev_span", "conv_span", "completed"),
        Delivery::default(),
    )
    .await;
    assert_eq!(sink.wait_for("/status/400/", 1, 10).await.len(), 1);
    let mut spans = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !spans
        .iter()
        .any(|s: &fake_opentelemetry_collector::ExportedSpan| s.name == "run")
    {
        spans.extend(
            collector
                .exported_spans(1, Duration::from_millis(200))
                .await,
        );
        assert!(Instant::now() < deadline, "no run span: {spans:?}");
    }
    let attempt = spans
        .iter()
        .find(|s| s.name == "attempt")
        .expect("an attempt span");
    assert!(
        format!("{:?}", attempt.attributes).contains("***?t=***"),
        "{:?}",
        attempt.attributes
    );
    let mut form = reqwest::Url::parse("http://x/").unwrap();
    form.query_pairs_mut().append_pair("k", &token);
    let encoded = form.query().unwrap()[2..].to_owned();
    let all_spans = format!("{spans:?}");
    let log = std::fs::read_to_string(&server.log).unwrap();
    for shown in [
        hook.as_str(),
        token.as_str(),
        encoded.as_str(),
        &suffix[..10],
    ] {
        assert!(!all_spans.contains(shown), "a span shows `{shown}`");
        assert!(!log.contains(shown), "the log shows `{shown}`");
    }
    drop(server);
}

on_both_backends!(
    every_failed_run_logs_one_warning,
    secrets_reach_no_span_and_no_log_line
);
