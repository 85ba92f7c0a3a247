//! The verifier against Operator's published vectors, and a property test:
//! arbitrary input never panics and only the exact signature passes.

use proptest::prelude::*;
use serde_json::Value;
use switchboard::webhook::signature::{
    DeliveryHeaders, SignedParts, SigningKey, SigningKeys, Tolerance, VerifyError, check_timestamp,
    sign, verify_delivery,
};

fn vectors() -> Value {
    serde_json::from_str(include_str!("fixtures/signature_vectors.json")).unwrap()
}

#[test]
fn every_vector_gives_its_expected_result() {
    let v = vectors();
    let keys = SigningKeys::parse(v["signing_key"].as_str().unwrap()).unwrap();
    let key = SigningKey::new(v["signing_key"].as_str().unwrap()).unwrap();
    let mut checked = 0;
    for case in v["vectors"].as_array().unwrap() {
        let h = &case["headers"];
        let ts = h["X-Timestamp"].as_str().unwrap();
        let parts = SignedParts {
            url: case["url_signed"].as_str().unwrap(),
            idempotency_key: h["X-Idempotency-Key"].as_str().unwrap(),
            timestamp: ts,
            body: case["content"].as_str().unwrap().as_bytes(),
        };
        assert_eq!(
            sign(&key, &parts),
            case["computed_signature"].as_str().unwrap(),
            "{}",
            case["name"]
        );
        let now: i64 = ts.parse().unwrap();
        let result = verify_delivery(
            &keys,
            parts.url,
            DeliveryHeaders {
                timestamp: Some(ts),
                idempotency_key: Some(parts.idempotency_key),
                signature: h["X-Signature"].as_str(),
            },
            parts.body,
            now,
            Tolerance::default(),
        );
        assert_eq!(
            result.is_ok(),
            case["expect_valid"].as_bool().unwrap(),
            "{}",
            case["name"]
        );
        checked += 1;
    }
    assert_eq!(checked, 6);
}

#[test]
fn freshness_cases() {
    let v = vectors();
    for case in v["freshness_cases"]["cases"].as_array().unwrap() {
        let ts = case["x_timestamp"].as_i64().unwrap().to_string();
        let now = case["now"].as_i64().unwrap();
        assert_eq!(
            check_timestamp(&ts, now, Tolerance::default()).is_ok(),
            case["accept"].as_bool().unwrap(),
            "{}",
            case["why"]
        );
    }
}

#[test]
fn missing_headers_are_named() {
    let keys = SigningKeys::parse("k").unwrap();
    let full = DeliveryHeaders {
        timestamp: Some("1"),
        idempotency_key: Some("i"),
        signature: Some("00"),
    };
    for (headers, name) in [
        (
            DeliveryHeaders {
                timestamp: None,
                ..full
            },
            "X-Timestamp",
        ),
        (
            DeliveryHeaders {
                idempotency_key: None,
                ..full
            },
            "X-Idempotency-Key",
        ),
        (
            DeliveryHeaders {
                signature: None,
                ..full
            },
            "X-Signature",
        ),
    ] {
        assert_eq!(
            verify_delivery(&keys, "u", headers, b"{}", 1, Tolerance::default()),
            Err(VerifyError::MissingHeader(name))
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random headers and bodies: never a panic, and (with overwhelming probability) never accepted.
    #[test]
    fn arbitrary_input_never_panics_or_passes(
        ts in proptest::option::of(".{0,24}"),
        idem in proptest::option::of(".{0,64}"),
        sig in proptest::option::of("[0-9a-fA-F]{0,70}|.{0,70}"),
        body in proptest::collection::vec(any::<u8>(), 0..512),
        now in any::<i64>(),
    ) {
        let keys = SigningKeys::parse("prop-key").unwrap();
        let r = verify_delivery(
            &keys,
            "https://h/p",
            DeliveryHeaders { timestamp: ts.as_deref(), idempotency_key: idem.as_deref(), signature: sig.as_deref() },
            &body,
            now,
            Tolerance::default(),
        );
        prop_assert!(r.is_err());
    }

    /// A correctly signed delivery passes; changing any single byte of the
    /// body or any hex digit of the signature makes it fail.
    #[test]
    fn only_the_exact_signature_passes(
        // Printable ASCII without spaces or commas (the key list splits on commas and trims).
        key in "[!-+\\--~]{1,40}",
        url in "https?://[a-z]{1,10}(/[a-z]{0,8}){0,3}/?",
        idem in "[ -~]{1,40}",
        body in proptest::collection::vec(any::<u8>(), 1..256),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
        digit in any::<prop::sample::Index>(),
        skew in -30i64..=30,
    ) {
        let now = 1_752_505_331i64;
        let ts = (now + skew).to_string();
        let keys = SigningKeys::parse(&key).unwrap();
        let signing_key = SigningKey::new(key.clone()).unwrap();
        let parts = SignedParts { url: &url, idempotency_key: &idem, timestamp: &ts, body: &body };
        let good = sign(&signing_key, &parts);
        let check = |b: &[u8], sig: &str| verify_delivery(
            &keys, &url,
            DeliveryHeaders { timestamp: Some(&ts), idempotency_key: Some(&idem), signature: Some(sig) },
            b, now, Tolerance::default(),
        );
        prop_assert!(check(&body, &good).is_ok());

        let mut tampered = body.clone();
        let i = flip.index(tampered.len());
        tampered[i] ^= 1 << bit;
        prop_assert_eq!(check(&tampered, &good), Err(VerifyError::BadSignature));

        let mut sig: Vec<char> = good.chars().collect();
        let j = digit.index(sig.len());
        sig[j] = if sig[j] == '0' { '1' } else { '0' };
        let sig: String = sig.into_iter().collect();
        prop_assert_eq!(check(&body, &sig), Err(VerifyError::BadSignature));
    }
}
