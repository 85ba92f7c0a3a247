//! Operator's webhook signature scheme, as pure functions (no I/O, no clock).
//!
//! A delivery is signed with HMAC-SHA256 over
//! `{url}:{X-Idempotency-Key}:{X-Timestamp}:{raw body}`, keyed with the UTF-8
//! bytes of the signing key as Operator's dashboard shows it, and sent as
//! lowercase hex in `X-Signature`. This module computes and checks that tag
//! and the timestamp window; the HTTP handler in [`super::ingest`] feeds it
//! the request and the current time.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Header carrying the Unix time (seconds) at which Operator signed the delivery.
pub const TIMESTAMP_HEADER: &str = "x-timestamp";
/// Header carrying the delivery's idempotency key (stable across retries).
pub const IDEMPOTENCY_KEY_HEADER: &str = "x-idempotency-key";
/// Header carrying the hex HMAC-SHA256 tag.
pub const SIGNATURE_HEADER: &str = "x-signature";

/// One signing key. Its value never appears in `Debug` output or logs.
#[derive(Clone)]
pub struct SigningKey(String);

impl SigningKey {
    /// Wraps a key exactly as displayed in Operator's dashboard (no decoding).
    pub fn new(key: impl Into<String>) -> Option<Self> {
        let key = key.into();
        (!key.trim().is_empty()).then_some(Self(key))
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(self.0.as_bytes()).expect("HMAC accepts keys of any length")
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

/// The set of keys a delivery may be signed with (more than one during rotation).
#[derive(Clone, Debug)]
pub struct SigningKeys(Vec<SigningKey>);

impl SigningKeys {
    /// Parses a comma-separated list; empty entries are ignored.
    /// Returns `None` when no key is left.
    pub fn parse(list: &str) -> Option<Self> {
        let keys: Vec<_> = list
            .split(',')
            .filter_map(|k| SigningKey::new(k.trim()))
            .collect();
        (!keys.is_empty()).then_some(Self(keys))
    }

    /// The first key, used by `switchboard sign`.
    pub fn primary(&self) -> &SigningKey {
        &self.0[0]
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The signed parts of one delivery, borrowed from the request.
#[derive(Clone, Copy, Debug)]
pub struct SignedParts<'a> {
    /// The URL that was signed: the one registered in Operator, no query string.
    pub url: &'a str,
    pub idempotency_key: &'a str,
    /// `X-Timestamp` exactly as received (not re-formatted).
    pub timestamp: &'a str,
    pub body: &'a [u8],
}

impl SignedParts<'_> {
    fn feed(&self, mac: &mut HmacSha256) {
        for part in [
            self.url.as_bytes(),
            b":",
            self.idempotency_key.as_bytes(),
            b":",
            self.timestamp.as_bytes(),
            b":",
            self.body,
        ] {
            mac.update(part);
        }
    }
}

/// Computes the lowercase hex tag Operator would send for these parts.
pub fn sign(key: &SigningKey, parts: &SignedParts<'_>) -> String {
    let mut mac = key.mac();
    parts.feed(&mut mac);
    hex::encode(mac.finalize().into_bytes())
}

/// Why a delivery was refused. Each maps to a 401 with a short reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("X-Timestamp is not a Unix time in seconds")]
    MalformedTimestamp,
    #[error("X-Timestamp is more than {0} s in the past")]
    StaleTimestamp(i64),
    #[error("X-Timestamp is more than {0} s in the future")]
    FutureTimestamp(i64),
    #[error("X-Signature does not match the body with any configured signing key")]
    BadSignature,
}

impl VerifyError {
    /// A stable machine-readable code, used in error bodies and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::MissingHeader(_) => "missing_header",
            VerifyError::MalformedTimestamp => "malformed_timestamp",
            VerifyError::StaleTimestamp(_) => "stale_timestamp",
            VerifyError::FutureTimestamp(_) => "future_timestamp",
            VerifyError::BadSignature => "bad_signature",
        }
    }
}

/// How far `X-Timestamp` may be from the receiver's clock, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tolerance {
    pub max_age_secs: i64,
    pub max_future_secs: i64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Self {
            max_age_secs: 30,
            max_future_secs: 30,
        }
    }
}

/// Checks `X-Timestamp` against `now_unix` and returns it parsed.
pub fn check_timestamp(raw: &str, now_unix: i64, tolerance: Tolerance) -> Result<i64, VerifyError> {
    let ts: i64 = raw
        .trim()
        .parse()
        .map_err(|_| VerifyError::MalformedTimestamp)?;
    if now_unix.saturating_sub(ts) > tolerance.max_age_secs {
        return Err(VerifyError::StaleTimestamp(tolerance.max_age_secs));
    }
    if ts.saturating_sub(now_unix) > tolerance.max_future_secs {
        return Err(VerifyError::FutureTimestamp(tolerance.max_future_secs));
    }
    Ok(ts)
}

/// Checks the tag in constant time against every key; true if any key signed it.
/// Upper-case hex is accepted; anything that is not 32 bytes of hex fails.
pub fn signature_matches(keys: &SigningKeys, parts: &SignedParts<'_>, signature_hex: &str) -> bool {
    let Ok(tag) = hex::decode(signature_hex.trim()) else {
        return false;
    };
    // Check every key even after a match, so timing does not reveal which key matched.
    keys.0.iter().fold(false, |matched, key| {
        let mut mac = key.mac();
        parts.feed(&mut mac);
        mac.verify_slice(&tag).is_ok() | matched
    })
}

/// The three Operator headers of one delivery, as received (any may be missing).
#[derive(Clone, Copy, Debug, Default)]
pub struct DeliveryHeaders<'a> {
    pub timestamp: Option<&'a str>,
    pub idempotency_key: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// The whole check, in Operator's order: headers present, timestamp fresh,
/// signature valid. Returns the parsed timestamp on success.
pub fn verify_delivery(
    keys: &SigningKeys,
    url: &str,
    headers: DeliveryHeaders<'_>,
    body: &[u8],
    now_unix: i64,
    tolerance: Tolerance,
) -> Result<i64, VerifyError> {
    let timestamp = headers
        .timestamp
        .ok_or(VerifyError::MissingHeader("X-Timestamp"))?;
    let idempotency_key = headers
        .idempotency_key
        .filter(|k| !k.is_empty())
        .ok_or(VerifyError::MissingHeader("X-Idempotency-Key"))?;
    let signature = headers
        .signature
        .ok_or(VerifyError::MissingHeader("X-Signature"))?;
    let ts = check_timestamp(timestamp, now_unix, tolerance)?;
    let parts = SignedParts {
        url,
        idempotency_key,
        timestamp,
        body,
    };
    if signature_matches(keys, &parts, signature) {
        Ok(ts)
    } else {
        Err(VerifyError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(s: &str) -> SigningKeys {
        SigningKeys::parse(s).unwrap()
    }

    #[test]
    fn key_list_ignores_blanks_and_needs_one_key() {
        assert_eq!(keys(" a , ,b").len(), 2);
        assert!(SigningKeys::parse(" , ").is_none());
        assert!(SigningKeys::parse("").is_none());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = keys("super-secret-value");
        assert!(!format!("{k:?}").contains("super-secret"));
    }

    #[test]
    fn timestamp_window_is_inclusive_at_thirty_seconds() {
        let t = Tolerance::default();
        assert_eq!(check_timestamp("100", 130, t), Ok(100));
        assert_eq!(
            check_timestamp("100", 131, t),
            Err(VerifyError::StaleTimestamp(30))
        );
        assert_eq!(check_timestamp("100", 70, t), Ok(100));
        assert_eq!(
            check_timestamp("100", 69, t),
            Err(VerifyError::FutureTimestamp(30))
        );
        assert_eq!(
            check_timestamp("1e9", 69, t),
            Err(VerifyError::MalformedTimestamp)
        );
        assert_eq!(
            check_timestamp("", 69, t),
            Err(VerifyError::MalformedTimestamp)
        );
    }

    #[test]
    fn extreme_timestamps_do_not_overflow() {
        let t = Tolerance::default();
        assert!(check_timestamp(&i64::MIN.to_string(), i64::MAX, t).is_err());
        assert!(check_timestamp(&i64::MAX.to_string(), i64::MIN, t).is_err());
    }

    #[test]
    fn rotation_accepts_any_configured_key() {
        let parts = SignedParts {
            url: "https://x/y",
            idempotency_key: "k",
            timestamp: "1",
            body: b"{}",
        };
        let old = sign(&SigningKey::new("old").unwrap(), &parts);
        assert!(signature_matches(&keys("new,old"), &parts, &old));
        assert!(signature_matches(
            &keys("new,old"),
            &parts,
            &old.to_uppercase()
        ));
        assert!(!signature_matches(&keys("new"), &parts, &old));
        assert!(!signature_matches(&keys("old"), &parts, "zz"));
    }
}
