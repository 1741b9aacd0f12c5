//! Token shapes: `custos_core::token::parse`, `custos_core::oidc::looks_like_jwt`, and OIDC
//! verification (`OidcVerifier::verify`, which runs the private JWT header parser, the claim
//! extraction and the error mapping) against a local JWKS file: no network.
//!
//! Properties:
//! - nothing panics, on any string;
//! - `token::parse` accepts exactly the documented shape `cst_` + 16 hex + `_` + 43 base64url
//!   characters (checked against an independent reference), and returns the 16 hex digits;
//!   `parse(generate().token)` round-trips, and tokens assembled from fuzzer bytes parse to their
//!   id; the masking engine finds a generated token (`custos_token`);
//! - `looks_like_jwt`: a `cst_…` string never looks like a JWT; anything that does has exactly
//!   three base64url segments, the first two non-empty; a real JWT shape (a base64url JSON
//!   object header, a non-empty payload, any base64url signature) does;
//! - `verify` on arbitrary text fails without echoing the token in its message; on a token that
//!   the fuzzer's claims signed with the JWKS key (ES256), success means: the issuer is the
//!   configured one, the subject is a non-empty string claim, groups are unique and came from
//!   the groups claim, `exp` is not past (beyond the leeway).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use custos_core::mask::Detector;
use custos_core::oidc::{looks_like_jwt, OidcConfig, OidcError, OidcVerifier};
use custos_core::token;
use custos_fuzz::{masker, runtime};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

const ISS: &str = "https://idp.example.com/realms/custos";
const AUD: &str = "custos-edge";
/// A P-256 test key made for this target (PKCS#8 DER, base64), and its public point.
const EC_PKCS8: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgrWUO4sR+hnA4X+JX2b2w0sLyAp5wNoOkJ1IYXlF10kChRANCAAS9h6AjZiXXQ+KZRVZxkPbCVrVs8l+WS1aHi1bSTn4wUsUQ1RRq71cSGg2D56EYlmdgB9gqrubnCWGaGkhkYBp1";
const EC_X: &str = "vYegI2Yl10PimUVWcZD2wla1bPJflktWh4tW0k5-MFI";
const EC_Y: &str = "xRDVFGrvVxIaDYPnoRiWZ2AH2Cqu5ucJYZoaSGRgGnU";

struct Fixture {
    verifier: OidcVerifier,
    key: EncodingKey,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // One fixed place (not one per process, which would litter the temp dir): every run
        // writes the same bytes, and the verifier rereads the file on an unknown key id.
        let dir = std::env::temp_dir().join("custos-fuzz-jwks");
        std::fs::create_dir_all(&dir).unwrap();
        let path: PathBuf = dir.join("jwks.json");
        let jwks = json!({"keys": [
            {"kty": "EC", "kid": "ec1", "use": "sig", "alg": "ES256", "crv": "P-256", "x": EC_X, "y": EC_Y},
            {"kty": "EC", "kid": "ec-any", "crv": "P-256", "x": EC_X, "y": EC_Y},
        ]});
        std::fs::write(&path, jwks.to_string()).unwrap();
        let cfg = OidcConfig {
            issuer: ISS.into(),
            audience: AUD.into(),
            jwks_file: Some(path),
            jwks_url: None,
            subject_claim: "sub".into(),
            groups_claim: "realm_access.roles".into(),
            leeway_seconds: 30,
        };
        let verifier = runtime()
            .block_on(OidcVerifier::new(cfg))
            .expect("verifier over the test JWKS");
        let der = base64::engine::general_purpose::STANDARD.decode(EC_PKCS8).unwrap();
        Fixture {
            verifier,
            key: EncodingKey::from_ec_der(&der),
        }
    })
}

fn is_b64url(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The documented token shape, written independently of `token::parse`.
fn reference_token(s: &str) -> Option<&str> {
    let b = s.as_bytes();
    if b.len() != 64 || !s.starts_with("cst_") || b[20] != b'_' {
        return None;
    }
    let id = &s[4..20];
    (id.bytes().all(|c| c.is_ascii_hexdigit()) && is_b64url(&s[21..])).then_some(id)
}

#[derive(Arbitrary, Debug)]
enum ClaimValue {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
    Strings(Vec<String>),
    Nested(Vec<(String, String)>),
}

impl ClaimValue {
    fn json(&self) -> Value {
        match self {
            ClaimValue::Str(s) => json!(s),
            ClaimValue::Int(i) => json!(i),
            ClaimValue::Float(f) => json!(f),
            ClaimValue::Bool(b) => json!(b),
            ClaimValue::Null => Value::Null,
            ClaimValue::Strings(v) => json!(v),
            ClaimValue::Nested(kv) => {
                Value::Object(kv.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Signed {
    kid: u8,
    /// Seconds from now (clamped to ±1 day) or absent.
    exp: Option<i32>,
    nbf: Option<i32>,
    iss: Option<bool>,
    aud: u8,
    sub: Option<ClaimValue>,
    roles: Option<ClaimValue>,
    extra: Vec<(String, ClaimValue)>,
}

fn signed_token(s: &Signed, now: i64) -> (String, Map<String, Value>) {
    let mut c = Map::new();
    let at = |d: i32| now + i64::from(d) % 86_400;
    if let Some(d) = s.exp {
        c.insert("exp".into(), json!(at(d)));
    }
    if let Some(d) = s.nbf {
        c.insert("nbf".into(), json!(at(d)));
    }
    match s.iss {
        Some(true) => drop(c.insert("iss".into(), json!(ISS))),
        Some(false) => drop(c.insert("iss".into(), json!(format!("{ISS}/other")))),
        None => {}
    }
    match s.aud % 4 {
        0 => drop(c.insert("aud".into(), json!(AUD))),
        1 => drop(c.insert("aud".into(), json!(["other", AUD]))),
        2 => drop(c.insert("aud".into(), json!("other"))),
        _ => {}
    }
    for (k, v) in &s.extra {
        c.insert(k.clone(), v.json());
    }
    if let Some(v) = &s.sub {
        c.insert("sub".into(), v.json());
    }
    if let Some(v) = &s.roles {
        c.insert("realm_access".into(), json!({"roles": v.json()}));
    }
    let mut header = Header::new(Algorithm::ES256);
    header.kid = match s.kid % 4 {
        0 => Some("ec1".into()),
        1 => Some("ec-any".into()),
        2 => None,
        _ => Some("unknown".into()),
    };
    let t = jsonwebtoken::encode(&header, &c, &fixture().key).expect("ES256 signing");
    (t, c)
}

fn check_verified(claims: &Map<String, Value>, now: i64, got: &custos_core::oidc::Claims) {
    assert_eq!(got.issuer, ISS);
    assert_eq!(
        claims.get("iss"),
        Some(&json!(ISS)),
        "accepted another issuer"
    );
    assert!(!got.subject.trim().is_empty());
    assert_eq!(
        claims.get("sub"),
        Some(&json!(got.subject)),
        "subject not from `sub`"
    );
    let mut seen = std::collections::HashSet::new();
    assert!(
        got.groups.iter().all(|g| seen.insert(g)),
        "duplicate groups"
    );
    // A claim named exactly `realm_access.roles` wins over the nested one.
    let roles = claims
        .get("realm_access.roles")
        .or_else(|| claims.get("realm_access").and_then(|r| r.get("roles")));
    for g in &got.groups {
        let from_claim = match roles {
            Some(Value::String(s)) => s
                .split(|c: char| c == ',' || c.is_whitespace())
                .any(|x| x == g),
            Some(Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(g)),
            _ => false,
        };
        assert!(from_claim, "group {g:?} not in the groups claim");
    }
    assert!(got.expires_unix >= now - 30 - 5, "expired token accepted");
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let s: &str = &text;

    // token::parse against the reference.
    let parsed = token::parse(s);
    assert_eq!(
        parsed.ok(),
        reference_token(s),
        "token::parse disagrees on {s:?}"
    );
    if let Err(e) = token::parse(s) {
        // One fixed message, whatever was presented: it cannot echo the token.
        assert_eq!(e.to_string(), token::TokenError::Malformed.to_string());
    }

    // looks_like_jwt.
    if looks_like_jwt(s) {
        let t = s.trim();
        assert!(!t.starts_with("cst_"), "custos token taken for a JWT");
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| is_b64url(p)) && !parts[0].is_empty() && !parts[1].is_empty());
    }

    // The last byte picks the mode (the text is the whole input, so seeds are plain tokens).
    let mut u = Unstructured::new(data);
    let mode = data.last().copied().unwrap_or(0);
    match mode % 4 {
        0 => {
            // Tokens: generated, and assembled from fuzzer bytes.
            let t = token::generate();
            assert_eq!(token::parse(&t.token), Ok(t.id.as_str()));
            assert!(!looks_like_jwt(&t.token));
            let found = masker().find(&t.token);
            assert!(
                found.iter().any(|f| f.detector == Detector::CustosToken
                    && f.start == 0
                    && f.end == t.token.len()),
                "masking misses a custos token: {found:?}"
            );
            let id: [u8; 8] = u.arbitrary().unwrap_or_default();
            let secret: [u8; 32] = u.arbitrary().unwrap_or_default();
            let id_hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
            let tok = format!("cst_{id_hex}_{}", B64.encode(secret));
            assert_eq!(token::parse(&tok), Ok(id_hex.as_str()));
            assert_eq!(token::parse(&format!(" {tok}")).ok(), None);
        }
        1 => {
            // A real JWT shape with a fuzzer header object, payload and signature.
            let header: Vec<(String, String)> = u.arbitrary().unwrap_or_default();
            let h: Map<String, Value> = header.into_iter().map(|(k, v)| (k, json!(v))).collect();
            let payload: Vec<u8> = u.arbitrary().unwrap_or_default();
            let sig: Vec<u8> = u.arbitrary().unwrap_or_default();
            let jwt = format!(
                "{}.{}.{}",
                B64.encode(serde_json::to_vec(&Value::Object(h)).unwrap()),
                B64.encode(if payload.is_empty() {
                    b"{}".to_vec()
                } else {
                    payload
                }),
                B64.encode(sig)
            );
            assert!(looks_like_jwt(&jwt), "JWT shape not recognised: {jwt}");
            let r = runtime().block_on(fixture().verifier.verify(&jwt));
            assert!(r.is_err(), "unsigned fuzzer token accepted");
        }
        2 => {
            // Arbitrary text into the verifier.
            let r = runtime().block_on(fixture().verifier.verify(s));
            match r {
                Ok(c) => panic!("arbitrary text verified: {c:?}"),
                Err(e) => {
                    // Only a token-shaped string can be told apart from the message's own words.
                    let t = s.trim();
                    let shaped = t.len() >= 16
                        && t.matches('.').count() >= 2
                        && t.bytes().all(|b| {
                            b == b'.' || b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
                        });
                    assert!(
                        !shaped || !e.to_string().contains(t),
                        "error echoes the token: {e}"
                    );
                }
            }
        }
        _ => {
            // Signed with the JWKS key: claim extraction and checks.
            let Ok(sg) = Signed::arbitrary(&mut u) else {
                return;
            };
            let now = chrono::Utc::now().timestamp();
            let (t, claims) = signed_token(&sg, now);
            match runtime().block_on(fixture().verifier.verify(&t)) {
                Ok(got) => {
                    assert!(sg.kid % 4 != 3, "unknown kid accepted");
                    check_verified(&claims, now, &got);
                }
                Err(OidcError::BadSignature) => panic!("good signature refused: {t}"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(!msg.contains(&t), "error echoes the token");
                }
            }
        }
    }
});
