//! `switchboard validate`, run as a user would: the shipped examples pass,
//! a broken file fails with exit status 1 and a message pointing at it;
//! unknown names in templates and every unknown key are caught; files,
//! directories and missing paths. `serve` refuses the same workflows.

mod common;

use common::{validate, validate_paths};

#[test]
fn the_shipped_examples_validate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/workflows");
    let (code, stdout, stderr) = validate(&dir);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("4 workflow(s) valid"), "{stdout}");
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

/// One workflow file in a fresh directory; returns the directory and the file.
fn one_file(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(name);
    std::fs::write(&file, text).unwrap();
    (dir, file)
}

const MISSPELLED_ROOT: &str = "on:\n  event: conversation.ended\nsteps:\n  - id: post\n    http:\n      url: \"https://crm.example.com/{{ evnt.conversation_id }}\"\n";

#[test]
fn an_unknown_root_variable_is_an_error_with_caret_and_did_you_mean() {
    let (dir, _) = one_file("typo.yaml", MISSPELLED_ROOT);
    let (code, _, stderr) = validate(dir.path());
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("typo.yaml:6:40: error: `http.url`: unknown variable `evnt`"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "6 |       url: \"https://crm.example.com/{{ evnt.conversation_id }}\"\n  |                                        ^"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("help: did you mean `event`?"), "{stderr}");

    // `when` is decided before steps run; `run` does not exist for setup answers.
    let (dir, _) = one_file(
        "scopes.yaml",
        "on:\n  event: conversation.ended\nwhen: steps.a.ok\nsteps:\n  - id: a\n    if: run.attempt > 1\n    http: { url: \"https://x.example/{{ run.id }}\" }\n",
    );
    let (code, _, stderr) = validate(dir.path());
    assert_eq!(code, 1);
    assert!(
        stderr.contains("scopes.yaml:3:7: error: `when`: `steps` is not available here"),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 error(s)"),
        "`run` is fine in steps: {stderr}"
    );
}

async fn serve_refuses_an_unknown_root_variable(db: &common::TestDb) {
    let dir = common::workflow_dir(&[("typo.yaml", MISSPELLED_ROOT)]);
    let mut settings = common::settings(db);
    settings.workflows_dir = dir.path().to_owned();
    let err = match switchboard::startup::Application::build(settings).await {
        Ok(_) => panic!("serve started with a misspelled root variable"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("typo.yaml:6:40: error: `http.url`: unknown variable `evnt`"),
        "{err}"
    );
}

on_both_backends!(serve_refuses_an_unknown_root_variable);

#[test]
fn unknown_filters_tests_and_functions_are_errors_with_position() {
    let (dir, _) = one_file(
        "names.yaml",
        "on:\n  event: conversation.ended\nwhen: event.payload.status is compleet\nsteps:\n  - id: post\n    if: rnage(2) | length > 1\n    http:\n      url: \"https://x.example/\"\n      headers: { X-Id: \"{{ event.id | nosuchfilter }}\" }\n      json:\n        name: \"{{ conversation.custom_fields.name | uper }}\"\n",
    );
    let (code, _, stderr) = validate(dir.path());
    assert_eq!(code, 1, "{stderr}");
    for expected in [
        "names.yaml:3:31: error: `when`: unknown test `compleet`",
        "names.yaml:6:9: error: `if`: unknown function `rnage`",
        "names.yaml:9:39: error: `http.headers.X-Id`: unknown filter `nosuchfilter`",
        "names.yaml:11:53: error: `http.json`: unknown filter `uper`",
        "help: did you mean `upper`?",
        "help: did you mean `range`?",
        "4 error(s)",
    ] {
        assert!(stderr.contains(expected), "{expected}\n{stderr}");
    }
}

#[test]
fn every_unknown_key_of_a_file_is_reported_with_the_other_errors() {
    let (dir, _) = one_file(
        "keys.yaml",
        "on:\n  event: conversation.ended\n  stauts: completed\nwehn: event.id\nsteps:\n  - id: post\n    http: { url: \"https://x/{{ evnt.id }}\", header: {} }\n    retrry: {}\n    retry: { max_attempt: 3 }\n",
    );
    let (code, _, stderr) = validate(dir.path());
    assert_eq!(code, 1, "{stderr}");
    for expected in [
        "keys.yaml:3:3: error: unknown field `stauts` in `on`",
        "keys.yaml:4:1: error: unknown field `wehn` in the workflow",
        "keys.yaml:7:45: error: unknown field `header` in `http`",
        "keys.yaml:8:5: error: unknown field `retrry` in a step",
        "keys.yaml:9:14: error: unknown field `max_attempt` in `retry`",
        "keys.yaml:7:32: error: `http.url`: unknown variable `evnt`",
        "help: did you mean `status`?",
        "help: did you mean `when`?",
        "help: did you mean `headers`?",
        "help: did you mean `retry`?",
        "help: did you mean `max_attempts`?",
        "6 error(s)",
    ] {
        assert!(stderr.contains(expected), "{expected}\n{stderr}");
    }
}

#[test]
fn validate_takes_files_and_directories_and_says_when_a_path_is_missing() {
    let examples = tempfile::tempdir().unwrap();
    for name in ["a", "b", "c"] {
        std::fs::write(
            examples.path().join(format!("{name}.yaml")),
            "on: { event: conversation.ended }\nsteps: []\n",
        )
        .unwrap();
    }
    std::fs::write(examples.path().join("notes.txt"), "not a workflow").unwrap();
    let examples = examples.path();
    let (dir, file) = one_file(
        "extra.yaml",
        "name: extra\non: { event: conversation.ended }\nsteps: []\n",
    );
    let (code, stdout, stderr) = validate_paths(&[&file, examples]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("ok: extra ("), "{stdout}");
    assert!(stdout.contains("4 workflow(s) valid in "), "{stdout}");

    // One file alone.
    let (code, stdout, _) = validate_paths(&[&file]);
    assert_eq!(code, 0);
    assert!(stdout.contains("1 workflow(s) valid in "), "{stdout}");

    // A path that does not exist is not "not a directory".
    let missing = dir.path().join("nope.yaml");
    let (code, _, stderr) = validate_paths(&[&missing, &file]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("{}: no such file or directory", missing.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("not a"), "{stderr}");

    // Names are unique across every argument.
    let (_dir2, twin) = one_file(
        "twin.yaml",
        "name: extra\non: { event: conversation.ended }\nsteps: []\n",
    );
    let (code, _, stderr) = validate_paths(&[&file, &twin]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("workflow name `extra` is already used by"),
        "{stderr}"
    );
}

#[test]
fn change_is_for_custom_field_workflows_only() {
    let (dir, _) = one_file(
        "lead.yaml",
        "on: { event: conversation.custom_fields.updated, field: lead_status }\nwhen: change.from != none and change.from_source == \"history\"\nsteps:\n  - id: post\n    if: change.to == \"qualified\"\n    http:\n      url: \"https://x.example/\"\n      json: { field: \"{{ change.field }}\", was: \"{{ change.from }}\" }\n",
    );
    let (code, stdout, stderr) = validate(dir.path());
    assert_eq!(code, 0, "{stdout}{stderr}");

    let (dir, _) = one_file(
        "ended.yaml",
        "on: { event: conversation.ended }\nsteps:\n  - id: post\n    http:\n      url: \"https://x.example/\"\n      json: { was: \"{{ change.from }}\" }\n",
    );
    let (code, _, stderr) = validate(dir.path());
    assert_eq!(code, 1);
    assert!(
        stderr.contains("ended.yaml:6:24: error: `http.json`: `change` is not available here: it is only set in workflows on conversation.custom_fields.updated"),
        "{stderr}"
    );
}
