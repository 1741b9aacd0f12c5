//! Approval notifiers: tell people about approval requests outside the CLI.
//!
//! ```text
//!   control plane ── pending(notice) ──▶ Notifier ──▶ Slack chat.postMessage / webhook POST
//!        │                                   │ returns a message reference ("<channel>/<ts>")
//!        └──── decided(notice, ref) ───────▶ Notifier ──▶ Slack chat.update / webhook POST
//! ```
//!
//! A [`Notifier`] only announces; decisions come back through the control plane's own API or,
//! for Slack, through [`crate::slack::serve_interactions`]. Notifiers never see credentials:
//! an [`ApprovalNotice`] carries the masked command text and names only.
//!
//! [`WebhookNotifier`] is the generic one: it POSTs JSON signed with HMAC-SHA256 so that the
//! receiver can check it came from custos (see [`verify_webhook`] for the receiving side).
//!
//! Errors ([`NotifyError`]) name the cause and the next step, and never contain the bot token
//! or a webhook secret: outgoing requests mark those headers sensitive, and any text that comes
//! back from a receiver is redacted before it is put into an error.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What notifiers see of an approval request. Never contains credentials.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApprovalNotice {
    /// Approval id (a UUIDv7 string).
    pub id: String,
    /// Who asked (e.g. `agent:crewai-writer`).
    pub identity: String,
    /// The connection the command is for (e.g. `prod-pg`).
    pub connection: String,
    /// The action that needs approval (e.g. `sql:delete`).
    pub action: String,
    /// The exact (masked) command text.
    pub text: String,
    /// The group whose members may approve (e.g. `dba`).
    pub approver_group: String,
    pub quorum: u32,
    /// Identities that approved so far.
    pub approvals: Vec<String>,
    pub expires_unix_nano: i64,
    pub policy_id: String,
    /// The requester's reason; may be empty.
    pub reason: String,
    /// `pending`, `approved`, `denied`, `expired` or `cancelled`.
    pub state: String,
    /// The last approver or denier; empty for expiry and cancellation.
    pub decided_by: String,
    /// The decision comment.
    pub comment: String,
}

/// Why a notification could not be delivered. The texts never contain secrets.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The notifier is misconfigured (a missing secret file, an empty channel, a bad URL …).
    #[error("{0}")]
    Config(String),
    /// The receiver could not be reached, or the exchange broke off.
    #[error("cannot reach {target}: {reason}; check the URL, DNS, firewall and proxy settings")]
    Http { target: String, reason: String },
    /// The receiver did not answer in time.
    #[error("{target} did not answer within {secs} s; check that it is up and reachable")]
    Timeout { target: String, secs: u64 },
    /// The receiver answered with an HTTP status other than 2xx.
    #[error("{target} answered HTTP {code}: {body}; {hint}", hint = status_hint(*.code))]
    Status {
        target: String,
        code: u16,
        /// The start of the answer's body, with secrets redacted.
        body: String,
    },
    /// Slack answered `{"ok": false, "error": …}`.
    #[error("Slack {method} failed: {error}; {hint}")]
    Api {
        method: String,
        /// Slack's error code, e.g. `channel_not_found`.
        error: String,
        /// What to do about it.
        hint: String,
    },
    /// The receiver answered 2xx with something that is not what its API promises.
    #[error("cannot understand the answer of {target}: {reason}")]
    BadResponse { target: String, reason: String },
}

fn status_hint(code: u16) -> &'static str {
    match code {
        401 | 403 => {
            "check the credentials (bot token or webhook secret) and the receiver's configuration"
        }
        404 | 405 => "check the URL",
        408 | 429 => {
            "the receiver is busy or rate limiting; the notification is retried on the next change"
        }
        500..=599 => "the receiver failed; see its logs",
        _ => "see the receiver's documentation",
    }
}

/// Announces approval requests somewhere people look.
pub trait Notifier: Send + Sync + 'static {
    /// `"slack"`, `"webhook"`.
    fn name(&self) -> &'static str;
    /// Announce a new pending request. Returns an opaque reference to the posted message
    /// (Slack: `"<channel>/<ts>"`) so the decision can update it; `None` when not applicable.
    fn pending<'a>(
        &'a self,
        n: &'a ApprovalNotice,
    ) -> BoxFuture<'a, Result<Option<String>, NotifyError>>;
    /// The request left `pending` (approved/denied/expired/cancelled). `message_ref` is what
    /// [`Notifier::pending`] returned.
    fn decided<'a>(
        &'a self,
        n: &'a ApprovalNotice,
        message_ref: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), NotifyError>>;
}

// ---------------------------------------------------------------------------------------------
// Shared HTTP client (also used by `crate::slack`)

/// Largest answer body read from a receiver.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Longest receiver body quoted in an error.
const MAX_QUOTED_BODY_CHARS: usize = 300;
/// Default time for one request, connect to last byte.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

type HyperClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A small HTTP(S) client: rustls (ring) with the system's CA certificates, HTTP/1.1, a timeout,
/// a cap on the answer size, and secret-free errors.
#[derive(Clone)]
pub(crate) struct HttpClient {
    inner: HyperClient,
    timeout: Duration,
}

/// A parsed receiver URL with the text used for it in messages (scheme, host and port only:
/// paths and queries of webhook URLs often carry secrets).
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub uri: Uri,
    pub shown: String,
    pub https: bool,
}

pub(crate) fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Parse an `http://` or `https://` URL. `what` names the setting in messages.
pub(crate) fn parse_endpoint(what: &str, url: &str) -> Result<Endpoint, NotifyError> {
    let uri: Uri = url.trim().parse().map_err(|_| {
        NotifyError::Config(format!(
            "{what} is not a valid URL; write it as https://host[:port]/path"
        ))
    })?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(NotifyError::Config(format!(
                "{what} must start with http:// or https://"
            )))
        }
    };
    let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
        return Err(NotifyError::Config(format!("{what} has no host")));
    };
    let shown = match uri.port_u16() {
        Some(port) => format!("{}://{host}:{port}", uri.scheme_str().unwrap_or("http")),
        None => format!("{}://{host}", uri.scheme_str().unwrap_or("http")),
    };
    Ok(Endpoint { uri, shown, https })
}

impl HttpClient {
    /// With `roots`, trust exactly those CA certificates; otherwise the system's (loaded only
    /// when `https`, so plain-http set-ups work without a CA bundle).
    pub(crate) fn new(
        https: bool,
        roots: Option<rustls::RootCertStore>,
        timeout: Duration,
    ) -> Result<Self, NotifyError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls_error = |e: rustls::Error| NotifyError::Config(format!("TLS set-up failed: {e}"));
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match roots {
            Some(roots) => builder.with_tls_config(
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(tls_error)?
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            ),
            None if https => builder
                .with_provider_and_native_roots(provider)
                .map_err(|e| {
                    NotifyError::Config(format!(
                        "cannot load the system's CA certificates ({e}); install the CA bundle \
                         (e.g. the ca-certificates package)"
                    ))
                })?,
            // Never used for TLS: the URL is plain http.
            None => builder.with_tls_config(
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(tls_error)?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            ),
        };
        let connector = builder.https_or_http().enable_http1().build();
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self { inner, timeout })
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Send `req`; answer the status and body. `target` names the receiver in errors; every
    /// string in `secrets` is redacted from quoted bodies.
    pub(crate) async fn send(
        &self,
        req: Request<Full<Bytes>>,
        target: &str,
        secrets: &[&str],
    ) -> Result<(StatusCode, Bytes), NotifyError> {
        let exchange = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| NotifyError::Http {
                    target: target.to_string(),
                    reason: redact(&error_chain(&e), secrets),
                })?;
            let status = resp.status();
            let declared = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let too_big = || NotifyError::BadResponse {
                target: target.to_string(),
                reason: format!(
                    "the answer is larger than {} KiB",
                    MAX_RESPONSE_BYTES / 1024
                ),
            };
            if declared.is_some_and(|len| len > MAX_RESPONSE_BYTES as u64) {
                return Err(too_big());
            }
            let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        too_big()
                    } else {
                        NotifyError::Http {
                            target: target.to_string(),
                            reason: format!(
                                "reading the answer: {}",
                                redact(&error_chain(&*e), secrets)
                            ),
                        }
                    }
                })?;
            Ok((status, body.to_bytes()))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(NotifyError::Timeout {
                target: target.to_string(),
                secs: self.timeout.as_secs().max(1),
            }),
        }
    }
}

/// The error and its causes, joined (hyper's own message is just "client error (Connect)").
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
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

/// Replace every occurrence of a secret with `[redacted]`.
pub(crate) fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if !s.is_empty() && out.contains(s) {
            out = out.replace(s, "[redacted]");
        }
    }
    out
}

/// A receiver's body, made fit to quote in an error: secrets redacted, control characters
/// replaced, cut to a few hundred characters.
pub(crate) fn quote_body(body: &[u8], secrets: &[&str]) -> String {
    let text = redact(&String::from_utf8_lossy(body), secrets);
    let mut out: String = text
        .chars()
        .take(MAX_QUOTED_BODY_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > MAX_QUOTED_BODY_CHARS {
        out.push('…');
    }
    let out = out.trim().to_string();
    if out.is_empty() {
        "(empty body)".into()
    } else {
        out
    }
}

/// A header value that is never printed (hyper's `Debug` shows it as `Sensitive`).
pub(crate) fn sensitive_header(value: &str, what: &str) -> Result<HeaderValue, NotifyError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| {
        NotifyError::Config(format!(
            "the {what} contains characters that are not allowed in an HTTP header \
             (a stray newline?); check the file or variable it is read from"
        ))
    })?;
    v.set_sensitive(true);
    Ok(v)
}

pub(crate) fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Generic signed webhook

/// How far a webhook timestamp may be from the receiver's clock, in seconds.
pub const WEBHOOK_TOLERANCE_SECS: i64 = 300;

type HmacSha256 = Hmac<Sha256>;

fn webhook_mac(secret: &[u8], timestamp: i64, body: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
    };
    mac.update(b"v1:");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b":");
    mac.update(body);
    mac
}

/// The `X-Custos-Signature` value for a webhook body: `v1=<hex HMAC-SHA256(secret,
/// "v1:" + timestamp + ":" + body)>`, `timestamp` in Unix seconds as sent in
/// `X-Custos-Timestamp`.
pub fn sign_webhook(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!(
        "v1={}",
        hex::encode(webhook_mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// For receivers of [`WebhookNotifier`] posts: true when `signature` (the `X-Custos-Signature`
/// header) is the signature of `body` at `timestamp` (the `X-Custos-Timestamp` header, Unix
/// seconds) and the timestamp is within 5 minutes of `now_secs`. The comparison is constant
/// time. Receivers should also remember signatures seen in the last 5 minutes and drop repeats.
///
/// ```
/// use custos_controlplane::notify::{sign_webhook, verify_webhook};
/// let sig = sign_webhook(b"secret", 1_700_000_000, b"{}");
/// assert!(verify_webhook(b"secret", 1_700_000_000, b"{}", &sig, 1_700_000_010));
/// assert!(!verify_webhook(b"secret", 1_700_000_000, b"{}", &sig, 1_700_000_400));
/// ```
pub fn verify_webhook(
    secret: &[u8],
    timestamp: i64,
    body: &[u8],
    signature: &str,
    now_secs: i64,
) -> bool {
    if now_secs.abs_diff(timestamp) > WEBHOOK_TOLERANCE_SECS as u64 {
        return false;
    }
    let Some(hex_sig) = signature.trim().strip_prefix("v1=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    webhook_mac(secret, timestamp, body)
        .verify_slice(&sig)
        .is_ok()
}

/// The JSON a [`WebhookNotifier`] posts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WebhookEnvelope {
    /// `approval.pending` or `approval.decided`.
    #[serde(rename = "type")]
    pub kind: String,
    pub approval: ApprovalNotice,
}

/// Generic signed outgoing webhook: POST JSON
/// `{"type":"approval.pending"|"approval.decided","approval":<ApprovalNotice>}` with headers
/// `X-Custos-Timestamp: <unix secs>` and
/// `X-Custos-Signature: v1=<hex HMAC-SHA256(secret, "v1:" + timestamp + ":" + body)>`.
/// A 2xx answer is success; anything else is [`NotifyError::Status`].
pub struct WebhookNotifier {
    endpoint: Endpoint,
    secret: String,
    roots: Option<rustls::RootCertStore>,
    client: HttpClient,
}

impl std::fmt::Debug for WebhookNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookNotifier")
            .field("target", &self.endpoint.shown)
            .field("secret", &"[redacted]")
            .field("timeout", &self.client.timeout())
            .finish()
    }
}

impl WebhookNotifier {
    /// `url` is `http://` or `https://` (https uses the system's CA certificates). `secret`
    /// must not be empty. Plain http to a host other than loopback works but is logged as a
    /// warning: the command text would cross the network unencrypted.
    pub fn new(url: &str, secret: String) -> Result<Self, NotifyError> {
        let endpoint = parse_endpoint("the webhook URL", url)?;
        if secret.trim().is_empty() {
            return Err(NotifyError::Config(
                "the webhook secret is empty; set a long random value and share it with the receiver"
                    .into(),
            ));
        }
        if !endpoint.https && !endpoint.uri.host().is_some_and(is_loopback_host) {
            tracing::warn!(
                target = %endpoint.shown,
                "approval webhook uses plain http: command texts are sent unencrypted; use https"
            );
        }
        let client = HttpClient::new(endpoint.https, None, DEFAULT_TIMEOUT)?;
        Ok(Self {
            endpoint,
            secret,
            roots: None,
            client,
        })
    }

    /// Trust exactly these CA certificates instead of the system's (a private CA).
    pub fn with_root_certificates(
        mut self,
        roots: rustls::RootCertStore,
    ) -> Result<Self, NotifyError> {
        self.client = HttpClient::new(
            self.endpoint.https,
            Some(roots.clone()),
            self.client.timeout(),
        )?;
        self.roots = Some(roots);
        Ok(self)
    }

    /// Time allowed for one delivery (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Result<Self, NotifyError> {
        self.client = HttpClient::new(self.endpoint.https, self.roots.clone(), timeout)?;
        Ok(self)
    }

    async fn post(&self, kind: &str, n: &ApprovalNotice) -> Result<(), NotifyError> {
        let body = serde_json::to_vec(&WebhookEnvelope {
            kind: kind.to_string(),
            approval: n.clone(),
        })
        .map_err(|e| NotifyError::Config(format!("cannot encode the webhook body: {e}")))?;
        let ts = now_secs();
        let signature = sign_webhook(self.secret.as_bytes(), ts, &body);
        let req = Request::post(self.endpoint.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, "custos-notify")
            .header("x-custos-timestamp", ts.to_string())
            .header("x-custos-signature", signature)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| NotifyError::Config(format!("cannot build the webhook request: {e}")))?;
        let target = format!("webhook {}", self.endpoint.shown);
        let secrets = [self.secret.as_str()];
        let (status, body) = self.client.send(req, &target, &secrets).await?;
        if !status.is_success() {
            return Err(NotifyError::Status {
                target,
                code: status.as_u16(),
                body: quote_body(&body, &secrets),
            });
        }
        tracing::debug!(target = %self.endpoint.shown, kind, approval = %n.id, "webhook delivered");
        Ok(())
    }
}

impl Notifier for WebhookNotifier {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn pending<'a>(
        &'a self,
        n: &'a ApprovalNotice,
    ) -> BoxFuture<'a, Result<Option<String>, NotifyError>> {
        Box::pin(async move {
            self.post("approval.pending", n).await?;
            Ok(None)
        })
    }

    fn decided<'a>(
        &'a self,
        n: &'a ApprovalNotice,
        _message_ref: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(self.post("approval.decided", n))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper::Response;
    use hyper_util::rt::TokioIo;
    use parking_lot::Mutex;
    use tokio::net::TcpListener;

    /// One request as a stub server saw it.
    #[derive(Debug, Clone)]
    pub(crate) struct Recorded {
        pub method: String,
        /// Path and query.
        pub path: String,
        pub headers: hyper::HeaderMap,
        pub body: Vec<u8>,
    }

    pub(crate) type Responder = Arc<dyn Fn(&Recorded) -> (u16, String) + Send + Sync>;

    /// A real HTTP/1.1 server on 127.0.0.1:0 that records every request and answers with
    /// `respond`. Stops when the test's runtime ends.
    pub(crate) async fn stub_server(respond: Responder) -> (SocketAddr, Arc<Mutex<Vec<Recorded>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                let respond = respond.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<Incoming>| {
                        let log = log.clone();
                        let respond = respond.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let rec = Recorded {
                                method: parts.method.to_string(),
                                path: parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                headers: parts.headers,
                                body: body.to_vec(),
                            };
                            let (code, text) = respond(&rec);
                            log.lock().push(rec);
                            let resp = Response::builder()
                                .status(code)
                                .header(header::CONTENT_TYPE, "application/json")
                                .body(Full::new(Bytes::from(text)))
                                .expect("response");
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr, seen)
    }

    pub(crate) fn notice() -> ApprovalNotice {
        ApprovalNotice {
            id: "0190a5c4-7d3e-7b8a-9f00-1234567890ab".into(),
            identity: "agent:crewai-writer".into(),
            connection: "prod-pg".into(),
            action: "sql:delete".into(),
            text: "DELETE FROM orders WHERE created_at < '2020-01-01'".into(),
            approver_group: "dba".into(),
            quorum: 2,
            approvals: vec![],
            expires_unix_nano: 1_900_000_000_000_000_000,
            policy_id: "prod-deletes-need-dba".into(),
            reason: "cleanup <ticket #42> & archive".into(),
            state: "pending".into(),
            decided_by: String::new(),
            comment: String::new(),
        }
    }

    const SECRET: &str = "whsec-very-secret-value-123";

    #[tokio::test]
    async fn webhook_posts_signed_json() {
        let (addr, seen) = stub_server(Arc::new(|_| (200, "{}".into()))).await;
        let hook = WebhookNotifier::new(&format!("http://{addr}/hooks/custos"), SECRET.into())
            .expect("notifier");
        assert_eq!(hook.name(), "webhook");
        let mut n = notice();
        assert_eq!(hook.pending(&n).await.expect("pending"), None);
        n.state = "approved".into();
        n.decided_by = "carol".into();
        n.approvals = vec!["carol".into(), "dave".into()];
        hook.decided(&n, None).await.expect("decided");

        let seen = seen.lock().clone();
        assert_eq!(seen.len(), 2);
        for (rec, kind, state) in [
            (&seen[0], "approval.pending", "pending"),
            (&seen[1], "approval.decided", "approved"),
        ] {
            assert_eq!(rec.method, "POST");
            assert_eq!(rec.path, "/hooks/custos");
            assert_eq!(rec.headers[header::CONTENT_TYPE], "application/json");
            let ts: i64 = rec.headers["x-custos-timestamp"]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("unix seconds");
            assert!((now_secs() - ts).abs() < 60);
            let sig = rec.headers["x-custos-signature"].to_str().expect("ascii");
            assert!(sig.starts_with("v1="));
            assert!(verify_webhook(
                SECRET.as_bytes(),
                ts,
                &rec.body,
                sig,
                now_secs()
            ));
            assert!(!verify_webhook(
                b"other secret",
                ts,
                &rec.body,
                sig,
                now_secs()
            ));
            let json: serde_json::Value = serde_json::from_slice(&rec.body).expect("json");
            assert_eq!(json["type"], kind);
            assert_eq!(json["approval"]["state"], state);
            assert_eq!(json["approval"]["id"], n.id);
            assert_eq!(json["approval"]["text"], n.text);
            let env: WebhookEnvelope = serde_json::from_slice(&rec.body).expect("envelope");
            assert_eq!(env.kind, kind);
            // The secret is only ever an HMAC key.
            assert!(!String::from_utf8_lossy(&rec.body).contains(SECRET));
        }
        let env: WebhookEnvelope = serde_json::from_slice(&seen[1].body).expect("envelope");
        assert_eq!(env.approval, n);
    }

    #[tokio::test]
    async fn webhook_error_status_names_the_status_and_hides_the_secret() {
        let (addr, _) = stub_server(Arc::new(|_| {
            (500, format!("boom: database down (echo {SECRET})"))
        }))
        .await;
        let hook = WebhookNotifier::new(&format!("http://{addr}/x?token=abc"), SECRET.into())
            .expect("hook");
        let err = hook.pending(&notice()).await.expect_err("500 is an error");
        assert!(
            matches!(err, NotifyError::Status { code: 500, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("HTTP 500"), "{msg}");
        assert!(msg.contains("database down"), "{msg}");
        assert!(msg.contains("see its logs"), "{msg}");
        assert!(!msg.contains(SECRET), "{msg}");
        // Only scheme, host and port of the URL are shown.
        assert!(!msg.contains("token=abc"), "{msg}");
        assert!(!format!("{hook:?}").contains(SECRET));
    }

    #[tokio::test]
    async fn webhook_unreachable_and_timeout_are_errors() {
        // A port nobody listens on.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let hook = WebhookNotifier::new(&format!("http://{addr}/"), SECRET.into()).expect("hook");
        let err = hook.pending(&notice()).await.expect_err("refused");
        assert!(matches!(err, NotifyError::Http { .. }), "{err:?}");
        assert!(err.to_string().contains("cannot reach"), "{err}");

        // A server that accepts and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let hook = WebhookNotifier::new(&format!("http://{addr}/"), SECRET.into())
            .expect("hook")
            .with_timeout(Duration::from_millis(200))
            .expect("timeout");
        let err = hook.pending(&notice()).await.expect_err("timeout");
        assert!(matches!(err, NotifyError::Timeout { .. }), "{err:?}");
    }

    #[test]
    fn webhook_config_errors() {
        for (url, want) in [
            ("ftp://example.com/", "http:// or https://"),
            ("not a url", "not a valid URL"),
            ("/relative", "must start with"),
        ] {
            let err = WebhookNotifier::new(url, SECRET.into()).expect_err(url);
            assert!(err.to_string().contains(want), "{url}: {err}");
        }
        let err = WebhookNotifier::new("http://127.0.0.1:9/", "  ".into()).expect_err("empty");
        assert!(err.to_string().contains("secret is empty"), "{err}");
    }

    #[test]
    fn webhook_signature_window_and_format() {
        let body = br#"{"type":"approval.pending"}"#;
        let sig = sign_webhook(b"k", 1000, body);
        assert_eq!(sig.len(), 3 + 64);
        // Independent computation of the documented scheme.
        let mut mac = HmacSha256::new_from_slice(b"k").expect("key");
        mac.update(b"v1:1000:");
        mac.update(body);
        assert_eq!(
            sig,
            format!("v1={}", hex::encode(mac.finalize().into_bytes()))
        );

        assert!(verify_webhook(b"k", 1000, body, &sig, 1000));
        assert!(verify_webhook(b"k", 1000, body, &sig, 1300));
        assert!(verify_webhook(b"k", 1000, body, &sig, 700));
        assert!(!verify_webhook(b"k", 1000, body, &sig, 1301));
        assert!(!verify_webhook(b"k", 1000, body, &sig, 699));
        assert!(!verify_webhook(b"k", 1001, body, &sig, 1000));
        assert!(!verify_webhook(b"k", 1000, b"{}", &sig, 1000));
        assert!(!verify_webhook(b"k", 1000, body, &sig[3..], 1000));
        assert!(!verify_webhook(b"k", 1000, body, "v1=zz", 1000));
        assert!(!verify_webhook(b"k", 1000, body, "", 1000));
        assert!(!verify_webhook(b"k", i64::MIN, body, &sig, i64::MAX));
    }

    #[test]
    fn quoted_bodies_are_short_and_redacted() {
        let long = format!("{}{}", "x".repeat(1000), SECRET);
        let q = quote_body(long.as_bytes(), &[SECRET]);
        assert!(q.chars().count() <= MAX_QUOTED_BODY_CHARS + 1);
        let q = quote_body(format!("a\n{SECRET}\r\nb").as_bytes(), &[SECRET]);
        assert_eq!(q, "a [redacted]  b");
        assert_eq!(quote_body(b"", &[]), "(empty body)");
    }
}
