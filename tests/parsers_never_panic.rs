//! Property tests: the signature verifier, the envelope parser and the
//! conversation fold never panic, whatever bytes and headers arrive.

use proptest::prelude::*;
use serde_json::{Value, json};
use switchboard::store::projection::ConversationState;
use switchboard::webhook::envelope::Envelope;
use switchboard::webhook::signature::{
    DeliveryHeaders, SigningKeys, Tolerance, check_timestamp, verify_delivery,
};

/// Any JSON value, a few levels deep, with strings that include NUL and other controls.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::String),
        "[\\x00-\\x1f a-z:.+-]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{0,8}|.{0,4}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A body shaped like an envelope, with arbitrary values in every field Operator sends.
fn envelope_like() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(json!("ev_1")), json_value()],
        json_value(),
        json_value(),
        prop_oneof![Just(json!("conv_1")), json_value()],
        prop_oneof![
            Just("conversation.setup"),
            Just("conversation.ended"),
            Just("conversation.custom_fields.updated"),
            Just("x"),
        ],
        proptest::collection::btree_map(
            prop_oneof![
                Just("key".to_owned()),
                Just("name".to_owned()),
                Just("value".to_owned()),
                Just("previous_value".to_owned()),
                Just("status".to_owned()),
                Just("direction".to_owned()),
                Just("channel".to_owned()),
                Just("failure_reason".to_owned()),
            ],
            json_value(),
            0..6,
        ),
    )
        .prop_map(|(id, created_at, livemode, conv, ty, fields)| {
            let mut payload: serde_json::Map<String, Value> = fields.into_iter().collect();
            payload.insert("type".into(), json!(ty));
            json!({"id": id, "created_at": created_at, "livemode": livemode,
                "conversation_id": conv, "agent_id": "ca_a@v1", "payload": payload})
            .to_string()
            .into_bytes()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any bytes as a body and any text as headers (any key, any clock, any
    /// tolerance): the verifier returns, never panics, and never accepts.
    #[test]
    fn the_verifier_never_panics(
        key in "[!-+\\--~]{1,40}",
        url in any::<String>(),
        ts in proptest::option::of(prop_oneof![any::<String>(), any::<i64>().prop_map(|n| n.to_string())]),
        idem in proptest::option::of(any::<String>()),
        sig in proptest::option::of(prop_oneof![any::<String>(), "[0-9a-fA-F]{64}"]),
        body in proptest::collection::vec(any::<u8>(), 0..1024),
        now in any::<i64>(),
        max_age in any::<i64>(),
        max_future in any::<i64>(),
    ) {
        let keys = SigningKeys::parse(&key).unwrap();
        let tolerance = Tolerance { max_age_secs: max_age, max_future_secs: max_future };
        let r = verify_delivery(
            &keys,
            &url,
            DeliveryHeaders { timestamp: ts.as_deref(), idempotency_key: idem.as_deref(), signature: sig.as_deref() },
            &body,
            now,
            tolerance,
        );
        prop_assert!(r.is_err());
        if let Some(ts) = &ts {
            let _ = check_timestamp(ts, now, tolerance);
        }
    }

    /// Any bytes: the envelope parser returns Ok or an error, never panics.
    #[test]
    fn the_envelope_parser_never_panics_on_bytes(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Envelope::parse(&body);
    }

    /// Envelope-shaped bodies with arbitrary values: parsing, decoding the
    /// payload and folding them into a conversation never panic, and the
    /// fold keeps no NUL (what the databases refuse).
    #[test]
    fn parsing_and_folding_envelopes_never_panic(bodies in proptest::collection::vec(envelope_like(), 1..6)) {
        let mut state = ConversationState::new("conv_1");
        for (i, body) in bodies.iter().enumerate() {
            if let Ok(env) = Envelope::parse(body) {
                let _ = env.kind();
                let _ = state.field_update(&env);
                state.apply(i as i64 + 1, &env, chrono::Utc::now());
            }
        }
        let stored = serde_json::to_string(&state).unwrap();
        prop_assert!(!stored.contains("\\u0000"), "{}", stored);
    }
}
