//! Typed identifiers: parsed once at the edge, trusted everywhere after.
//!
//! Operator's ids (`ev_…`, `conv_…`, `ca_…@vN`) are opaque strings; we only
//! require them to be non-empty, at most 255 bytes and free of control
//! characters, so they are safe as database keys on both backends.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most 255 bytes")]
    TooLong,
    #[error("must not contain control characters")]
    ControlCharacter,
}

fn check_id(s: &str) -> Result<(), IdError> {
    if s.trim().is_empty() {
        Err(IdError::Empty)
    } else if s.len() > 255 {
        Err(IdError::TooLong)
    } else if s.chars().any(char::is_control) {
        Err(IdError::ControlCharacter)
    } else {
        Ok(())
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check_id(&s)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_inner(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// Operator's event id (`ev_…`), stable across retries of one event.
    EventId
);
string_id!(
    /// Operator's conversation id (`conv_…`): one event stream per conversation.
    ConversationId
);
string_id!(
    /// The agent version that handled the conversation (`ca_…@vN`).
    AgentId
);
string_id!(
    /// `X-Idempotency-Key` of a delivery: the same for every retry of it.
    IdempotencyKey
);

impl AgentId {
    /// The agent without its version suffix (`ca_x@v4` → `ca_x`).
    pub fn base(&self) -> &str {
        self.0.split('@').next().unwrap_or(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_reject() {
        assert_eq!(EventId::parse("ev_1").unwrap().as_str(), "ev_1");
        assert_eq!(EventId::parse(" "), Err(IdError::Empty));
        assert_eq!(EventId::parse("a".repeat(256)), Err(IdError::TooLong));
        assert_eq!(EventId::parse("a\nb"), Err(IdError::ControlCharacter));
        assert_eq!(AgentId::parse("ca_x@v4").unwrap().base(), "ca_x");
    }
}
