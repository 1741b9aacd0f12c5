//! OIDC JWT verification: database clients whose password is a JWT from the organisation's
//! identity provider are authenticated here.
//!
//! ```text
//!  password ──looks_like_jwt?──▶ OidcVerifier::verify ──▶ Claims { subject, groups, expires_unix, issuer }
//!                                     │
//!        header: alg allow-list, kid ─┤─▶ JWKS cache (file or URL; refetched on an unknown kid,
//!                                     │   at most every 30 s, and in the background when 10 min old)
//!        signature, exp/nbf (leeway), ┘
//!        iss == issuer, aud ∋ audience, subject claim present
//! ```
//!
//! Security choices:
//! - Only asymmetric algorithms are accepted: RS256, RS384, RS512, PS256 with an RSA key of at least
//!   2048 bits, ES256 with a P-256 key and ES384 with a P-384 key. The algorithm must fit the key
//!   the JWKS names; `alg: none` and every HMAC algorithm are refused before any key is looked at,
//!   so a public key can never be used as an HMAC secret (algorithm confusion). Symmetric (`oct`)
//!   keys in a JWKS are ignored.
//! - A JWK whose `use` is not `sig`, whose `key_ops` lack `verify`, or whose `alg` differs from
//!   the token's is not used.
//! - Tokens with a `crit` header are refused (no extension is understood), as are encrypted
//!   tokens (JWE) and tokens longer than 16 KiB.
//! - Error messages are meant for the database client: they name the cause and never contain the
//!   token. Values taken from the token's header (`alg`, `kid`) are shortened and reduced to
//!   printable ASCII before they are shown.
//!
//! JWKS sources: a local file (`jwks_file`), or a URL (`jwks_url`) fetched over `http://` or
//! `https://` (rustls with the ring provider, trusting the system's CA certificates). Each fetch
//! is bounded to 5 s and 1 MiB; redirects are not followed. Plain `http://` is accepted (it
//! suits an identity provider on the same host or inside a cluster) but logs a warning when the
//! host is not a loopback address, since whoever can alter the JWKS in transit can mint tokens.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{header, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

/// The signature algorithms a token may use.
pub const ALLOWED_ALGORITHMS: [&str; 6] = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"];

/// Tokens longer than this are refused without being parsed.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Largest JWKS document accepted, from a file or a URL.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Bound on one JWKS fetch (connect, request and body).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// A token whose key id is unknown triggers a refetch at most this often.
pub const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(30);

/// Keys older than this are refreshed in the background (the old ones serve meanwhile).
pub const MAX_KEYS_AGE: Duration = Duration::from_secs(600);

/// RSA keys with a shorter modulus are ignored.
pub const MIN_RSA_BITS: usize = 2048;

fn default_subject_claim() -> String {
    "sub".to_string()
}

fn default_groups_claim() -> String {
    "groups".to_string()
}

fn default_leeway_seconds() -> u64 {
    30
}

/// Where tokens come from and how they are checked.
///
/// Exactly one of `jwks_file` and `jwks_url` must be set. Claim names may be dotted paths into
/// nested objects (`realm_access.roles`) when no top-level claim has that exact name.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct OidcConfig {
    /// The `iss` a token must carry, exactly.
    pub issuer: String,
    /// A value the token's `aud` (string or array) must contain.
    pub audience: String,
    /// A JWKS JSON file (`{"keys": [...]}`); reread on an unknown key id, like a URL.
    pub jwks_file: Option<PathBuf>,
    /// An `http://` or `https://` URL of the JWKS, fetched at start and refreshed.
    pub jwks_url: Option<String>,
    /// The claim holding the identity's name (a non-empty string).
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// The claim holding the groups: an array of strings, or one string separated by spaces
    /// or commas. A token without it has no groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(default = "default_leeway_seconds")]
    pub leeway_seconds: u64,
}

/// What a verified token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub subject: String,
    /// Deduplicated, in the token's order.
    pub groups: Vec<String>,
    pub expires_unix: i64,
    pub issuer: String,
}

/// Why a token was refused, or why the verifier could not start. Every message is safe to show
/// to a database client: it names the cause and never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    #[error("the OIDC token expired at {}; get a fresh token from your identity provider", unix_to_rfc3339(*.expired_at))]
    Expired { expired_at: i64 },
    #[error("the OIDC token is not valid before {} (nbf); check the client's clock or wait", unix_to_rfc3339(*.not_before))]
    NotYetValid { not_before: i64 },
    #[error("the OIDC token's audience (aud) does not include `{expected}`; request a token for that audience")]
    WrongAudience { expected: String },
    #[error("the OIDC token was not issued by `{expected}` (iss)")]
    WrongIssuer { expected: String },
    #[error("unsigned OIDC token (alg: none) refused")]
    Unsigned,
    #[error("OIDC token algorithm `{alg}` is not allowed; allowed: RS256, RS384, RS512, ES256, ES384, PS256")]
    AlgorithmNotAllowed { alg: String },
    #[error("OIDC token algorithm `{alg}` does not fit signing key `{kid}` of the issuer")]
    AlgorithmKeyMismatch { alg: String, kid: String },
    #[error(
        "the OIDC token's signature is invalid (the token was altered or not signed by the issuer)"
    )]
    BadSignature,
    #[error("{}", unknown_key_message(.kid))]
    UnknownKey { kid: Option<String> },
    #[error("signing key `{kid}` in the issuer's JWKS is not a valid key")]
    InvalidKey { kid: String },
    #[error("malformed OIDC token: {reason}")]
    Malformed { reason: &'static str },
    #[error("the OIDC token has no `{claim}` claim (the subject, a non-empty string)")]
    MissingSubject { claim: String },
    #[error("the OIDC token has no `{claim}` claim")]
    MissingClaim { claim: String },
    #[error("the OIDC token's `{claim}` claim is invalid: {reason}")]
    InvalidClaim { claim: String, reason: &'static str },
    #[error("the identity provider's signing keys (JWKS) are unavailable from {jwks}: {reason}")]
    JwksUnavailable { jwks: String, reason: String },
    #[error("invalid OIDC configuration: {0}")]
    Config(String),
}

fn unknown_key_message(kid: &Option<String>) -> String {
    match kid {
        Some(kid) => format!("the OIDC token's key id `{kid}` is not among the issuer's signing keys (JWKS)"),
        None => "the OIDC token has no key id (kid) and none of the issuer's signing keys (JWKS) fits its algorithm".to_string(),
    }
}

fn unix_to_rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("unix time {secs}"))
}

/// A header value from the token, shortened and reduced to printable ASCII for messages.
fn shown(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = s
        .chars()
        .take(MAX)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if s.chars().count() > MAX {
        out.push('…');
    }
    out
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn is_b64url(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether a string has the shape of a signed JWT: three base64url segments separated by dots,
/// the first two non-empty and the first decoding to a JSON object. The signature may be empty,
/// so that an unsigned (`alg: none`) token still reaches [`OidcVerifier::verify`] and gets a clear
/// refusal. Custos-issued tokens (`cst_…`) never match.
pub fn looks_like_jwt(s: &str) -> bool {
    let s = s.trim();
    let mut parts = s.split('.');
    let (Some(h), Some(p), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    if h.is_empty() || p.is_empty() || !is_b64url(h) || !is_b64url(p) || !is_b64url(sig) {
        return false;
    }
    // Only the first few bytes of the header matter: a JSON object starts with `{`.
    let prefix = &h[..h.len().min(8) / 4 * 4];
    let decoded = if prefix.is_empty() {
        B64.decode(h).unwrap_or_default()
    } else {
        B64.decode(prefix).unwrap_or_default()
    };
    decoded
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{')
}

/// Verifies OIDC JWTs against the issuer's JWKS. Cheap to clone (shared state), `Send + Sync`.
#[derive(Clone)]
pub struct OidcVerifier {
    inner: Arc<Inner>,
}

impl fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("issuer", &self.inner.cfg.issuer)
            .field("audience", &self.inner.cfg.audience)
            .field("jwks", &self.inner.source.describe())
            .field("keys", &self.inner.current().keys.len())
            .finish()
    }
}

/// The limits above, and the TLS roots; tests shorten the limits and bring their own CA.
#[derive(Debug, Clone)]
struct Tuning {
    fetch_timeout: Duration,
    min_refetch: Duration,
    max_age: Duration,
    /// Trust these roots instead of the system's CA certificates.
    roots: Option<rustls::RootCertStore>,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            fetch_timeout: FETCH_TIMEOUT,
            min_refetch: MIN_REFETCH_INTERVAL,
            max_age: MAX_KEYS_AGE,
            roots: None,
        }
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

enum Source {
    File(PathBuf),
    Url {
        uri: Uri,
        shown: String,
        client: Box<HttpClient>,
    },
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::File(p) => format!("file {}", p.display()),
            Source::Url { shown, .. } => shown.clone(),
        }
    }
}

struct Inner {
    cfg: OidcConfig,
    source: Source,
    tuning: Tuning,
    keys: RwLock<Arc<KeySet>>,
    /// When the last fetch was attempted; held while a fetch runs (single flight).
    last_fetch: tokio::sync::Mutex<Instant>,
    background_refresh: AtomicBool,
}

struct KeySet {
    keys: Vec<VerifyKey>,
    fetched_at: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
}

impl KeyKind {
    fn fits(self, alg: Algorithm) -> bool {
        match self {
            KeyKind::Rsa => matches!(
                alg,
                Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256
            ),
            KeyKind::P256 => alg == Algorithm::ES256,
            KeyKind::P384 => alg == Algorithm::ES384,
        }
    }
}

struct VerifyKey {
    kid: Option<String>,
    kind: KeyKind,
    /// The JWK's own `alg`, when it names one.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl VerifyKey {
    fn fits(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

fn parse_alg(alg: &str) -> Option<Algorithm> {
    Some(match alg {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "PS256" => Algorithm::PS256,
        _ => return None,
    })
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<Value>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    key_ops: Option<Vec<String>>,
    alg: Option<String>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// Parse a JWKS document into the keys that may verify tokens. Unusable keys are skipped (with a
/// warning); a document with no usable key is an error.
fn parse_jwks(bytes: &[u8]) -> Result<Vec<VerifyKey>, String> {
    let raw: RawJwks = serde_json::from_slice(bytes)
        .map_err(|e| format!("not a JWKS document ({{\"keys\": [...]}}): {e}"))?;
    let mut keys = Vec::new();
    for value in raw.keys {
        let jwk: RawJwk = match serde_json::from_value(value) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(error = %e, "skipping a JWKS entry that is not a JWK");
                continue;
            }
        };
        let kid = jwk.kid.clone();
        match jwk_to_key(jwk) {
            Ok(Some(k)) => keys.push(k),
            Ok(None) => {}
            Err(why) => tracing::warn!(kid = ?kid, "skipping JWKS key: {why}"),
        }
    }
    if keys.is_empty() {
        return Err(format!(
            "no usable signing key (RSA of at least {MIN_RSA_BITS} bits, or EC P-256/P-384)"
        ));
    }
    Ok(keys)
}

/// `Ok(None)`: a key that is simply not for signatures (encryption keys); `Err`: a signing key
/// that cannot be used.
fn jwk_to_key(jwk: RawJwk) -> Result<Option<VerifyKey>, String> {
    if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    if jwk
        .key_ops
        .as_ref()
        .is_some_and(|ops| !ops.iter().any(|o| o == "verify"))
    {
        return Ok(None);
    }
    let alg = match jwk.alg.as_deref() {
        None => None,
        Some(a) => match parse_alg(a) {
            Some(alg) => Some(alg),
            None => return Err(format!("algorithm {a} is not allowed")),
        },
    };
    let need = |v: Option<String>, name: &str| v.ok_or_else(|| format!("missing `{name}`"));
    let (kind, key) = match jwk.kty.as_str() {
        "RSA" => {
            let n = need(jwk.n, "n")?;
            let e = need(jwk.e, "e")?;
            let n_bytes = B64
                .decode(n.trim_end_matches('='))
                .map_err(|_| "`n` is not base64url")?;
            let e_bytes = B64
                .decode(e.trim_end_matches('='))
                .map_err(|_| "`e` is not base64url")?;
            let n_bits = bit_len(&n_bytes);
            if n_bits < MIN_RSA_BITS {
                return Err(format!("RSA modulus of {n_bits} bits is too short"));
            }
            if e_bytes.is_empty() || e_bytes.len() > 8 || bit_len(&e_bytes) < 2 {
                return Err("RSA exponent is invalid".to_string());
            }
            (
                KeyKind::Rsa,
                DecodingKey::from_rsa_raw_components(&n_bytes, &e_bytes),
            )
        }
        "EC" => {
            let (kind, size) = match jwk.crv.as_deref() {
                Some("P-256") => (KeyKind::P256, 32),
                Some("P-384") => (KeyKind::P384, 48),
                other => return Err(format!("curve {other:?} is not supported")),
            };
            let x = need(jwk.x, "x")?;
            let y = need(jwk.y, "y")?;
            let xb = B64
                .decode(x.trim_end_matches('='))
                .map_err(|_| "`x` is not base64url")?;
            let yb = B64
                .decode(y.trim_end_matches('='))
                .map_err(|_| "`y` is not base64url")?;
            if xb.len() != size || yb.len() != size {
                return Err("EC coordinates have the wrong length".to_string());
            }
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(4);
            point.extend_from_slice(&xb);
            point.extend_from_slice(&yb);
            (kind, DecodingKey::from_ec_der(&point))
        }
        "oct" => return Err("symmetric keys are never used".to_string()),
        other => return Err(format!("key type {other} is not supported")),
    };
    if let Some(alg) = alg {
        if !kind.fits(alg) {
            return Err(format!("`alg` {alg:?} does not fit a {kind:?} key"));
        }
    }
    Ok(Some(VerifyKey {
        kid: jwk.kid,
        kind,
        alg,
        key,
    }))
}

fn bit_len(be: &[u8]) -> usize {
    match be.iter().position(|&b| b != 0) {
        None => 0,
        Some(i) => (be.len() - i) * 8 - be[i].leading_zeros() as usize,
    }
}

/// The URL as it may be shown: without user info or query.
fn shown_url(uri: &Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("http");
    let host = uri.host().unwrap_or("");
    let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    format!("{scheme}://{host}{port}{}", uri.path())
}

fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn build_client(https: bool, roots: Option<rustls::RootCertStore>) -> Result<HttpClient, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = if let Some(roots) = roots {
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        builder.with_tls_config(cfg)
    } else if https {
        builder
            .with_provider_and_native_roots(provider)
            .map_err(|e| format!("cannot load the system's CA certificates: {e}"))?
    } else {
        // Never used for TLS: the URL is plain http.
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        builder.with_tls_config(cfg)
    };
    let connector = builder.https_or_http().enable_http1().build();
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector))
}

/// The error and its causes, joined (hyper's own message is just "client error (Connect)").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

async fn fetch_url(client: &HttpClient, uri: &Uri) -> Result<Vec<u8>, String> {
    let req = Request::get(uri.clone())
        .header(header::ACCEPT, "application/json, application/jwk-set+json")
        .header(header::USER_AGENT, "custos-oidc")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| error_chain(&e))?;
    let status = resp.status();
    if status != StatusCode::OK {
        return Err(if status.is_redirection() {
            format!("HTTP {status} (redirects are not followed)")
        } else {
            format!("HTTP {status}")
        });
    }
    let too_big = || format!("the document is larger than {} KiB", MAX_JWKS_BYTES / 1024);
    let declared = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_JWKS_BYTES as u64) {
        return Err(too_big());
    }
    let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_big()
            } else {
                format!("reading the response: {}", error_chain(&*e))
            }
        })?;
    Ok(body.to_bytes().to_vec())
}

async fn read_file(path: &PathBuf) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    file.take(MAX_JWKS_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| e.to_string())?;
    if buf.len() > MAX_JWKS_BYTES {
        return Err(format!(
            "the file is larger than {} KiB",
            MAX_JWKS_BYTES / 1024
        ));
    }
    Ok(buf)
}

/// What a key lookup found.
enum Lookup {
    Keys(Vec<usize>),
    /// The kid exists but no key with it fits the algorithm.
    Mismatch(String),
    Unknown,
}

impl Inner {
    fn current(&self) -> Arc<KeySet> {
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn unavailable(&self, reason: String) -> OidcError {
        OidcError::JwksUnavailable {
            jwks: self.source.describe(),
            reason,
        }
    }

    async fn load(&self) -> Result<Vec<VerifyKey>, OidcError> {
        let bytes = match &self.source {
            Source::File(path) => tokio::time::timeout(self.tuning.fetch_timeout, read_file(path))
                .await
                .unwrap_or_else(|_| Err("reading the file timed out".to_string())),
            Source::Url { uri, client, .. } => {
                tokio::time::timeout(self.tuning.fetch_timeout, fetch_url(client, uri))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "no answer within {} ms",
                            self.tuning.fetch_timeout.as_millis()
                        ))
                    })
            }
        }
        .map_err(|reason| self.unavailable(reason))?;
        parse_jwks(&bytes).map_err(|reason| self.unavailable(reason))
    }

    fn store(&self, keys: Vec<VerifyKey>) {
        let set = Arc::new(KeySet {
            keys,
            fetched_at: Instant::now(),
        });
        *self
            .keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = set;
    }

    /// Refetch unless one was attempted within `min_refetch` (also when another task just did,
    /// while this one waited). On failure the old keys stay.
    async fn refresh(&self) -> Result<(), OidcError> {
        let mut last = self.last_fetch.lock().await;
        if last.elapsed() < self.tuning.min_refetch {
            return Ok(());
        }
        *last = Instant::now();
        match self.load().await {
            Ok(keys) => {
                tracing::debug!(jwks = %self.source.describe(), keys = keys.len(), "JWKS refreshed");
                self.store(keys);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS refresh failed; keeping the previous keys");
                Err(e)
            }
        }
    }
}

impl OidcVerifier {
    /// Check the configuration and load the JWKS once. Fails if the keys cannot be loaded, so a
    /// misconfigured issuer is seen at start rather than at the first login.
    pub async fn new(cfg: OidcConfig) -> Result<Self, OidcError> {
        Self::with_tuning(cfg, Tuning::default()).await
    }

    async fn with_tuning(cfg: OidcConfig, tuning: Tuning) -> Result<Self, OidcError> {
        if cfg.issuer.trim().is_empty() {
            return Err(OidcError::Config("`issuer` is empty".into()));
        }
        if cfg.audience.trim().is_empty() {
            return Err(OidcError::Config("`audience` is empty".into()));
        }
        if cfg.subject_claim.is_empty() || cfg.groups_claim.is_empty() {
            return Err(OidcError::Config(
                "`subject_claim` and `groups_claim` must not be empty".into(),
            ));
        }
        let source = match (&cfg.jwks_file, &cfg.jwks_url) {
            (Some(path), None) => Source::File(path.clone()),
            (None, Some(url)) => {
                let uri: Uri = url
                    .parse()
                    .map_err(|e| OidcError::Config(format!("`jwks_url` is not a URL: {e}")))?;
                let https = match uri.scheme_str() {
                    Some("https") => true,
                    Some("http") => false,
                    _ => {
                        return Err(OidcError::Config(
                            "`jwks_url` must start with http:// or https://".into(),
                        ))
                    }
                };
                let host = uri
                    .host()
                    .ok_or_else(|| OidcError::Config("`jwks_url` has no host".into()))?;
                if !https && !is_loopback_host(host) {
                    tracing::warn!(
                        jwks_url = %shown_url(&uri),
                        "the JWKS is fetched over plain http: whoever can alter it in transit can mint tokens"
                    );
                }
                let shown = shown_url(&uri);
                let client = build_client(https, tuning.roots.clone()).map_err(|reason| {
                    OidcError::JwksUnavailable {
                        jwks: shown.clone(),
                        reason,
                    }
                })?;
                Source::Url {
                    uri,
                    shown,
                    client: Box::new(client),
                }
            }
            _ => {
                return Err(OidcError::Config(
                    "set exactly one of `jwks_file` and `jwks_url`".into(),
                ))
            }
        };
        let inner = Inner {
            cfg,
            source,
            tuning,
            keys: RwLock::new(Arc::new(KeySet {
                keys: Vec::new(),
                fetched_at: Instant::now(),
            })),
            last_fetch: tokio::sync::Mutex::new(Instant::now()),
            background_refresh: AtomicBool::new(false),
        };
        let keys = inner.load().await?;
        inner.store(keys);
        Ok(OidcVerifier {
            inner: Arc::new(inner),
        })
    }

    /// The configuration this verifier checks against.
    pub fn config(&self) -> &OidcConfig {
        &self.inner.cfg
    }

    /// Verify a token: shape, algorithm, signature against the issuer's key, `exp`/`nbf` with the
    /// configured leeway, `iss`, `aud`, then extract the subject and groups.
    pub async fn verify(&self, token: &str) -> Result<Claims, OidcError> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_LEN {
            return Err(OidcError::Malformed {
                reason: "the token is longer than 16 KiB",
            });
        }
        let segments: Vec<&str> = token.split('.').collect();
        match segments.len() {
            3 => {}
            5 => {
                return Err(OidcError::Malformed {
                    reason: "encrypted tokens (JWE) are not supported",
                })
            }
            _ => {
                return Err(OidcError::Malformed {
                    reason: "a JWT has three dot-separated parts",
                })
            }
        }
        if !segments.iter().all(|s| is_b64url(s)) {
            return Err(OidcError::Malformed {
                reason: "a part is not base64url",
            });
        }
        let (alg, kid) = parse_header(segments[0])?;

        self.maybe_refresh_in_background();
        let mut keys = self.inner.current();
        let mut found = lookup(&keys, kid.as_deref(), alg);
        if matches!(found, Lookup::Unknown) {
            // Perhaps the issuer rotated its keys: refetch (rate-limited) and look again.
            let refreshed = self.inner.refresh().await;
            keys = self.inner.current();
            found = lookup(&keys, kid.as_deref(), alg);
            if let (Lookup::Unknown, Err(e)) = (&found, refreshed) {
                return Err(e);
            }
        }
        let candidates = match found {
            Lookup::Keys(k) => k,
            Lookup::Mismatch(kid) => {
                return Err(OidcError::AlgorithmKeyMismatch {
                    alg: format!("{alg:?}"),
                    kid: shown(&kid),
                })
            }
            Lookup::Unknown => {
                return Err(OidcError::UnknownKey {
                    kid: kid.as_deref().map(shown),
                })
            }
        };

        let cfg = &self.inner.cfg;
        let mut validation = Validation::new(alg);
        validation.leeway = cfg.leeway_seconds;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_issuer(&[cfg.issuer.as_str()]);
        validation.set_audience(&[cfg.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);

        let mut last_err = OidcError::BadSignature;
        for i in candidates {
            let key = &keys.keys[i];
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation) {
                Ok(data) => return self.extract(data.claims),
                Err(e) => {
                    let err = self.map_error(e.into_kind(), key, segments[1]);
                    if err != OidcError::BadSignature {
                        return Err(err);
                    }
                    last_err = err;
                }
            }
        }
        Err(last_err)
    }

    fn maybe_refresh_in_background(&self) {
        let inner = &self.inner;
        if inner.current().fetched_at.elapsed() < inner.tuning.max_age {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if inner.background_refresh.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = Arc::clone(inner);
        handle.spawn(async move {
            let _ = inner.refresh().await;
            inner.background_refresh.store(false, Ordering::Release);
        });
    }

    fn map_error(&self, kind: ErrorKind, key: &VerifyKey, payload: &str) -> OidcError {
        let cfg = &self.inner.cfg;
        match kind {
            ErrorKind::InvalidSignature => OidcError::BadSignature,
            // The signature was good; read the time claims for the message.
            ErrorKind::ExpiredSignature => OidcError::Expired {
                expired_at: time_claim(payload, "exp").unwrap_or(0),
            },
            ErrorKind::ImmatureSignature => OidcError::NotYetValid {
                not_before: time_claim(payload, "nbf").unwrap_or(0),
            },
            ErrorKind::InvalidAudience => OidcError::WrongAudience {
                expected: cfg.audience.clone(),
            },
            ErrorKind::InvalidIssuer => OidcError::WrongIssuer {
                expected: cfg.issuer.clone(),
            },
            ErrorKind::MissingRequiredClaim(claim) => OidcError::MissingClaim { claim },
            ErrorKind::InvalidClaimFormat(claim) => OidcError::InvalidClaim {
                claim,
                reason: "must be a number of seconds since 1970",
            },
            ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat => OidcError::InvalidKey {
                kid: key.kid.as_deref().map(shown).unwrap_or_default(),
            },
            ErrorKind::InvalidAlgorithm => OidcError::AlgorithmKeyMismatch {
                alg: "?".into(),
                kid: key.kid.as_deref().map(shown).unwrap_or_default(),
            },
            ErrorKind::Base64(_) => OidcError::Malformed {
                reason: "a part is not base64url",
            },
            ErrorKind::Json(_) | ErrorKind::Utf8(_) => OidcError::Malformed {
                reason: "the header or payload is not a JSON object",
            },
            _ => OidcError::Malformed {
                reason: "the token cannot be verified",
            },
        }
    }

    fn extract(&self, claims: Map<String, Value>) -> Result<Claims, OidcError> {
        let cfg = &self.inner.cfg;
        // jsonwebtoken also accepts an array of issuers that includes ours; OIDC wants exactly one.
        if claims.get("iss").and_then(Value::as_str) != Some(cfg.issuer.as_str()) {
            return Err(OidcError::WrongIssuer {
                expected: cfg.issuer.clone(),
            });
        }
        let subject = match claim(&claims, &cfg.subject_claim) {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            _ => {
                return Err(OidcError::MissingSubject {
                    claim: cfg.subject_claim.clone(),
                })
            }
        };
        let groups_invalid = || OidcError::InvalidClaim {
            claim: cfg.groups_claim.clone(),
            reason: "must be an array of strings or a space- or comma-separated string",
        };
        let raw_groups: Vec<String> = match claim(&claims, &cfg.groups_claim) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => s
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|g| !g.is_empty())
                .map(str::to_string)
                .collect(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(groups_invalid))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(groups_invalid()),
        };
        let mut seen = HashSet::new();
        let groups = raw_groups
            .into_iter()
            .filter(|g| seen.insert(g.clone()))
            .collect();
        let expires_unix =
            claims
                .get("exp")
                .and_then(number_as_i64)
                .ok_or_else(|| OidcError::MissingClaim {
                    claim: "exp".into(),
                })?;
        Ok(Claims {
            subject,
            groups,
            expires_unix,
            issuer: cfg.issuer.clone(),
        })
    }
}

fn number_as_i64(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_u64().map(|u| i64::try_from(u).unwrap_or(i64::MAX)))
        .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
}

/// A claim by exact name, or else by dotted path into nested objects.
fn claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    if !name.contains('.') {
        return None;
    }
    let mut parts = name.split('.');
    let mut cur = claims.get(parts.next()?)?;
    for part in parts {
        cur = cur.as_object()?.get(part)?;
    }
    Some(cur)
}

/// A numeric claim from a payload whose signature has been checked (for error messages).
fn time_claim(payload: &str, name: &str) -> Option<i64> {
    let bytes = B64.decode(payload).ok()?;
    let map: Map<String, Value> = serde_json::from_slice(&bytes).ok()?;
    map.get(name).and_then(number_as_i64)
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<Value>,
    kid: Option<Value>,
    crit: Option<Value>,
}

fn parse_header(segment: &str) -> Result<(Algorithm, Option<String>), OidcError> {
    let bytes = B64.decode(segment).map_err(|_| OidcError::Malformed {
        reason: "the header is not base64url",
    })?;
    let header: RawHeader = serde_json::from_slice(&bytes).map_err(|_| OidcError::Malformed {
        reason: "the header is not a JSON object",
    })?;
    let alg = match header.alg {
        Some(Value::String(alg)) => alg,
        _ => {
            return Err(OidcError::Malformed {
                reason: "the header has no `alg`",
            })
        }
    };
    if alg.eq_ignore_ascii_case("none") {
        return Err(OidcError::Unsigned);
    }
    let Some(alg_parsed) = parse_alg(&alg) else {
        return Err(OidcError::AlgorithmNotAllowed { alg: shown(&alg) });
    };
    if header.crit.is_some() {
        return Err(OidcError::Malformed {
            reason: "critical header extensions (crit) are not supported",
        });
    }
    let kid = match header.kid {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) => Some(k),
        Some(_) => {
            return Err(OidcError::Malformed {
                reason: "the header's `kid` is not a string",
            })
        }
    };
    Ok((alg_parsed, kid))
}

fn lookup(keys: &KeySet, kid: Option<&str>, alg: Algorithm) -> Lookup {
    match kid {
        Some(kid) => {
            let named: Vec<usize> = (0..keys.keys.len())
                .filter(|&i| keys.keys[i].kid.as_deref() == Some(kid))
                .collect();
            if named.is_empty() {
                return Lookup::Unknown;
            }
            let fitting: Vec<usize> = named
                .into_iter()
                .filter(|&i| keys.keys[i].fits(alg))
                .collect();
            if fitting.is_empty() {
                Lookup::Mismatch(kid.to_string())
            } else {
                Lookup::Keys(fitting)
            }
        }
        None => {
            let fitting: Vec<usize> = (0..keys.keys.len())
                .filter(|&i| keys.keys[i].fits(alg))
                .collect();
            if fitting.is_empty() {
                Lookup::Unknown
            } else {
                // No kid: each key that fits the algorithm is tried.
                Lookup::Keys(fitting)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use p256::pkcs8::EncodePrivateKey;
    use proptest::prelude::*;
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::EncodePublicKey;
    use rsa::traits::PublicKeyParts;
    use serde_json::json;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Mutex, OnceLock};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const ISS: &str = "https://idp.example.com/realms/custos";
    const AUD: &str = "custos-edge";

    struct TestKeys {
        rsa_der: Vec<u8>,
        rsa_n: String,
        rsa_e: String,
        rsa_public_pem: String,
        ec_der: Vec<u8>,
        ec384_der: Vec<u8>,
        ec384_x: String,
        ec384_y: String,
        ec_x: String,
        ec_y: String,
    }

    fn keys() -> &'static TestKeys {
        static KEYS: OnceLock<TestKeys> = OnceLock::new();
        KEYS.get_or_init(|| {
            let rsa = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
            let public = rsa.to_public_key();
            let ec = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
            let point = ec.public_key().to_encoded_point(false);
            let ec384 = p384::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
            let point384 = ec384.public_key().to_encoded_point(false);
            TestKeys {
                rsa_der: rsa.to_pkcs1_der().unwrap().as_bytes().to_vec(),
                rsa_n: B64.encode(public.n().to_bytes_be()),
                rsa_e: B64.encode(public.e().to_bytes_be()),
                rsa_public_pem: public
                    .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
                    .unwrap(),
                ec_der: ec.to_pkcs8_der().unwrap().as_bytes().to_vec(),
                ec_x: B64.encode(point.x().unwrap()),
                ec_y: B64.encode(point.y().unwrap()),
                ec384_der: ec384.to_pkcs8_der().unwrap().as_bytes().to_vec(),
                ec384_x: B64.encode(point384.x().unwrap()),
                ec384_y: B64.encode(point384.y().unwrap()),
            }
        })
    }

    fn rsa_jwk(kid: &str) -> Value {
        let k = keys();
        json!({"kty": "RSA", "kid": kid, "use": "sig", "n": k.rsa_n, "e": k.rsa_e})
    }

    fn ec_jwk(kid: &str) -> Value {
        let k = keys();
        json!({"kty": "EC", "kid": kid, "use": "sig", "alg": "ES256", "crv": "P-256", "x": k.ec_x, "y": k.ec_y})
    }

    /// The full test JWKS: the RSA and EC keys, plus an encryption key and an HMAC key that must
    /// both be ignored.
    fn jwks() -> String {
        let k = keys();
        json!({"keys": [
            rsa_jwk("rsa1"),
            ec_jwk("ec1"),
            {"kty": "EC", "kid": "ec384", "crv": "P-384", "x": k.ec384_x, "y": k.ec384_y},
            {"kty": "RSA", "kid": "enc1", "use": "enc", "alg": "RSA-OAEP", "n": k.rsa_n, "e": k.rsa_e},
            {"kty": "oct", "kid": "hmac1", "k": B64.encode(k.rsa_public_pem.as_bytes())},
        ]})
        .to_string()
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn claims() -> Value {
        json!({
            "iss": ISS,
            "aud": AUD,
            "sub": "alice",
            "exp": now() + 600,
            "iat": now(),
            "groups": ["dba", "oncall"],
        })
    }

    fn with(mut base: Value, key: &str, value: Value) -> Value {
        base[key] = value;
        base
    }

    fn without(mut base: Value, key: &str) -> Value {
        base.as_object_mut().unwrap().remove(key);
        base
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let k = keys();
        let key = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_der(&k.ec_der),
            Algorithm::ES384 => EncodingKey::from_ec_der(&k.ec384_der),
            Algorithm::HS256 => EncodingKey::from_secret(k.rsa_public_pem.as_bytes()),
            _ => EncodingKey::from_rsa_der(&k.rsa_der),
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    fn rs256(claims: &Value) -> String {
        sign(Algorithm::RS256, Some("rsa1"), claims)
    }

    fn config(file: Option<PathBuf>, url: Option<String>) -> OidcConfig {
        OidcConfig {
            issuer: ISS.into(),
            audience: AUD.into(),
            jwks_file: file,
            jwks_url: url,
            subject_claim: default_subject_claim(),
            groups_claim: default_groups_claim(),
            leeway_seconds: default_leeway_seconds(),
        }
    }

    struct FileVerifier {
        v: OidcVerifier,
        path: PathBuf,
        _dir: tempfile::TempDir,
    }

    async fn file_verifier_with(cfg: impl FnOnce(&mut OidcConfig), tuning: Tuning) -> FileVerifier {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, jwks()).unwrap();
        let mut c = config(Some(path.clone()), None);
        cfg(&mut c);
        let v = OidcVerifier::with_tuning(c, tuning).await.unwrap();
        FileVerifier { v, path, _dir: dir }
    }

    async fn verifier() -> FileVerifier {
        file_verifier_with(|_| {}, Tuning::default()).await
    }

    /// Verify, expect a refusal, and check the message does not repeat the token.
    async fn reject(v: &OidcVerifier, token: &str) -> OidcError {
        let err = v.verify(token).await.expect_err("token should be refused");
        let msg = err.to_string();
        if !token.is_empty() {
            assert!(!msg.contains(token), "message {msg:?} repeats the token");
        }
        for part in token.split('.').filter(|p| p.len() >= 8) {
            assert!(
                !msg.contains(part),
                "message {msg:?} repeats part of the token"
            );
        }
        err
    }

    #[test]
    fn verifier_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<OidcVerifier>();
        fn send<T: Send>(_: &T) {}
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let fv = rt.block_on(verifier());
        let fut = fv.v.verify("x");
        send(&fut);
    }

    #[test]
    fn config_defaults() {
        let cfg: OidcConfig = serde_json::from_value(json!({
            "issuer": ISS, "audience": AUD, "jwks_url": "https://idp.example.com/jwks"
        }))
        .unwrap();
        assert_eq!(cfg.subject_claim, "sub");
        assert_eq!(cfg.groups_claim, "groups");
        assert_eq!(cfg.leeway_seconds, 30);
        assert!(cfg.jwks_file.is_none());
    }

    #[tokio::test]
    async fn valid_tokens_are_accepted() {
        let fv = verifier().await;
        let c = claims();
        for (alg, kid) in [
            (Algorithm::RS256, "rsa1"),
            (Algorithm::RS384, "rsa1"),
            (Algorithm::RS512, "rsa1"),
            (Algorithm::PS256, "rsa1"),
            (Algorithm::ES256, "ec1"),
            (Algorithm::ES384, "ec384"),
        ] {
            let token = sign(alg, Some(kid), &c);
            assert!(looks_like_jwt(&token));
            let got =
                fv.v.verify(&token)
                    .await
                    .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(
                got,
                Claims {
                    subject: "alice".into(),
                    groups: vec!["dba".into(), "oncall".into()],
                    expires_unix: c["exp"].as_i64().unwrap(),
                    issuer: ISS.into(),
                }
            );
        }
    }

    #[tokio::test]
    async fn audience_array_and_token_without_kid() {
        let fv = verifier().await;
        let c = with(claims(), "aud", json!(["another-app", AUD]));
        assert_eq!(fv.v.verify(&rs256(&c)).await.unwrap().subject, "alice");
        // No kid: the one key that fits the algorithm is used.
        let c = without(claims(), "groups");
        let got =
            fv.v.verify(&sign(Algorithm::ES256, None, &c))
                .await
                .unwrap();
        assert!(got.groups.is_empty());
        assert!(fv.v.verify(&sign(Algorithm::RS256, None, &c)).await.is_ok());
    }

    #[tokio::test]
    async fn expired_and_not_yet_valid() {
        let fv = verifier().await;
        let exp = now() - 3600;
        let token = rs256(&with(claims(), "exp", json!(exp)));
        let err = reject(&fv.v, &token).await;
        assert_eq!(err, OidcError::Expired { expired_at: exp });
        assert!(err.to_string().contains("expired at"), "{err}");

        // Within the leeway (30 s) an expired token still passes.
        assert!(fv
            .v
            .verify(&rs256(&with(claims(), "exp", json!(now() - 10))))
            .await
            .is_ok());

        let nbf = now() + 3600;
        let token = sign(
            Algorithm::ES256,
            Some("ec1"),
            &with(claims(), "nbf", json!(nbf)),
        );
        let err = reject(&fv.v, &token).await;
        assert_eq!(err, OidcError::NotYetValid { not_before: nbf });
        assert!(err.to_string().contains("not valid before"), "{err}");
        assert!(fv
            .v
            .verify(&rs256(&with(claims(), "nbf", json!(now() + 10))))
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn wrong_audience_and_issuer() {
        let fv = verifier().await;
        let err = reject(&fv.v, &rs256(&with(claims(), "aud", json!("other-app")))).await;
        assert_eq!(
            err,
            OidcError::WrongAudience {
                expected: AUD.into()
            }
        );
        assert!(err.to_string().contains(AUD), "{err}");
        let err = reject(&fv.v, &rs256(&with(claims(), "aud", json!(["a", "b"])))).await;
        assert!(matches!(err, OidcError::WrongAudience { .. }), "{err}");

        let err = reject(
            &fv.v,
            &rs256(&with(claims(), "iss", json!("https://evil.example.com"))),
        )
        .await;
        assert_eq!(
            err,
            OidcError::WrongIssuer {
                expected: ISS.into()
            }
        );
        assert!(err.to_string().contains(ISS), "{err}");
        // An array of issuers, even one including ours, is not one issuer.
        let token = rs256(&with(
            claims(),
            "iss",
            json!([ISS, "https://evil.example.com"]),
        ));
        let err = reject(&fv.v, &token).await;
        assert!(matches!(err, OidcError::WrongIssuer { .. }), "{err}");
    }

    #[tokio::test]
    async fn required_claims() {
        let fv = verifier().await;
        let err = reject(&fv.v, &rs256(&without(claims(), "sub"))).await;
        assert_eq!(
            err,
            OidcError::MissingSubject {
                claim: "sub".into()
            }
        );
        let err = reject(&fv.v, &rs256(&with(claims(), "sub", json!("")))).await;
        assert!(matches!(err, OidcError::MissingSubject { .. }), "{err}");
        let err = reject(&fv.v, &rs256(&with(claims(), "sub", json!(42)))).await;
        assert!(matches!(err, OidcError::MissingSubject { .. }), "{err}");
        for claim in ["exp", "iss", "aud"] {
            let err = reject(&fv.v, &rs256(&without(claims(), claim))).await;
            assert_eq!(
                err,
                OidcError::MissingClaim {
                    claim: claim.into()
                }
            );
        }
        let err = reject(&fv.v, &rs256(&with(claims(), "exp", json!("tomorrow")))).await;
        assert!(
            matches!(
                err,
                OidcError::InvalidClaim { .. } | OidcError::MissingClaim { .. }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn unsigned_token_is_refused() {
        let fv = verifier().await;
        let payload = B64.encode(claims().to_string());
        for alg in ["none", "None", "NONE"] {
            let header = B64.encode(json!({"alg": alg, "typ": "JWT"}).to_string());
            let token = format!("{header}.{payload}.");
            assert!(looks_like_jwt(&token));
            assert_eq!(reject(&fv.v, &token).await, OidcError::Unsigned);
            // With a signature stuck on, still refused.
            let token = format!("{header}.{payload}.{}", B64.encode(b"sig"));
            assert_eq!(reject(&fv.v, &token).await, OidcError::Unsigned);
        }
    }

    #[tokio::test]
    async fn hmac_with_public_key_is_refused() {
        let fv = verifier().await;
        // Classic algorithm confusion: HS256 keyed with the RSA public key, naming the RSA key.
        for kid in [Some("rsa1"), Some("hmac1"), None] {
            let token = sign(Algorithm::HS256, kid, &claims());
            let err = reject(&fv.v, &token).await;
            assert_eq!(
                err,
                OidcError::AlgorithmNotAllowed {
                    alg: "HS256".into()
                }
            );
            assert!(err.to_string().contains("`HS256` is not allowed"), "{err}");
        }
        // Other algorithms outside the list.
        let header = B64.encode(json!({"alg": "EdDSA", "kid": "rsa1"}).to_string());
        let token = format!(
            "{header}.{}.{}",
            B64.encode(claims().to_string()),
            B64.encode([1u8; 64])
        );
        assert!(matches!(
            reject(&fv.v, &token).await,
            OidcError::AlgorithmNotAllowed { .. }
        ));
    }

    #[tokio::test]
    async fn algorithm_must_fit_the_key() {
        let fv = verifier().await;
        // An RSA signature presented as the EC key's.
        let token = sign(Algorithm::RS256, Some("ec1"), &claims());
        let err = reject(&fv.v, &token).await;
        assert_eq!(
            err,
            OidcError::AlgorithmKeyMismatch {
                alg: "RS256".into(),
                kid: "ec1".into()
            }
        );
        // ES256 naming the RSA key.
        let token = sign(Algorithm::ES256, Some("rsa1"), &claims());
        assert!(matches!(
            reject(&fv.v, &token).await,
            OidcError::AlgorithmKeyMismatch { .. }
        ));
    }

    #[tokio::test]
    async fn tampered_payload_is_refused() {
        let fv = verifier().await;
        for (alg, kid) in [(Algorithm::RS256, "rsa1"), (Algorithm::ES256, "ec1")] {
            let token = sign(alg, Some(kid), &claims());
            let parts: Vec<&str> = token.split('.').collect();
            let forged = B64.encode(with(claims(), "sub", json!("root")).to_string());
            let tampered = format!("{}.{}.{}", parts[0], forged, parts[2]);
            assert_eq!(reject(&fv.v, &tampered).await, OidcError::BadSignature);
            // A signature from another token.
            let other = sign(alg, Some(kid), &with(claims(), "sub", json!("bob")));
            let swapped = format!(
                "{}.{}.{}",
                parts[0],
                parts[1],
                other.split('.').nth(2).unwrap()
            );
            assert_eq!(reject(&fv.v, &swapped).await, OidcError::BadSignature);
            // No signature at all.
            let stripped = format!("{}.{}.", parts[0], parts[1]);
            let err = reject(&fv.v, &stripped).await;
            assert!(
                matches!(err, OidcError::BadSignature | OidcError::Malformed { .. }),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn unknown_kid_is_refused() {
        let fv = verifier().await;
        let err = reject(
            &fv.v,
            &sign(Algorithm::RS256, Some("rotated-away"), &claims()),
        )
        .await;
        assert_eq!(
            err,
            OidcError::UnknownKey {
                kid: Some("rotated-away".into())
            }
        );
        assert!(err.to_string().contains("rotated-away"));
        // A hostile kid is shortened and cleaned before it is shown.
        let kid = format!("\u{1b}[31m{}", "k".repeat(500));
        let err = reject(&fv.v, &sign(Algorithm::RS256, Some(&kid), &claims())).await;
        let msg = err.to_string();
        assert!(!msg.contains('\u{1b}') && msg.len() < 300, "{msg}");
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let fv = verifier().await;
        let valid = rs256(&claims());
        let parts: Vec<&str> = valid.split('.').collect();
        let cases = [
            String::new(),
            "hello".into(),
            "a.b.c".into(),
            "....".into(),
            "cst_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
            format!("{}.{}", parts[0], parts[1]),
            format!("{valid}.{}.x", parts[1]),
            format!("{}.{}!.{}", parts[0], parts[1], parts[2]),
            format!("{}.{}.{}", B64.encode("[1,2]"), parts[1], parts[2]),
            format!("{}.{}.{}", parts[0], B64.encode("not json"), parts[2]),
            format!(
                "{}.{}.{}",
                B64.encode(r#"{"alg":"RS256","kid":"rsa1","crit":["exp"]}"#),
                parts[1],
                parts[2]
            ),
            format!(
                "{}.{}.{}",
                B64.encode(r#"{"alg":"RS256","kid":7}"#),
                parts[1],
                parts[2]
            ),
            format!(
                "{}.{}.{}",
                B64.encode(r#"{"kid":"rsa1"}"#),
                parts[1],
                parts[2]
            ),
            "e".repeat(MAX_TOKEN_LEN + 1),
        ];
        for token in cases {
            let err = reject(&fv.v, &token).await;
            assert!(
                matches!(err, OidcError::Malformed { .. } | OidcError::BadSignature),
                "{token:.40}: {err:?}"
            );
        }
    }

    #[tokio::test]
    async fn claim_names_and_group_shapes() {
        let fv = file_verifier_with(
            |c| {
                c.subject_claim = "email".into();
                c.groups_claim = "realm_access.roles".into();
            },
            Tuning::default(),
        )
        .await;
        let c = with(claims(), "email", json!("alice@example.com"));
        let c = with(
            c,
            "realm_access",
            json!({"roles": ["admin", "dba", "admin"]}),
        );
        let got = fv.v.verify(&rs256(&c)).await.unwrap();
        assert_eq!(got.subject, "alice@example.com");
        assert_eq!(got.groups, vec!["admin", "dba"]);
        let err = reject(&fv.v, &rs256(&claims())).await;
        assert_eq!(
            err,
            OidcError::MissingSubject {
                claim: "email".into()
            }
        );

        let fv = verifier().await;
        let got =
            fv.v.verify(&rs256(&with(
                claims(),
                "groups",
                json!("dba oncall,sre, dba"),
            )))
            .await
            .unwrap();
        assert_eq!(got.groups, vec!["dba", "oncall", "sre"]);
        let err = reject(&fv.v, &rs256(&with(claims(), "groups", json!(["dba", 7])))).await;
        assert!(matches!(err, OidcError::InvalidClaim { .. }), "{err}");
        let err = reject(&fv.v, &rs256(&with(claims(), "groups", json!({"a": 1})))).await;
        assert!(matches!(err, OidcError::InvalidClaim { .. }), "{err}");
    }

    #[tokio::test]
    async fn jwks_file_is_reread_for_a_new_kid() {
        let tuning = Tuning {
            min_refetch: Duration::ZERO,
            ..Tuning::default()
        };
        let fv = file_verifier_with(|_| {}, tuning).await;
        let token = sign(Algorithm::RS256, Some("rsa2"), &claims());
        assert!(matches!(
            reject(&fv.v, &token).await,
            OidcError::UnknownKey { .. }
        ));
        std::fs::write(&fv.path, json!({"keys": [rsa_jwk("rsa2")]}).to_string()).unwrap();
        assert_eq!(fv.v.verify(&token).await.unwrap().subject, "alice");
        // rsa1 was rotated away with the rewrite.
        let old = rs256(&claims());
        assert!(matches!(
            reject(&fv.v, &old).await,
            OidcError::UnknownKey { .. }
        ));
        // A broken file later: the unknown kid reports the JWKS as unavailable, known keys still work.
        std::fs::write(&fv.path, "{not json").unwrap();
        let err = reject(&fv.v, &old).await;
        assert!(matches!(err, OidcError::JwksUnavailable { .. }), "{err}");
        assert!(fv.v.verify(&token).await.is_ok());
    }

    #[test]
    fn jwks_parsing_skips_unusable_keys() {
        let k = keys();
        let short = B64.encode([0xffu8; 128]);
        let doc = json!({"keys": [
            {"kty": "RSA", "kid": "short", "n": short, "e": "AQAB"},
            {"kty": "EC", "kid": "k1", "crv": "secp256k1", "x": k.ec_x, "y": k.ec_y},
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "AAAA"},
            {"kty": "RSA", "kid": "hs", "alg": "HS256", "n": k.rsa_n, "e": k.rsa_e},
            {"kty": "RSA", "kid": "ops", "key_ops": ["encrypt"], "n": k.rsa_n, "e": k.rsa_e},
            {"kty": "EC", "kid": "mix", "alg": "RS256", "crv": "P-256", "x": k.ec_x, "y": k.ec_y},
            "not an object",
            {"kty": "RSA", "kid": "good", "alg": "PS256", "n": k.rsa_n, "e": k.rsa_e},
        ]});
        let keys = parse_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("good"));
        assert!(keys[0].fits(Algorithm::PS256) && !keys[0].fits(Algorithm::RS256));

        let err = parse_jwks(
            json!({"keys": [{"kty": "RSA", "n": short, "e": "AQAB"}]})
                .to_string()
                .as_bytes(),
        )
        .err()
        .unwrap();
        assert!(err.contains("no usable signing key"), "{err}");
        assert!(parse_jwks(b"[]").is_err());
        assert_eq!(bit_len(&[0, 0x01, 0]), 9);
    }

    #[tokio::test]
    async fn configuration_errors() {
        let both = config(
            Some("/nonexistent".into()),
            Some("http://127.0.0.1:1/".into()),
        );
        for cfg in [
            both,
            config(None, None),
            config(None, Some("ftp://idp.example.com/jwks".into())),
            config(None, Some("not a url at all".into())),
            OidcConfig {
                issuer: " ".into(),
                ..config(Some("/x".into()), None)
            },
            OidcConfig {
                audience: String::new(),
                ..config(Some("/x".into()), None)
            },
        ] {
            let err = OidcVerifier::new(cfg).await.unwrap_err();
            assert!(matches!(err, OidcError::Config(_)), "{err}");
        }
        let err = OidcVerifier::new(config(Some("/nonexistent/jwks.json".into()), None))
            .await
            .unwrap_err();
        assert!(matches!(err, OidcError::JwksUnavailable { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/jwks.json"), "{err}");
    }

    /// A tiny HTTP server: every request gets the current status and body, then the connection
    /// closes. `hang` makes it accept and never answer.
    struct JwksServer {
        addr: SocketAddr,
        reply: Arc<Mutex<(u16, Vec<u8>)>>,
        hits: Arc<AtomicUsize>,
    }

    async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut stream: S,
        reply: Arc<Mutex<(u16, Vec<u8>)>>,
        hits: Arc<AtomicUsize>,
        hang: bool,
    ) {
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        hits.fetch_add(1, Ordering::SeqCst);
        if hang {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        let (status, body) = reply.lock().unwrap().clone();
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(&body).await;
        let _ = stream.shutdown().await;
    }

    impl JwksServer {
        async fn start(status: u16, body: Vec<u8>, hang: bool) -> JwksServer {
            Self::start_with(status, body, hang, None).await
        }

        async fn start_with(
            status: u16,
            body: Vec<u8>,
            hang: bool,
            tls: Option<tokio_rustls::TlsAcceptor>,
        ) -> JwksServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let reply = Arc::new(Mutex::new((status, body)));
            let hits = Arc::new(AtomicUsize::new(0));
            let (r, h) = (reply.clone(), hits.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let (r, h, tls) = (r.clone(), h.clone(), tls.clone());
                    tokio::spawn(async move {
                        match tls {
                            None => answer(stream, r, h, hang).await,
                            Some(acceptor) => {
                                if let Ok(stream) = acceptor.accept(stream).await {
                                    answer(stream, r, h, hang).await
                                }
                            }
                        }
                    });
                }
            });
            JwksServer { addr, reply, hits }
        }

        fn url(&self) -> String {
            format!(
                "http://user:secret@{}/realms/custos/certs?token=abc",
                self.addr
            )
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn jwks_url_is_fetched_and_refreshed() {
        let server = JwksServer::start(
            200,
            json!({"keys": [rsa_jwk("rsa1")]}).to_string().into_bytes(),
            false,
        )
        .await;
        let v = OidcVerifier::new(config(None, Some(server.url())))
            .await
            .unwrap();
        assert_eq!(server.hits(), 1);
        assert_eq!(v.verify(&rs256(&claims())).await.unwrap().subject, "alice");
        assert_eq!(server.hits(), 1, "a known kid needs no fetch");

        // The IdP adds a key; within 30 s of the last fetch an unknown kid does not refetch.
        server.reply.lock().unwrap().1 = jwks().into_bytes();
        let es = sign(Algorithm::ES256, Some("ec1"), &claims());
        let err = reject(&v, &es).await;
        assert_eq!(
            err,
            OidcError::UnknownKey {
                kid: Some("ec1".into())
            }
        );
        assert_eq!(server.hits(), 1);

        // With no rate limit, the unknown kid triggers a refetch that finds it.
        let tuning = Tuning {
            min_refetch: Duration::ZERO,
            ..Tuning::default()
        };
        server.reply.lock().unwrap().1 =
            json!({"keys": [rsa_jwk("rsa1")]}).to_string().into_bytes();
        let v = OidcVerifier::with_tuning(config(None, Some(server.url())), tuning)
            .await
            .unwrap();
        assert_eq!(server.hits(), 2);
        server.reply.lock().unwrap().1 = jwks().into_bytes();
        assert_eq!(v.verify(&es).await.unwrap().subject, "alice");
        assert_eq!(server.hits(), 3);
    }

    #[tokio::test]
    async fn stale_keys_are_refreshed_in_the_background() {
        let server = JwksServer::start(200, jwks().into_bytes(), false).await;
        let tuning = Tuning {
            min_refetch: Duration::ZERO,
            max_age: Duration::ZERO,
            ..Tuning::default()
        };
        let v = OidcVerifier::with_tuning(config(None, Some(server.url())), tuning)
            .await
            .unwrap();
        assert!(v.verify(&rs256(&claims())).await.is_ok());
        for _ in 0..100 {
            if server.hits() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(server.hits() >= 2);
    }

    #[tokio::test]
    async fn jwks_over_https() {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key.into())
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
        let server = JwksServer::start_with(200, jwks().into_bytes(), false, Some(acceptor)).await;
        let url = format!("https://localhost:{}/jwks", server.addr.port());

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let tuning = Tuning {
            roots: Some(roots),
            ..Tuning::default()
        };
        let v = OidcVerifier::with_tuning(config(None, Some(url.clone())), tuning)
            .await
            .unwrap();
        let token = sign(Algorithm::ES256, Some("ec1"), &claims());
        assert_eq!(v.verify(&token).await.unwrap().subject, "alice");
        assert_eq!(server.hits(), 1);

        // The system's CA certificates do not vouch for a self-signed certificate.
        let err = OidcVerifier::new(config(None, Some(url)))
            .await
            .unwrap_err();
        assert!(matches!(err, OidcError::JwksUnavailable { .. }), "{err}");
        assert!(err.to_string().contains("certificate"), "{err}");
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn jwks_url_failures() {
        // Nothing listens on a port whose listener was dropped.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let url = format!("http://{addr}/jwks");
        let err = OidcVerifier::new(config(None, Some(url.clone())))
            .await
            .unwrap_err();
        assert!(matches!(err, OidcError::JwksUnavailable { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&url), "{msg}");
        assert!(msg.to_lowercase().contains("refused"), "{msg}");

        let server = JwksServer::start(404, b"not found".to_vec(), false).await;
        let msg = OidcVerifier::new(config(None, Some(server.url())))
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.contains("HTTP 404"), "{msg}");
        assert!(
            !msg.contains("secret") && !msg.contains("token=abc"),
            "{msg}"
        );

        let server = JwksServer::start(200, vec![b' '; MAX_JWKS_BYTES + 10], false).await;
        let msg = OidcVerifier::new(config(None, Some(server.url())))
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.contains("larger than 1024 KiB"), "{msg}");

        let server = JwksServer::start(200, b"<html>".to_vec(), false).await;
        let msg = OidcVerifier::new(config(None, Some(server.url())))
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a JWKS document"), "{msg}");

        let server = JwksServer::start(200, Vec::new(), true).await;
        let tuning = Tuning {
            fetch_timeout: Duration::from_millis(300),
            ..Tuning::default()
        };
        let started = Instant::now();
        let err = OidcVerifier::with_tuning(config(None, Some(server.url())), tuning)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no answer within 300 ms"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn jwt_shape() {
        let token = rs256(&claims());
        assert!(looks_like_jwt(&token));
        assert!(looks_like_jwt(&format!(" {token}\n")));
        assert!(!looks_like_jwt(&without_sig(&token)));
        for s in [
            "",
            "a.b.c",
            "abc",
            "eyJhbGciOiJSUzI1NiJ9..sig",
            "x.y",
            "a.b.c.d",
            "eyJ!.eyJ.x",
        ] {
            assert!(!looks_like_jwt(s), "{s}");
        }
        assert!(!looks_like_jwt(
            "cst_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        ));
        assert!(!looks_like_jwt(&format!("{}.e30.", B64.encode("[1]"))));
        assert!(looks_like_jwt(&format!("{}.e30.", B64.encode("{}"))));
    }

    fn without_sig(token: &str) -> String {
        token.rsplit_once('.').unwrap().0.to_string()
    }

    #[test]
    fn arbitrary_strings_never_panic_and_are_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let fv = rt.block_on(verifier());
        let valid = rs256(&claims());
        let alphabet: Vec<char> =
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
                .chars()
                .collect();
        let header = B64.encode(json!({"alg": "RS256", "kid": "rsa1"}).to_string());
        let strategy = prop_oneof![
            any::<String>(),
            "[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,200}\\.[A-Za-z0-9_-]{0,100}",
            "[A-Za-z0-9_=+/.-]{0,400}".prop_map(move |s| format!("{header}.{s}")),
            (0..valid.len(), 0..alphabet.len()).prop_filter_map("same char", move |(i, c)| {
                let mut chars: Vec<char> = valid.chars().collect();
                if chars[i] == alphabet[c] {
                    return None;
                }
                chars[i] = alphabet[c];
                Some(chars.into_iter().collect::<String>())
            }),
        ];
        let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
            cases: 512,
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        });
        runner
            .run(&strategy, |s| {
                let _ = looks_like_jwt(&s);
                let result = rt.block_on(fv.v.verify(&s));
                prop_assert!(result.is_err(), "accepted {s:?}");
                Ok(())
            })
            .unwrap();
    }
}
