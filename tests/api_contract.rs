//! The spec as a contract: every operation that declares the admin token
//! answers 401 without it, with a status it documents and the common error
//! shape; unknown ids are 404 (documented), never 500.

mod common;

use common::{TestApp, TestDb};
use serde_json::Value;

fn concrete(path: &str) -> String {
    // Path parameters get ids that do not exist.
    path.split('/')
        .map(|seg| if seg.starts_with('{') { "nope_0" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

async fn every_operation_needs_the_token_and_documents_its_statuses(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    let spec: Value = serde_json::from_str(&switchboard::api::spec_json()).unwrap();
    let mut checked = 0;
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let documented: Vec<u16> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .filter_map(|k| k.parse().ok())
                .collect();
            let url = app.url(&concrete(path));
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let secured = op["security"].is_array();
            // Without a token.
            let resp = app
                .client
                .request(m.clone(), &url)
                .json(&serde_json::json!({"workflow": ""}))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            if secured {
                assert_eq!(status, 401, "{method} {path} without a token");
                let body: Value = resp.json().await.unwrap();
                assert_eq!(body["error"]["code"], "unauthorized", "{method} {path}");
            }
            assert!(
                documented.contains(&status),
                "{method} {path} answered {status}, documents {documented:?}"
            );
            // With the token, unknown ids: never a 5xx, and a documented status.
            let resp = app
                .client
                .request(m, &url)
                .bearer_auth(common::TOKEN)
                .json(&serde_json::json!({"workflow": "on: {event: conversation.ended}"}))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            assert!(status < 500, "{method} {path} answered {status}");
            assert!(
                documented.contains(&status),
                "{method} {path} answered {status}, documents {documented:?}"
            );
            if path.contains('{') && method == "get" {
                assert_eq!(status, 404, "{method} {path} for an unknown id");
            }
            checked += 1;
        }
    }
    assert!(checked >= 17, "checked {checked} operations");
}

on_both_backends!(every_operation_needs_the_token_and_documents_its_statuses,);
