//! The committed spec (openapi/openapi.json) is the one the code generates.
//! Regenerate it with `cargo run -- openapi > openapi/openapi.json`.

#[test]
fn committed_spec_is_up_to_date() {
    let generated = switchboard::api::spec_json();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed.trim_end() == generated.trim_end(),
        "openapi/openapi.json is stale: run `cargo run -- openapi > openapi/openapi.json` and commit it"
    );
    let spec: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert!(
        spec["paths"]["/api/v1/events"]["get"]["security"].is_array(),
        "admin routes declare the bearer scheme"
    );
    assert!(
        spec["paths"]["/healthz"]["get"]["security"].is_null(),
        "health is unauthenticated"
    );
}
