//! What the databases refuse, made storable: PostgreSQL's TEXT and JSONB
//! cannot hold U+0000 (NUL), so every string written to a text or JSON
//! column goes through here and has each NUL replaced by U+FFFD (the
//! Unicode replacement character), on both backends alike. Raw bodies are
//! BLOB/BYTEA and are never touched: they stay byte-exact.

use std::borrow::Cow;

use serde_json::Value;

/// What a NUL becomes in text and JSON columns.
pub const REPLACEMENT: char = '\u{FFFD}';

/// `s` with every NUL replaced (borrowed when there is none).
pub fn text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// Like [`text`], for an optional value.
pub fn opt_text(s: Option<&str>) -> Option<Cow<'_, str>> {
    s.map(text)
}

/// Whether any string (or object key) in `v` holds a NUL.
pub fn json_needs(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(json_needs),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || json_needs(v)),
        _ => false,
    }
}

/// `v` with every NUL in its strings and keys replaced (borrowed when there is none).
pub fn json(v: &Value) -> Cow<'_, Value> {
    if json_needs(v) {
        let mut owned = v.clone();
        json_in_place(&mut owned);
        Cow::Owned(owned)
    } else {
        Cow::Borrowed(v)
    }
}

/// Replaces every NUL in `v`'s strings and keys, in place.
pub fn json_in_place(v: &mut Value) {
    match v {
        Value::String(s) if s.contains('\0') => *s = s.replace('\0', "\u{FFFD}"),
        Value::Array(a) => a.iter_mut().for_each(json_in_place),
        Value::Object(o) => {
            if o.keys().any(|k| k.contains('\0')) {
                let entries = std::mem::take(o);
                for (k, mut v) in entries {
                    json_in_place(&mut v);
                    o.insert(k.replace('\0', "\u{FFFD}"), v);
                }
            } else {
                o.values_mut().for_each(json_in_place);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_nul_in_text_and_json_only_when_present() {
        assert!(matches!(text("plain"), Cow::Borrowed("plain")));
        assert_eq!(text("a\0b"), "a\u{FFFD}b");
        let v = serde_json::json!({"k\u{0}": ["x\u{0}", 1, {"n": "\u{0}"}], "ok": "y"});
        let clean = json(&v);
        assert_eq!(
            *clean,
            serde_json::json!({"k\u{FFFD}": ["x\u{FFFD}", 1, {"n": "\u{FFFD}"}], "ok": "y"})
        );
        assert!(!json_needs(&clean));
        let plain = serde_json::json!({"a": [1, "b"]});
        assert!(matches!(json(&plain), Cow::Borrowed(_)));
    }
}
