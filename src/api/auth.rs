//! The admin token: a bearer scheme in the spec, checked in constant time.

use std::fmt;

use poem::Request;
use poem_openapi::SecurityScheme;
use poem_openapi::auth::Bearer;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The token every `/api/v1` call must present. Never printed by `Debug`.
#[derive(Clone)]
pub struct AdminToken(String);

impl AdminToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// A fresh random token (32 bytes, hex), for when none is configured.
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        Self(hex::encode(bytes))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares digests, so neither the content nor the length leaks through timing.
    pub fn matches(&self, presented: &str) -> bool {
        let a = Sha256::digest(self.0.as_bytes());
        let b = Sha256::digest(presented.as_bytes());
        a.ct_eq(&b).into()
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

/// Bearer authentication with the admin token (`SWITCHBOARD_ADMIN_TOKEN`).
#[derive(SecurityScheme)]
#[oai(ty = "bearer", checker = "check_admin_token")]
pub struct AdminAuth(());

async fn check_admin_token(req: &Request, bearer: Bearer) -> Option<()> {
    let expected = req.data::<AdminToken>()?;
    expected.matches(&bearer.token).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_matching() {
        let t = AdminToken::new("abc");
        assert!(t.matches("abc"));
        assert!(!t.matches("abd"));
        assert!(!t.matches(""));
        assert!(!format!("{t:?}").contains("abc"));
        assert_eq!(AdminToken::generate().expose().len(), 64);
        assert_ne!(
            AdminToken::generate().expose(),
            AdminToken::generate().expose()
        );
    }
}
