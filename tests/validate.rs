//! `switchboard validate`, run as a user would: the shipped examples pass,
//! a broken file fails with exit status 1 and a message pointing at it.

use std::process::Command;

fn validate(dir: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("validate")
        .arg(dir)
        .env_remove("SWITCHBOARD_WORKFLOWS")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_shipped_examples_validate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/workflows");
    let (code, stdout, stderr) = validate(&dir);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("3 workflow(s) valid"), "{stdout}");
    assert!(!stderr.contains(": error:"), "{stderr}");
}

/// The default `./workflows` holds only the quick start's workflow, which
/// needs no secret: nothing in it fails on a fresh start for want of one.
#[test]
fn the_default_workflows_directory_needs_no_secret() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows");
    let (code, stdout, stderr) = validate(&dir);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("1 workflow(s) valid"), "{stdout}");
    assert!(stdout.contains("quickstart-sink"), "{stdout}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn a_broken_file_fails_with_file_line_column_and_caret() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.yaml"),
        "on:\n  event: conversation.ended\nsteps:\n  - id: post\n    http: { url: \"https://x/{{ event.id\" }\n    retrry: {}\n",
    )
    .unwrap();
    let (code, _, stderr) = validate(dir.path());
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("broken.yaml:6:5: error: unknown field `retrry`"),
        "{stderr}"
    );
    assert!(stderr.contains("6 |     retrry: {}\n  |     ^"), "{stderr}");

    std::fs::write(
        dir.path().join("broken.yaml"),
        "on:\n  event: conversation.ended\nsteps:\n  - id: post\n    http: { url: \"https://x/{{ event.id\" }\n",
    )
    .unwrap();
    let (code, _, stderr) = validate(dir.path());
    assert_eq!(code, 1);
    assert!(
        stderr.contains("broken.yaml:5:18: error: `http.url` does not compile"),
        "{stderr}"
    );
}
