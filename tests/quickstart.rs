//! The README's quick start, run as written: the shell lines of its
//! "Quick start" section are read from README.md and executed in order against
//! the built binary (`cargo run --release --` becomes that binary; the ports
//! 8080 and 9000 become free ones, the only change). It must end as the README
//! says: a signed event stored, a duplicate acknowledged as such, a run of the
//! shipped `./workflows` that succeeded against the local sink, visible in the API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");
const CARGO_RUN: &str = "cargo run --release -- ";

/// The shell lines of the README's Quick start section, in order.
fn quick_start_lines() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(MANIFEST).join("README.md")).unwrap();
    let start = readme
        .find("\n## Quick start\n")
        .expect("README has a Quick start");
    let section = &readme[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let mut lines = Vec::new();
    let mut in_sh = false;
    for line in section[..end].lines() {
        match line.trim() {
            "```sh" => in_sh = true,
            "```" if in_sh => in_sh = false,
            l if in_sh && !l.is_empty() && !l.starts_with('#') => lines.push(l.to_owned()),
            _ => {}
        }
    }
    lines
}

/// Two distinct free ports (both held while the second is picked).
fn two_free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

struct Background(Vec<Child>);

impl Drop for Background {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Shell {
    env: BTreeMap<String, String>,
    ports: [(String, String); 2],
}

impl Shell {
    fn localize(&self, line: &str) -> String {
        let bin = env!("CARGO_BIN_EXE_switchboard");
        let mut l = line.replace(CARGO_RUN, &format!("'{bin}' "));
        for (from, to) in &self.ports {
            l = l.replace(from.as_str(), to);
        }
        l
    }

    fn command(&self, line: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(self.localize(line))
            .current_dir(MANIFEST)
            .env_clear()
            .envs(&self.env)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs a line to completion: (exit code, stdout + stderr).
    fn run(&self, line: &str) -> (i32, String) {
        let out = self.command(line).output().unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }
}

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> Option<String>) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_quick_start_runs_as_written_and_ends_in_a_succeeded_run() {
    let lines = quick_start_lines();
    let expect = |l: &str| {
        assert!(
            lines.iter().any(|x| x.contains(l)),
            "the quick start no longer has `{l}`: {lines:#?}"
        )
    };
    for l in [
        "-- serve",
        "-- sink",
        "-- sign --curl",
        "api/v1/runs?status=succeeded",
    ] {
        expect(l);
    }

    let tmp = tempfile::tempdir().unwrap();
    let (server_port, sink_port) = two_free_ports();
    // The shipped workflows, with the sink's port moved like the README's lines.
    let workflows: PathBuf = tmp.path().join("workflows");
    std::fs::create_dir(&workflows).unwrap();
    for entry in std::fs::read_dir(Path::new(MANIFEST).join("workflows")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            workflows.join(path.file_name().unwrap()),
            text.replace("127.0.0.1:9000", &format!("127.0.0.1:{sink_port}")),
        )
        .unwrap();
    }
    let mut shell = Shell {
        env: BTreeMap::from([
            ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
            (
                "SWITCHBOARD_LISTEN".into(),
                format!("127.0.0.1:{server_port}"),
            ),
            (
                "SWITCHBOARD_DATABASE_URL".into(),
                format!("sqlite://{}/switchboard.db", tmp.path().display()),
            ),
            (
                "SWITCHBOARD_WORKFLOWS".into(),
                workflows.display().to_string(),
            ),
        ]),
        ports: [
            ("127.0.0.1:8080".into(), format!("127.0.0.1:{server_port}")),
            ("127.0.0.1:9000".into(), format!("127.0.0.1:{sink_port}")),
        ],
    };
    let server_log = tmp.path().join("serve.log");
    let sink_log = tmp.path().join("sink.log");
    let mut background = Background(Vec::new());
    let mut sign_line = None;
    let mut ran = Vec::new();
    for line in &lines {
        if line == "cargo test" {
            continue;
        }
        if let Some(assignments) = line.strip_prefix("export ") {
            for a in assignments.split_whitespace() {
                let (k, v) = a.split_once('=').expect("export NAME=VALUE");
                shell.env.insert(k.into(), v.into());
            }
            continue;
        }
        if line.ends_with("-- serve") {
            let mut cmd = shell.command(line);
            cmd.stdout(Stdio::null())
                .stderr(std::fs::File::create(&server_log).unwrap());
            background.0.push(cmd.spawn().unwrap());
            let ready = format!("http://127.0.0.1:{server_port}/readyz");
            wait_for("serve to be ready", Duration::from_secs(20), || {
                let (code, _) = shell.run(&format!("curl -sf {ready}"));
                (code == 0).then(String::new)
            });
            continue;
        }
        if line.ends_with("-- sink") {
            let mut cmd = shell.command(&format!("{line} --listen 127.0.0.1:9000"));
            cmd.stdout(std::fs::File::create(&sink_log).unwrap())
                .stderr(Stdio::null());
            background.0.push(cmd.spawn().unwrap());
            wait_for("the sink to listen", Duration::from_secs(10), || {
                std::fs::read_to_string(&sink_log)
                    .ok()
                    .filter(|t| t.contains("listening"))
            });
            continue;
        }
        if line.contains("-- sign --curl") {
            let (code, out) = shell.run(line);
            assert_eq!(code, 0, "{line}\n{out}");
            assert!(out.contains("HTTP/1.1 200"), "{out}");
            assert!(out.contains("x-switchboard-duplicate: false"), "{out}");
            assert!(
                out.contains(r#"{"event_id":"ev_QuickStart001","sequence":1}"#),
                "{out}"
            );
            // The workflow posts to the sink.
            let printed = wait_for(
                "the sink to print the request",
                Duration::from_secs(10),
                || {
                    std::fs::read_to_string(&sink_log)
                        .ok()
                        .filter(|t| t.contains("POST /calls/conv_QuickStart01"))
                },
            );
            assert!(printed.contains("idempotency-key: run_"), "{printed}");
            assert!(printed.contains("\"status\": \"completed\""), "{printed}");
            // "Send the same line again": a duplicate, said so in the header.
            let (code, out) = shell.run(line);
            assert_eq!(code, 0, "{out}");
            assert!(out.contains("x-switchboard-duplicate: true"), "{out}");
            assert!(
                out.contains(r#"{"event_id":"ev_QuickStart001","sequence":1}"#),
                "{out}"
            );
            sign_line = Some(line.clone());
            continue;
        }
        if line.starts_with("curl ") {
            let out = wait_for(line, Duration::from_secs(10), || {
                let (code, out) = shell.run(line);
                let body: serde_json::Value = serde_json::from_str(&out).ok()?;
                if code != 0 || body.get("error").is_some() {
                    return None;
                }
                if line.contains("status=succeeded") && body["data"].as_array()?.is_empty() {
                    return None;
                }
                Some(out)
            });
            ran.push((line.clone(), out));
            continue;
        }
        panic!("the test does not know how to run this quick start line: {line}");
    }
    assert!(sign_line.is_some(), "no sign line ran");

    let runs = &ran
        .iter()
        .find(|(l, _)| l.contains("runs?status=succeeded"))
        .expect("the runs line ran")
        .1;
    let runs: serde_json::Value = serde_json::from_str(runs).unwrap();
    let run = &runs["data"][0];
    assert_eq!(run["status"], "succeeded", "{runs}");
    assert_eq!(run["workflow"], "quickstart-sink", "{runs}");
    assert_eq!(run["event_id"], "ev_QuickStart001", "{runs}");
    assert_eq!(
        runs["data"].as_array().unwrap().len(),
        1,
        "run once: {runs}"
    );
    if let Some((_, event)) = ran
        .iter()
        .find(|(l, _)| l.contains("events/ev_QuickStart001"))
    {
        let event: serde_json::Value = serde_json::from_str(event).unwrap();
        assert_eq!(event["match_decisions"][0]["matched"], true, "{event}");
        assert_eq!(event["runs"][0]["status"], "succeeded", "{event}");
    }
    // And in /docs.
    let (code, out) = shell.run(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{server_port}/docs"
    ));
    assert_eq!((code, out.as_str()), (0, "200"));
    // The duplicate is logged with ids as text, not Rust debug output.
    let log = std::fs::read_to_string(&server_log).unwrap();
    assert!(log.contains("duplicate delivery acknowledged"), "{log}");
    assert!(!log.contains("EventId"), "{log}");
}
