//! custos-issued tokens.
//!
//! A token reads `cst_<id>_<secret>`: `id` is 16 hex digits and names the token in events and
//! revocations; `secret` is 32 random bytes in unpadded base64url. The control plane stores only
//! the SHA-256 of the whole token, and edges receive only that hash, so neither a Raft log, a
//! snapshot nor an edge's memory holds a usable token.

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The prefix every custos token starts with (lets secret scanners and the masking engine find them).
pub const PREFIX: &str = "cst_";

/// Why a presented string is not a custos token. Messages never repeat the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "not a custos token (expected cst_<id>_<secret>); issue one with `custos token issue`"
    )]
    Malformed,
}

/// A freshly issued token: the secret string (shown once) and its id.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub token: String,
    pub id: String,
}

/// Generate a new random token.
pub fn generate() -> NewToken {
    let mut rng = rand::rng();
    let mut id = [0u8; 8];
    rng.fill_bytes(&mut id);
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut secret);
    let id = hex::encode(id);
    let token = format!(
        "{PREFIX}{id}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    NewToken { token, id }
}

/// Check a token's shape and return its id.
pub fn parse(token: &str) -> Result<&str, TokenError> {
    let rest = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
    let (id, secret) = rest.split_once('_').ok_or(TokenError::Malformed)?;
    let id_ok = id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let secret_ok = secret.len() == 43
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if id_ok && secret_ok {
        Ok(id)
    } else {
        Err(TokenError::Malformed)
    }
}

/// Hex SHA-256 of a token, the only form that is stored.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Compare two hashes in time independent of where they differ.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.bytes()
        .zip(b.bytes())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_tokens_parse_and_hash() {
        let t = generate();
        assert_eq!(parse(&t.token), Ok(t.id.as_str()));
        assert_eq!(hash(&t.token).len(), 64);
        assert!(hashes_equal(&hash(&t.token), &hash(&t.token)));
        assert!(!hashes_equal(&hash(&t.token), &hash(&generate().token)));
        assert_ne!(generate().token, t.token);
    }

    #[test]
    fn malformed_tokens_are_rejected_without_echo() {
        for bad in [
            "",
            "cst_",
            "cst_xyz_abc",
            "Bearer cst_0123456789abcdef_",
            "pat_0123456789abcdef_x",
        ] {
            let err = parse(bad).unwrap_err();
            // Long inputs (real token material) never appear in the message.
            assert!(bad.len() < 12 || !err.to_string().contains(bad));
        }
        let t = generate().token;
        assert!(parse(&t[..t.len() - 1]).is_err());
        assert!(parse(&format!("{t}=")).is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,80}") {
            let _ = parse(&s);
        }
    }
}
