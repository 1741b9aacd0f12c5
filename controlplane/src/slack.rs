//! Slack approvals: post pending requests with Approve/Deny buttons, take the clicks back.
//!
//! ```text
//!   control plane ──pending──▶ SlackNotifier ──chat.postMessage──▶ Slack ──▶ #channel
//!                                                                           │ click
//!   DecisionSink ◀── decide(identity, id, approve) ── serve_interactions ◀──┘ POST /slack/interactions
//!        │                                   (verify v0 signature, drop replays, map user)
//!        └──decided──▶ SlackNotifier ──chat.update──▶ the same message, buttons replaced by the outcome
//! ```
//!
//! Slack signs every interaction with the app's signing secret ([`verify_signature`]); the
//! endpoint refuses unsigned, stale (> 5 min) and replayed requests before it looks at the
//! payload, and a click only counts when the Slack user maps to a custos identity
//! (`[slack.users]`, or the user's e-mail with `identity_from_email`). Whether that identity
//! may approve is the [`DecisionSink`]'s business (the control plane checks the approver group,
//! self-approval and the deadline exactly as for the CLI).
//!
//! The bot token needs the `chat:write` scope (`users:read` and `users:read.email` too for
//! `identity_from_email`). The token and the signing secret are read from a file or an
//! environment variable and never logged or put into an error.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::notify::{
    is_loopback_host, now_secs, parse_endpoint, quote_body, sensitive_header, ApprovalNotice,
    HttpClient, Notifier, NotifyError, DEFAULT_TIMEOUT,
};

/// Slack's Web API.
pub const DEFAULT_API_BASE: &str = "https://slack.com/api";
/// Where [`serve_interactions`] takes Slack's button clicks (the app's "Request URL" is
/// `https://<host>:<port>/slack/interactions`).
pub const INTERACTIONS_PATH: &str = "/slack/interactions";
/// Largest interaction body accepted.
pub const MAX_INTERACTION_BODY: usize = 64 * 1024;
/// How far a request timestamp may be from this server's clock, in seconds.
pub const SIGNATURE_TOLERANCE_SECS: i64 = 300;
/// `action_id` of the Approve button.
pub const ACTION_APPROVE: &str = "custos_approve";
/// `action_id` of the Deny button.
pub const ACTION_DENY: &str = "custos_deny";
/// The comment a click records.
pub const CLICK_COMMENT: &str = "via Slack";

/// Command text longer than this many characters is cut in the message.
const MAX_COMMAND_CHARS: usize = 2500;
const MAX_CONNECTIONS: usize = 256;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Configuration

/// `[slack]` in the control-plane config.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SlackConfig {
    /// Slack's Web API; default `https://slack.com/api` when empty. Plain http only for
    /// loopback test servers.
    pub api_base: String,
    /// File holding the bot token (`xoxb-…`). Set this or `bot_token_env`.
    pub bot_token_file: Option<PathBuf>,
    /// Environment variable holding the bot token.
    pub bot_token_env: Option<String>,
    /// Id of the channel to post into (e.g. `C0123456789`); invite the bot there.
    pub channel: String,
    /// File holding the app's signing secret (needed when `listen` is set).
    pub signing_secret_file: Option<PathBuf>,
    /// Environment variable holding the signing secret.
    pub signing_secret_env: Option<String>,
    /// Address of the interactions endpoint, e.g. `0.0.0.0:7443`; empty = do not serve.
    pub listen: String,
    /// PEM certificate chain; with `tls_key` the endpoint speaks HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key.
    pub tls_key: Option<PathBuf>,
    /// Slack user id → custos identity of the people who may click.
    pub users: BTreeMap<String, String>,
    /// For users not in `users`: look them up with `users.info` and use their e-mail address
    /// (lower-cased) as the identity.
    pub identity_from_email: bool,
}

fn read_secret(
    what: &str,
    file_field: &str,
    env_field: &str,
    file: &Option<PathBuf>,
    env: &Option<String>,
) -> Result<String, NotifyError> {
    let value = match (file, env) {
        (Some(_), Some(_)) => {
            return Err(NotifyError::Config(format!(
                "[slack] sets both {file_field} and {env_field}; keep one"
            )))
        }
        (None, None) => {
            return Err(NotifyError::Config(format!(
                "[slack] needs the {what}: set {file_field} (a file holding it) or {env_field} \
                 (the name of an environment variable holding it)"
            )))
        }
        (Some(path), None) => std::fs::read_to_string(path).map_err(|e| {
            NotifyError::Config(format!(
                "cannot read the {what} from {} ([slack] {file_field}): {e}",
                path.display()
            ))
        })?,
        (None, Some(var)) => std::env::var(var).map_err(|e| {
            NotifyError::Config(match e {
                std::env::VarError::NotPresent => format!(
                    "the environment variable {var} ([slack] {env_field}) that should hold the \
                     {what} is not set"
                ),
                std::env::VarError::NotUnicode(_) => format!(
                    "the environment variable {var} ([slack] {env_field}) is not valid UTF-8"
                ),
            })
        })?,
    };
    let value = value.trim().to_string();
    if value.is_empty() {
        let source = match (file, env) {
            (Some(p), _) => format!("the file {}", p.display()),
            (_, Some(v)) => format!("the environment variable {v}"),
            _ => "its source".into(),
        };
        return Err(NotifyError::Config(format!(
            "the {what} in {source} is empty"
        )));
    }
    Ok(value)
}

fn exactly_one(
    file_field: &str,
    env_field: &str,
    file: &Option<PathBuf>,
    env: &Option<String>,
    why: &str,
) -> Result<(), String> {
    match (file, env) {
        (Some(_), Some(_)) => Err(format!(
            "[slack] sets both {file_field} and {env_field}; keep one"
        )),
        (None, None) => Err(format!("[slack] needs {file_field} or {env_field} {why}")),
        (_, Some(v)) if v.trim().is_empty() => Err(format!("[slack] {env_field} is empty")),
        _ => Ok(()),
    }
}

/// Slack user, channel and team ids are upper-case letters and digits (`U0123ABCD`).
fn looks_like_slack_id(s: &str) -> bool {
    (2..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

impl SlackConfig {
    /// The Web API base without a trailing slash.
    pub fn api_base(&self) -> &str {
        let b = self.api_base.trim().trim_end_matches('/');
        if b.is_empty() {
            DEFAULT_API_BASE
        } else {
            b
        }
    }

    /// The bot token, from `bot_token_file` or `bot_token_env` (trimmed).
    pub fn bot_token(&self) -> Result<String, NotifyError> {
        read_secret(
            "bot token",
            "bot_token_file",
            "bot_token_env",
            &self.bot_token_file,
            &self.bot_token_env,
        )
    }

    /// The signing secret, from `signing_secret_file` or `signing_secret_env` (trimmed).
    pub fn signing_secret(&self) -> Result<String, NotifyError> {
        read_secret(
            "signing secret",
            "signing_secret_file",
            "signing_secret_env",
            &self.signing_secret_file,
            &self.signing_secret_env,
        )
    }

    /// Check the settings without reading secrets; the error names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        let channel = self.channel.trim();
        if channel.is_empty() {
            return Err(
                "[slack] channel is empty: set it to the id of the channel to post into \
                        (e.g. C0123456789; channel details → About) and invite the bot there"
                    .into(),
            );
        }
        if channel.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(format!(
                "[slack] channel {channel:?} is not a channel id (e.g. C0123456789)"
            ));
        }
        let api = parse_endpoint("[slack] api_base", self.api_base()).map_err(|e| e.to_string())?;
        if !api.https && !api.uri.host().is_some_and(is_loopback_host) {
            return Err(format!(
                "[slack] api_base {} must use https: the bot token is sent with every call \
                 (plain http is allowed only for loopback test servers)",
                api.shown
            ));
        }
        exactly_one(
            "bot_token_file",
            "bot_token_env",
            &self.bot_token_file,
            &self.bot_token_env,
            "(the bot token, xoxb-…)",
        )?;
        if !self.listen.trim().is_empty() {
            self.listen.trim().parse::<SocketAddr>().map_err(|_| {
                format!(
                    "[slack] listen {:?} is not an address like 0.0.0.0:7443",
                    self.listen
                )
            })?;
            exactly_one(
                "signing_secret_file",
                "signing_secret_env",
                &self.signing_secret_file,
                &self.signing_secret_env,
                "(the app's signing secret) when listen is set",
            )?;
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return Err("[slack] tls_cert is set without tls_key".into()),
            (None, Some(_)) => return Err("[slack] tls_key is set without tls_cert".into()),
            _ => {}
        }
        for (user, identity) in &self.users {
            if !looks_like_slack_id(user) {
                return Err(format!(
                    "[slack.users] key {user:?} is not a Slack user id (like U0123ABCD; in Slack: \
                     the user's profile → ⋮ → Copy member ID)"
                ));
            }
            if identity.trim().is_empty() {
                return Err(format!("[slack.users] {user} maps to an empty identity"));
            }
        }
        Ok(())
    }

    /// The HTTPS configuration of the interactions endpoint, when `tls_cert` and `tls_key` are
    /// set (rustls with the ring provider, HTTP/1.1).
    pub fn server_tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, NotifyError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        server_tls(cert, key).map(Some)
    }
}

/// A rustls server configuration from PEM files (ring provider, ALPN `http/1.1`).
pub fn server_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, NotifyError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            NotifyError::Config(format!(
                "cannot read the certificate {} ([slack] tls_cert): {e}",
                cert.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(NotifyError::Config(format!(
            "no PEM certificate in {} ([slack] tls_cert)",
            cert.display()
        )));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        NotifyError::Config(format!(
            "cannot read the private key {} ([slack] tls_key): {e}",
            key.display()
        ))
    })?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key_der))
    .map_err(|e| {
        NotifyError::Config(format!(
            "[slack] tls_cert and tls_key do not make a usable TLS identity: {e}"
        ))
    })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

// ---------------------------------------------------------------------------------------------
// Web API client

/// Calls Slack's Web API with the bot token.
#[derive(Clone)]
struct SlackApi {
    base: String,
    shown: String,
    token: String,
    client: HttpClient,
}

impl SlackApi {
    fn new(
        cfg: &SlackConfig,
        roots: Option<rustls::RootCertStore>,
        timeout: Duration,
    ) -> Result<Self, NotifyError> {
        let base = cfg.api_base().to_string();
        let endpoint = parse_endpoint("[slack] api_base", &base)?;
        if !endpoint.https && !endpoint.uri.host().is_some_and(is_loopback_host) {
            return Err(NotifyError::Config(format!(
                "[slack] api_base {} must use https: the bot token is sent with every call",
                endpoint.shown
            )));
        }
        let token = cfg.bot_token()?;
        let client = HttpClient::new(endpoint.https, roots, timeout)?;
        Ok(Self {
            base,
            shown: endpoint.shown,
            token,
            client,
        })
    }

    fn target(&self, method: &str) -> String {
        format!("Slack {method} ({})", self.shown)
    }

    fn uri(&self, method: &str, query: &str) -> Result<Uri, NotifyError> {
        let q = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!("{}/{method}{q}", self.base).parse().map_err(|_| {
            NotifyError::Config(format!(
                "[slack] api_base {} does not make a valid URL for {method}",
                self.shown
            ))
        })
    }

    fn request(
        &self,
        method: Method,
        uri: Uri,
        body: Option<Vec<u8>>,
    ) -> Result<Request<Full<Bytes>>, NotifyError> {
        let auth = sensitive_header(&format!("Bearer {}", self.token), "bot token")?;
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, auth)
            .header(header::USER_AGENT, "custos-notify");
        if body.is_some() {
            b = b.header(header::CONTENT_TYPE, "application/json; charset=utf-8");
        }
        b.body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| NotifyError::Config(format!("cannot build the Slack request: {e}")))
    }

    /// POST a JSON body to a Web API method; answer the parsed `{"ok": true, …}` object.
    async fn post(&self, method: &'static str, body: &Value) -> Result<Value, NotifyError> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| NotifyError::Config(format!("cannot encode the {method} call: {e}")))?;
        let req = self.request(Method::POST, self.uri(method, "")?, Some(bytes))?;
        self.exchange(method, req).await
    }

    async fn get(&self, method: &'static str, query: &str) -> Result<Value, NotifyError> {
        let req = self.request(Method::GET, self.uri(method, query)?, None)?;
        self.exchange(method, req).await
    }

    async fn exchange(
        &self,
        method: &'static str,
        req: Request<Full<Bytes>>,
    ) -> Result<Value, NotifyError> {
        let target = self.target(method);
        let secrets = [self.token.as_str()];
        let (status, body) = self.client.send(req, &target, &secrets).await?;
        if !status.is_success() {
            return Err(NotifyError::Status {
                target,
                code: status.as_u16(),
                body: quote_body(&body, &secrets),
            });
        }
        let v: Value = serde_json::from_slice(&body).map_err(|e| NotifyError::BadResponse {
            target: target.clone(),
            reason: format!("not JSON ({e}): {}", quote_body(&body, &secrets)),
        })?;
        if v.get("ok").and_then(Value::as_bool) == Some(true) {
            return Ok(v);
        }
        let error = v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("unknown_error");
        let error = crate::notify::redact(error, &secrets);
        let needed = v.get("needed").and_then(Value::as_str).unwrap_or("");
        Err(NotifyError::Api {
            method: method.to_string(),
            hint: api_hint(method, &error, needed),
            error,
        })
    }

    /// The custos identity of a Slack user from their e-mail address (`users.info`).
    async fn user_email(&self, user_id: &str) -> Result<String, String> {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("user", user_id)
            .finish();
        let v = self
            .get("users.info", &query)
            .await
            .map_err(|e| e.to_string())?;
        let user = v.get("user").cloned().unwrap_or(Value::Null);
        if user.get("deleted").and_then(Value::as_bool) == Some(true) {
            return Err(format!("Slack user {user_id} is deactivated"));
        }
        if user.get("is_bot").and_then(Value::as_bool) == Some(true) {
            return Err(format!("Slack user {user_id} is a bot"));
        }
        let email = user
            .pointer("/profile/email")
            .and_then(Value::as_str)
            .map(|e| e.trim().to_ascii_lowercase())
            .unwrap_or_default();
        if email.is_empty() || !email.contains('@') {
            return Err(format!(
                "Slack did not return an e-mail address for {user_id} (the app needs the \
                 users:read.email scope)"
            ));
        }
        Ok(email)
    }
}

fn api_hint(method: &str, error: &str, needed: &str) -> String {
    match error {
        "channel_not_found" => "check [slack] channel (it must be the channel id, e.g. \
                                C0123456789) and that the bot can see the channel"
            .into(),
        "not_in_channel" => "invite the bot to the channel (/invite @<bot name>)".into(),
        "is_archived" => "the channel is archived; set [slack] channel to a live one".into(),
        "invalid_auth" | "not_authed" | "token_revoked" | "token_expired" | "account_inactive" => {
            "check the bot token ([slack] bot_token_file or bot_token_env): it must be the app's \
             current xoxb- token"
                .into()
        }
        "missing_scope" if !needed.is_empty() => {
            format!("add the {needed} scope to the Slack app and reinstall it")
        }
        "missing_scope" => "add the missing scope to the Slack app and reinstall it".into(),
        "message_not_found" | "cant_update_message" | "edit_window_closed" => {
            "the message was deleted or not posted by this bot; the decision stands".into()
        }
        "ratelimited" | "rate_limited" => "Slack is rate limiting; retry later".into(),
        "user_not_found" | "users_not_found" => "check the user id in [slack.users]".into(),
        _ => format!("see https://api.slack.com/methods/{method}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Notifier

/// Posts approval requests to a Slack channel and updates the message when they are decided.
pub struct SlackNotifier {
    api: SlackApi,
    channel: String,
}

impl std::fmt::Debug for SlackNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlackNotifier")
            .field("api", &self.api.shown)
            .field("channel", &self.channel)
            .field("token", &"[redacted]")
            .finish()
    }
}

impl SlackNotifier {
    /// Validate `cfg` and read the bot token (errors never contain it).
    pub fn new(cfg: &SlackConfig) -> Result<Self, NotifyError> {
        Self::with_tls(cfg, None, DEFAULT_TIMEOUT)
    }

    /// As [`SlackNotifier::new`], trusting exactly `roots` (instead of the system's CA
    /// certificates) and allowing `timeout` per call.
    pub fn with_tls(
        cfg: &SlackConfig,
        roots: Option<rustls::RootCertStore>,
        timeout: Duration,
    ) -> Result<Self, NotifyError> {
        cfg.validate().map_err(NotifyError::Config)?;
        Ok(Self {
            api: SlackApi::new(cfg, roots, timeout)?,
            channel: cfg.channel.trim().to_string(),
        })
    }

    async fn post_message(&self, blocks: Value, text: String) -> Result<String, NotifyError> {
        let v = self
            .api
            .post(
                "chat.postMessage",
                &json!({
                    "channel": self.channel,
                    "text": text,
                    "blocks": blocks,
                    "unfurl_links": false,
                    "unfurl_media": false,
                }),
            )
            .await?;
        let channel = v
            .get("channel")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())
            .unwrap_or(&self.channel);
        let Some(ts) = v
            .get("ts")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        else {
            return Err(NotifyError::BadResponse {
                target: self.api.target("chat.postMessage"),
                reason: "no `ts` in the answer".into(),
            });
        };
        Ok(format!("{channel}/{ts}"))
    }
}

impl Notifier for SlackNotifier {
    fn name(&self) -> &'static str {
        "slack"
    }

    fn pending<'a>(
        &'a self,
        n: &'a ApprovalNotice,
    ) -> BoxFuture<'a, Result<Option<String>, NotifyError>> {
        Box::pin(async move {
            let r = self
                .post_message(pending_blocks(n), fallback_text(n))
                .await?;
            tracing::debug!(approval = %n.id, message = %r, "approval posted to Slack");
            Ok(Some(r))
        })
    }

    /// Replaces the message's blocks with the outcome (no buttons). A notice still `pending`
    /// (an approval short of the quorum) re-renders the request with the approvals so far and
    /// keeps the buttons. Without a `message_ref` a new message is posted.
    fn decided<'a>(
        &'a self,
        n: &'a ApprovalNotice,
        message_ref: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            let blocks = if n.state == "pending" {
                pending_blocks(n)
            } else {
                decided_blocks(n)
            };
            let text = fallback_text(n);
            let Some(r) = message_ref else {
                self.post_message(blocks, text).await?;
                return Ok(());
            };
            let Some((channel, ts)) = r
                .split_once('/')
                .filter(|(c, t)| !c.is_empty() && !t.is_empty())
            else {
                return Err(NotifyError::Config(format!(
                    "Slack message reference {r:?} is not \"<channel>/<ts>\" (as returned by \
                     pending); the message cannot be updated"
                )));
            };
            self.api
                .post(
                    "chat.update",
                    &json!({ "channel": channel, "ts": ts, "text": text, "blocks": blocks }),
                )
                .await?;
            tracing::debug!(approval = %n.id, message = %r, state = %n.state, "Slack message updated");
            Ok(())
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Block Kit

/// Escape Slack's control characters (`&`, `<`, `>`: so no text can mention `@channel`, link
/// or otherwise format itself) in `s`, and cut the result to at most `max` characters without splitting an entity;
/// also answers how many characters of `s` were left out.
fn escape_cut(s: &str, max: usize) -> (String, usize) {
    let mut out = String::new();
    let mut used = 0usize;
    for (i, c) in s.chars().enumerate() {
        let piece = match c {
            '&' => "&amp;",
            '<' => "&lt;",
            '>' => "&gt;",
            _ => "",
        };
        let len = if piece.is_empty() { 1 } else { piece.len() };
        if used + len > max {
            return (out, s.chars().count() - i);
        }
        used += len;
        if piece.is_empty() {
            out.push(c);
        } else {
            out.push_str(piece);
        }
    }
    (out, 0)
}

/// Escaped, cut to `max` characters with an ellipsis.
fn short(s: &str, max: usize) -> String {
    let (mut out, left) = escape_cut(s, max);
    if left > 0 {
        out.push('…');
    }
    out
}

/// Inline code (a name from the configuration): backticks cannot end it early.
fn code(s: &str) -> String {
    if s.is_empty() {
        return "_(none)_".into();
    }
    format!("`{}`", short(&s.replace('`', "'"), 200))
}

/// The command in a code block; "```" inside cannot end it early.
fn command_block(text: &str) -> (String, usize) {
    let text = text.replace("```", "`\u{200b}`\u{200b}`");
    let (body, left) = escape_cut(&text, MAX_COMMAND_CHARS);
    let body = if body.trim().is_empty() {
        "(empty)".to_string()
    } else {
        body
    };
    (format!("```{body}```"), left)
}

fn deadline(expires_unix_nano: i64) -> String {
    if expires_unix_nano <= 0 {
        return "none".into();
    }
    let secs = expires_unix_nano.div_euclid(1_000_000_000);
    let fallback = chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| secs.to_string());
    format!("<!date^{secs}^{{date_short_pretty}} at {{time_secs}}|{fallback}>")
}

fn summary(n: &ApprovalNotice, with_deadline: bool) -> String {
    let mut s = format!(
        "*Approval requested:* {} on {}\n*Requested by:* {}\n*Policy:* {}\n*Approvers:* {} — {} of {} approval{}",
        code(&n.action),
        code(&n.connection),
        short(&n.identity, 200),
        code(&n.policy_id),
        code(&n.approver_group),
        n.approvals.len(),
        n.quorum,
        if n.quorum == 1 { "" } else { "s" },
    );
    if !n.approvals.is_empty() {
        s.push_str(&format!(" ({})", short(&n.approvals.join(", "), 300)));
    }
    if with_deadline {
        s.push_str(&format!("\n*Deadline:* {}", deadline(n.expires_unix_nano)));
    }
    if !n.reason.trim().is_empty() {
        s.push_str(&format!("\n*Reason:* {}", short(n.reason.trim(), 500)));
    }
    s
}

fn section(text: String) -> Value {
    json!({ "type": "section", "text": { "type": "mrkdwn", "text": text } })
}

fn request_blocks(n: &ApprovalNotice, with_deadline: bool) -> Vec<Value> {
    let (cmd, left) = command_block(&n.text);
    let mut blocks = vec![section(summary(n, with_deadline)), section(cmd)];
    let mut ctx = format!("Approval {}", code(&n.id));
    if left > 0 {
        ctx.push_str(&format!(
            " · command cut: {left} more characters (see the full text with the approval id)"
        ));
    }
    blocks.push(json!({
        "type": "context",
        "elements": [ { "type": "mrkdwn", "text": ctx } ]
    }));
    blocks
}

/// The message for a pending request: who/what/where/policy/deadline, the command, and the
/// Approve (with a confirmation) and Deny buttons carrying the approval id.
pub fn pending_blocks(n: &ApprovalNotice) -> Value {
    let mut blocks = request_blocks(n, true);
    let confirm = short(
        &format!(
            "Let {} run {} on {}?",
            n.identity,
            n.action,
            if n.connection.is_empty() {
                "(no connection)"
            } else {
                &n.connection
            }
        ),
        290,
    );
    blocks.push(json!({
        "type": "actions",
        "block_id": "custos_approval",
        "elements": [
            {
                "type": "button",
                "action_id": ACTION_APPROVE,
                "text": { "type": "plain_text", "text": "Approve", "emoji": true },
                "style": "primary",
                "value": n.id,
                "confirm": {
                    "title": { "type": "plain_text", "text": "Approve this command?" },
                    "text": { "type": "mrkdwn", "text": confirm },
                    "confirm": { "type": "plain_text", "text": "Approve" },
                    "deny": { "type": "plain_text", "text": "Cancel" }
                }
            },
            {
                "type": "button",
                "action_id": ACTION_DENY,
                "text": { "type": "plain_text", "text": "Deny", "emoji": true },
                "style": "danger",
                "value": n.id
            }
        ]
    }));
    Value::Array(blocks)
}

/// One line for the outcome, e.g. `✅ *Approved* by carol: looks fine`.
fn outcome(n: &ApprovalNotice) -> String {
    let by = if n.decided_by.trim().is_empty() {
        String::new()
    } else {
        format!(" by {}", short(n.decided_by.trim(), 200))
    };
    let comment = if n.comment.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", short(n.comment.trim(), 500))
    };
    match n.state.as_str() {
        "approved" => {
            let mut s = format!("✅ *Approved*{by}{comment}");
            if n.approvals.len() > 1 {
                s.push_str(&format!(
                    " (approvals: {})",
                    short(&n.approvals.join(", "), 300)
                ));
            }
            s
        }
        "denied" => format!("❌ *Denied*{by}{comment}"),
        "expired" => format!("⌛ *Expired*: no decision before the deadline{comment}"),
        "cancelled" => format!("🚫 *Cancelled*{by}{comment}"),
        "pending" => format!(
            "⏳ *Pending*: {} of {} approvals",
            n.approvals.len(),
            n.quorum
        ),
        other => format!("ℹ️ *{}*{by}{comment}", short(other, 50)),
    }
}

/// The message after the decision: the outcome, then the request without buttons.
pub fn decided_blocks(n: &ApprovalNotice) -> Value {
    let mut blocks = vec![section(outcome(n))];
    blocks.extend(request_blocks(n, false));
    Value::Array(blocks)
}

/// The notification text (shown where blocks are not, e.g. in push notifications).
fn fallback_text(n: &ApprovalNotice) -> String {
    let what = format!(
        "{} on {} for {}",
        short(&n.action, 100),
        short(&n.connection, 100),
        short(&n.identity, 200)
    );
    if n.state == "pending" {
        return format!("Approval requested: {what}");
    }
    let plain = outcome(n).replace('*', "");
    format!("{plain} — {what}")
}

// ---------------------------------------------------------------------------------------------
// Request signing

/// Why an interaction request was refused before its payload was looked at.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SlackAuthError {
    #[error("missing header {0}; only Slack may call this endpoint")]
    MissingHeader(&'static str),
    #[error(
        "the request timestamp is {age_secs} s away from this server's clock (limit 300 s); \
         check the clock (NTP) of this host"
    )]
    Stale { age_secs: i64 },
    #[error("the signature does not match; check [slack] signing secret (the app's Basic Information → Signing Secret)")]
    BadSignature,
    #[error("this signed request was already received (replay)")]
    Replayed,
    #[error("the X-Slack-Request-Timestamp header is not a Unix time")]
    BadTimestamp,
}

type HmacSha256 = Hmac<Sha256>;

fn slack_mac(signing_secret: &[u8], timestamp: &str, body: &[u8]) -> HmacSha256 {
    let Ok(mut mac) = HmacSha256::new_from_slice(signing_secret) else {
        unreachable!("HMAC-SHA256 takes keys of any length");
    };
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    mac
}

/// The `X-Slack-Signature` Slack sends for `body` at `timestamp` (for tests and tools).
pub fn sign_request(signing_secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    format!(
        "v0={}",
        hex::encode(
            slack_mac(signing_secret, timestamp, body)
                .finalize()
                .into_bytes()
        )
    )
}

/// Slack v0 request signing: basestring `"v0:{timestamp}:{body}"`, HMAC-SHA256 with the
/// signing secret, header `X-Slack-Signature: v0=<hex>`, `X-Slack-Request-Timestamp`.
/// Rejects `|now - ts| > 300 s`. The comparison is constant time. Empty `timestamp` or
/// `signature` means the header was missing.
pub fn verify_signature(
    signing_secret: &[u8],
    timestamp: &str,
    signature: &str,
    body: &[u8],
    now_secs: i64,
) -> Result<(), SlackAuthError> {
    let timestamp = timestamp.trim();
    let signature = signature.trim();
    if timestamp.is_empty() {
        return Err(SlackAuthError::MissingHeader("X-Slack-Request-Timestamp"));
    }
    if signature.is_empty() {
        return Err(SlackAuthError::MissingHeader("X-Slack-Signature"));
    }
    let ts: i64 = timestamp
        .parse()
        .map_err(|_| SlackAuthError::BadTimestamp)?;
    let age = now_secs.saturating_sub(ts);
    if age.unsigned_abs() > SIGNATURE_TOLERANCE_SECS as u64 {
        return Err(SlackAuthError::Stale { age_secs: age });
    }
    let Some(hex_sig) = signature.strip_prefix("v0=") else {
        return Err(SlackAuthError::BadSignature);
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return Err(SlackAuthError::BadSignature);
    };
    slack_mac(signing_secret, timestamp, body)
        .verify_slice(&sig)
        .map_err(|_| SlackAuthError::BadSignature)
}

// ---------------------------------------------------------------------------------------------
// Interactions

/// A verified button click.
#[derive(Debug, Clone, PartialEq)]
pub struct Interaction {
    pub user_id: String,
    pub user_name: String,
    pub approval_id: String,
    pub approve: bool,
    pub channel: String,
    pub message_ts: String,
}

#[derive(Deserialize)]
struct RawPayload {
    #[serde(rename = "type", default)]
    kind: String,
    user: Option<RawUser>,
    #[serde(default)]
    actions: Vec<RawAction>,
    channel: Option<RawId>,
    message: Option<RawMessage>,
    container: Option<RawContainer>,
}

#[derive(Deserialize)]
struct RawUser {
    #[serde(default)]
    id: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
struct RawAction {
    #[serde(default)]
    action_id: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
struct RawId {
    #[serde(default)]
    id: String,
}

#[derive(Deserialize)]
struct RawMessage {
    #[serde(default)]
    ts: String,
}

#[derive(Deserialize)]
struct RawContainer {
    #[serde(default)]
    message_ts: String,
    #[serde(default)]
    channel_id: String,
}

/// Slack posts `application/x-www-form-urlencoded` with one field `payload` = JSON of type
/// `block_actions`; this finds the custos button in it.
pub fn parse_interaction(body: &[u8]) -> Result<Interaction, String> {
    let payload = form_urlencoded::parse(body)
        .find(|(k, _)| k == "payload")
        .map(|(_, v)| v.into_owned())
        .ok_or("the form body has no `payload` field")?;
    let raw: RawPayload = serde_json::from_str(&payload)
        .map_err(|e| format!("the payload is not the JSON Slack sends: {e}"))?;
    if raw.kind != "block_actions" {
        return Err(format!(
            "unsupported interaction type {:?} (only block_actions)",
            short(&raw.kind, 40)
        ));
    }
    let user = raw.user.ok_or("the payload has no user")?;
    if !looks_like_slack_id(&user.id) {
        return Err("the payload's user id is missing or malformed".into());
    }
    let action = raw
        .actions
        .iter()
        .find(|a| a.action_id == ACTION_APPROVE || a.action_id == ACTION_DENY)
        .ok_or("the payload has no custos_approve or custos_deny action")?;
    let id = action.value.trim();
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        return Err("the action's value is not an approval id".into());
    }
    let container = raw.container;
    let channel = raw
        .channel
        .map(|c| c.id)
        .filter(|c| !c.is_empty())
        .or_else(|| container.as_ref().map(|c| c.channel_id.clone()))
        .unwrap_or_default();
    let message_ts = raw
        .message
        .map(|m| m.ts)
        .filter(|t| !t.is_empty())
        .or_else(|| container.as_ref().map(|c| c.message_ts.clone()))
        .unwrap_or_default();
    let user_name = if user.username.is_empty() {
        user.name
    } else {
        user.username
    };
    Ok(Interaction {
        user_id: user.id,
        user_name,
        approval_id: id.to_string(),
        approve: action.action_id == ACTION_APPROVE,
        channel,
        message_ts,
    })
}

/// What the control plane does with a verified click. Returns the text to show (e.g.
/// "approved; 1 of 2"), or an error text.
pub trait DecisionSink: Send + Sync + 'static {
    fn decide<'a>(
        &'a self,
        identity: &'a str,
        approval_id: &'a str,
        approve: bool,
        comment: &'a str,
    ) -> BoxFuture<'a, Result<String, String>>;
}

struct Interactions {
    cfg: Arc<SlackConfig>,
    sink: Arc<dyn DecisionSink>,
    /// The signing secret, or why it could not be read.
    secret: Result<Vec<u8>, String>,
    /// For `identity_from_email`: the Web API client, or why it could not be made.
    api: Option<Result<SlackApi, String>>,
    /// Signatures accepted within the window → their timestamp.
    seen: Mutex<HashMap<String, i64>>,
}

impl Interactions {
    fn new(cfg: Arc<SlackConfig>, sink: Arc<dyn DecisionSink>) -> Self {
        let secret = cfg
            .signing_secret()
            .map(String::into_bytes)
            .map_err(|e| e.to_string());
        if let Err(e) = &secret {
            tracing::error!(error = %e, "Slack interactions cannot be verified; every click is refused");
        }
        let api = cfg.identity_from_email.then(|| {
            SlackApi::new(&cfg, None, Duration::from_secs(2)).map_err(|e| {
                tracing::error!(error = %e, "Slack users.info unavailable; identity_from_email cannot map users");
                e.to_string()
            })
        });
        Self {
            cfg,
            sink,
            secret,
            api,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Remember a verified signature; false when it was seen within the window.
    fn first_time(&self, signature: &str, ts: i64, now: i64) -> bool {
        let mut seen = self.seen.lock();
        if seen.len() >= 256 {
            seen.retain(|_, t| now.saturating_sub(*t) <= SIGNATURE_TOLERANCE_SECS);
        }
        seen.insert(signature.to_ascii_lowercase(), ts).is_none()
    }

    async fn identity(&self, i: &Interaction) -> Result<String, String> {
        if let Some(id) = self.cfg.users.get(&i.user_id) {
            return Ok(id.trim().to_string());
        }
        let unmapped = format!(
            "Slack user {} ({}) is not mapped to a custos identity; add it to [slack.users] in \
             the control-plane config, e.g. {} = \"{}@example.com\"",
            i.user_id,
            short(&i.user_name, 80),
            i.user_id,
            if i.user_name.is_empty() {
                "name"
            } else {
                &i.user_name
            }
        );
        match &self.api {
            None => Err(unmapped),
            Some(Err(why)) => Err(format!("{unmapped} (identity_from_email: {why})")),
            Some(Ok(api)) => api
                .user_email(&i.user_id)
                .await
                .map_err(|why| format!("{unmapped} (identity_from_email: {why})")),
        }
    }
}

fn text_response(status: StatusCode, text: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn ephemeral(text: &str) -> Response<Full<Bytes>> {
    let body = json!({ "response_type": "ephemeral", "text": text }).to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Read and drop what is left of a refused body (bounded), so closing the connection does not
/// reset it before the client has read the answer.
async fn drain(body: Incoming) {
    let _ = tokio::time::timeout(
        DRAIN_TIMEOUT,
        Limited::new(body, 16 * MAX_INTERACTION_BODY).collect(),
    )
    .await;
}

fn header_str<'a>(req: &'a Request<Incoming>, name: &str) -> &'a str {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

async fn handle(
    state: &Interactions,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    if req.uri().path() != INTERACTIONS_PATH {
        return text_response(StatusCode::NOT_FOUND, "not found");
    }
    if req.method() != Method::POST {
        let mut r = text_response(StatusCode::METHOD_NOT_ALLOWED, "use POST");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    let too_large = || {
        text_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body is larger than {} KiB",
                MAX_INTERACTION_BODY / 1024
            ),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let timestamp = header_str(&req, "x-slack-request-timestamp").to_string();
    let signature = header_str(&req, "x-slack-signature").to_string();
    if declared.is_some_and(|n| n > MAX_INTERACTION_BODY as u64) {
        drain(req.into_body()).await;
        tracing::warn!(%peer, "Slack interaction refused: body too large");
        return too_large();
    }
    let body = match tokio::time::timeout(
        BODY_READ_TIMEOUT,
        Limited::new(req.into_body(), MAX_INTERACTION_BODY).collect(),
    )
    .await
    {
        Err(_) => return text_response(StatusCode::REQUEST_TIMEOUT, "the body took too long"),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            tracing::warn!(%peer, "Slack interaction refused: body too large");
            return too_large();
        }
        Ok(Err(_)) => return text_response(StatusCode::BAD_REQUEST, "cannot read the body"),
        Ok(Ok(b)) => b.to_bytes(),
    };

    let secret = match &state.secret {
        Ok(s) => s,
        Err(why) => {
            return text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("custos cannot verify Slack requests: {why}"),
            )
        }
    };
    let now = now_secs();
    if let Err(e) = verify_signature(secret, &timestamp, &signature, &body, now) {
        tracing::warn!(%peer, reason = %e, "Slack interaction refused");
        return text_response(StatusCode::UNAUTHORIZED, e.to_string());
    }
    // verify_signature accepted it, so the timestamp parses.
    let ts = timestamp.trim().parse::<i64>().unwrap_or(now);
    if !state.first_time(signature.trim(), ts, now) {
        tracing::warn!(%peer, "Slack interaction refused: replayed request");
        return text_response(
            StatusCode::UNAUTHORIZED,
            SlackAuthError::Replayed.to_string(),
        );
    }

    let click = match parse_interaction(&body) {
        Ok(c) => c,
        Err(why) => {
            tracing::warn!(%peer, reason = %why, "Slack interaction malformed");
            return text_response(StatusCode::BAD_REQUEST, why);
        }
    };
    let identity = match state.identity(&click).await {
        Ok(id) => id,
        Err(why) => {
            tracing::warn!(slack_user = %click.user_id, approval = %click.approval_id, "Slack user not mapped");
            return text_response(StatusCode::FORBIDDEN, why);
        }
    };

    // The decision runs in its own task: if Slack hangs up, a vote that is under way completes.
    let sink = state.sink.clone();
    let (who, id, approve) = (identity.clone(), click.approval_id.clone(), click.approve);
    let decided =
        tokio::spawn(async move { sink.decide(&who, &id, approve, CLICK_COMMENT).await }).await;
    let verb = if click.approve { "approve" } else { "deny" };
    match decided {
        Ok(Ok(text)) => {
            tracing::info!(slack_user = %click.user_id, %identity, approval = %click.approval_id, approve = click.approve, "Slack decision");
            ephemeral(&text)
        }
        Ok(Err(why)) => {
            tracing::warn!(slack_user = %click.user_id, %identity, approval = %click.approval_id, reason = %why, "Slack decision refused");
            ephemeral(&format!("⚠️ Could not {verb} {}: {why}", click.approval_id))
        }
        Err(_) => text_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the decision failed inside custos; see the control-plane log",
        ),
    }
}

/// Resolves when `shutdown` turns true or its sender is dropped.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

async fn serve_connection<I>(
    io: I,
    state: Arc<Interactions>,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(&state, req, peer).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_INTERACTION_BODY.max(16 * 1024) * 2);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "Slack interactions connection ended");
            }
        }
        _ = stopped(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Serve `POST /slack/interactions` (HTTP/1.1; HTTPS when `tls` is Some). For each request:
/// body capped at 64 KiB (413 beyond); verify the signature (401 with a plain-text reason on
/// failure, and the sink is not called); reject a replay of an already-seen signature within
/// the 5-minute window (401); parse (400 on malformed); map the Slack user to an identity via
/// `cfg.users` (or `identity_from_email`; 403 when unmapped); call
/// `sink.decide(identity, id, approve, "via Slack")`; answer 200 with
/// `{"response_type":"ephemeral","text":…}` (the sink's text, or its error prefixed with ⚠️).
/// Unknown paths 404. Runs until `shutdown` turns true (or its sender is dropped), then lets
/// open requests finish for up to 5 s.
pub async fn serve_interactions(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    cfg: Arc<SlackConfig>,
    sink: Arc<dyn DecisionSink>,
    mut shutdown: watch::Receiver<bool>,
) {
    let state = Arc::new(Interactions::new(cfg, sink));
    let acceptor = tls.map(TlsAcceptor::from);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, https = acceptor.is_some(), "Slack interactions endpoint listening");
    }
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = async {
                let permit = limit.clone().acquire_owned().await;
                (permit, listener.accept().await)
            } => a,
        };
        let (permit, (stream, peer)) = match accepted {
            (Ok(p), Ok(conn)) => (p, conn),
            (_, Err(e)) => {
                tracing::warn!(error = %e, "Slack interactions: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            (Err(_), _) => break,
        };
        let state = state.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            match acceptor {
                None => serve_connection(TokioIo::new(stream), state, peer, shutdown).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => {
                            serve_connection(TokioIo::new(tls), state, peer, shutdown).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "Slack interactions: TLS handshake failed")
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "Slack interactions: TLS handshake timed out")
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), async {
        while conns.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        conns.abort_all();
    }
    tracing::info!("Slack interactions endpoint stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::tests::{notice, stub_server, Recorded, Responder};
    use proptest::prelude::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::net::TcpStream;

    const TOKEN: &str = "xoxb-1111-2222-abcdefSECRETtoken";
    const SIGNING: &str = "8f742231b10e8888abcd99yyyzzz85a5";

    fn token_file(dir: &tempfile::TempDir) -> PathBuf {
        let p = dir.path().join("bot-token");
        std::fs::write(&p, format!("{TOKEN}\n")).expect("write token");
        p
    }

    fn slack_cfg(api: SocketAddr, dir: &tempfile::TempDir) -> SlackConfig {
        SlackConfig {
            api_base: format!("http://{api}"),
            bot_token_file: Some(token_file(dir)),
            channel: "C0123456789".into(),
            ..Default::default()
        }
    }

    fn ok_api() -> Responder {
        Arc::new(|r: &Recorded| match r.path.as_str() {
            "/chat.postMessage" => (
                200,
                r#"{"ok":true,"channel":"C0123456789","ts":"1700000000.000100","message":{}}"#
                    .into(),
            ),
            "/chat.update" => (
                200,
                r#"{"ok":true,"channel":"C0123456789","ts":"1700000000.000100"}"#.into(),
            ),
            _ => (404, "unknown method".into()),
        })
    }

    fn json_body(r: &Recorded) -> Value {
        serde_json::from_slice(&r.body).expect("json body")
    }

    fn all_text(blocks: &Value) -> String {
        // Every mrkdwn text in the blocks, joined.
        let mut out = String::new();
        fn walk(v: &Value, out: &mut String) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(t)) = m.get("text") {
                        out.push_str(t);
                        out.push('\n');
                    }
                    m.values().for_each(|v| walk(v, out));
                }
                Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
                _ => {}
            }
        }
        walk(blocks, &mut out);
        out
    }

    // -----------------------------------------------------------------------------------------
    // Web API against a stub

    #[tokio::test]
    async fn pending_posts_blocks_and_decided_updates_the_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (addr, seen) = stub_server(ok_api()).await;
        let slack = SlackNotifier::new(&slack_cfg(addr, &dir)).expect("notifier");
        assert_eq!(slack.name(), "slack");
        let mut n = notice();
        let r = slack.pending(&n).await.expect("pending");
        assert_eq!(r.as_deref(), Some("C0123456789/1700000000.000100"));

        let post = seen.lock()[0].clone();
        assert_eq!(post.method, "POST");
        assert_eq!(post.path, "/chat.postMessage");
        assert_eq!(
            post.headers[header::AUTHORIZATION].to_str().expect("ascii"),
            format!("Bearer {TOKEN}")
        );
        assert!(post.headers[header::CONTENT_TYPE]
            .to_str()
            .expect("ascii")
            .starts_with("application/json"));
        let body = json_body(&post);
        assert_eq!(body["channel"], "C0123456789");
        assert!(body["text"].as_str().expect("text").contains("sql:delete"));
        let blocks = body["blocks"].as_array().expect("blocks");
        let actions: Vec<&Value> = blocks.iter().filter(|b| b["type"] == "actions").collect();
        assert_eq!(actions.len(), 1);
        let buttons = actions[0]["elements"].as_array().expect("buttons");
        assert_eq!(buttons.len(), 2);
        assert_eq!(buttons[0]["action_id"], ACTION_APPROVE);
        assert_eq!(buttons[0]["style"], "primary");
        assert_eq!(buttons[0]["value"], n.id);
        assert_eq!(buttons[1]["action_id"], ACTION_DENY);
        assert_eq!(buttons[1]["style"], "danger");
        assert_eq!(buttons[1]["value"], n.id);
        let text = all_text(&body["blocks"]);
        // The command, escaped for Slack ("<" would start a link or a mention).
        assert!(
            text.contains("```DELETE FROM orders WHERE created_at &lt; '2020-01-01'```"),
            "{text}"
        );
        assert!(text.contains("agent:crewai-writer"), "{text}");
        assert!(text.contains("`prod-pg`"), "{text}");
        assert!(text.contains("`prod-deletes-need-dba`"), "{text}");
        assert!(text.contains("<!date^1900000000^"), "{text}");
        assert!(
            text.contains("cleanup &lt;ticket #42&gt; &amp; archive"),
            "{text}"
        );
        assert!(text.contains("0 of 2 approvals"), "{text}");

        n.state = "approved".into();
        n.decided_by = "carol".into();
        n.comment = "looks fine".into();
        n.approvals = vec!["dave".into(), "carol".into()];
        slack.decided(&n, r.as_deref()).await.expect("decided");
        let update = seen.lock()[1].clone();
        assert_eq!(update.path, "/chat.update");
        assert_eq!(
            update.headers[header::AUTHORIZATION]
                .to_str()
                .expect("ascii"),
            format!("Bearer {TOKEN}")
        );
        let body = json_body(&update);
        assert_eq!(body["channel"], "C0123456789");
        assert_eq!(body["ts"], "1700000000.000100");
        let blocks = body["blocks"].as_array().expect("blocks");
        assert!(blocks.iter().all(|b| b["type"] != "actions"), "no buttons");
        let text = all_text(&body["blocks"]);
        assert!(
            text.contains("✅ *Approved* by carol: looks fine"),
            "{text}"
        );
        assert!(text.contains("dave, carol"), "{text}");
        assert!(body["text"]
            .as_str()
            .expect("fallback")
            .contains("Approved by carol: looks fine"));
        assert_eq!(seen.lock().len(), 2);
    }

    #[tokio::test]
    async fn decided_renders_every_outcome_and_progress_keeps_the_buttons() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (addr, seen) = stub_server(ok_api()).await;
        let slack = SlackNotifier::new(&slack_cfg(addr, &dir)).expect("notifier");
        let r = Some("C0123456789/1700000000.000100");
        let cases = [
            (
                "denied",
                "mallory",
                "too risky",
                "❌ *Denied* by mallory: too risky",
            ),
            ("expired", "", "", "⌛ *Expired*"),
            (
                "cancelled",
                "",
                "client disconnected",
                "🚫 *Cancelled*: client disconnected",
            ),
        ];
        for (i, (state, by, comment, want)) in cases.iter().enumerate() {
            let mut n = notice();
            n.state = state.to_string();
            n.decided_by = by.to_string();
            n.comment = comment.to_string();
            slack.decided(&n, r).await.expect("decided");
            let body = json_body(&seen.lock()[i]);
            let text = all_text(&body["blocks"]);
            assert!(text.contains(want), "{state}: {text}");
            assert!(body["blocks"]
                .as_array()
                .expect("blocks")
                .iter()
                .all(|b| b["type"] != "actions"));
        }
        // One approval of two: the message shows progress and keeps the buttons.
        let mut n = notice();
        n.approvals = vec!["carol".into()];
        slack.decided(&n, r).await.expect("progress");
        let body = json_body(&seen.lock()[3]);
        assert_eq!(seen.lock()[3].path, "/chat.update");
        let text = all_text(&body["blocks"]);
        assert!(text.contains("1 of 2 approvals (carol)"), "{text}");
        assert!(body["blocks"]
            .as_array()
            .expect("blocks")
            .iter()
            .any(|b| b["type"] == "actions"));
        // Without a reference, the outcome is posted as a new message.
        n.state = "approved".into();
        slack.decided(&n, None).await.expect("post");
        assert_eq!(seen.lock()[4].path, "/chat.postMessage");
        // A malformed reference is an error, not a panic.
        let err = slack
            .decided(&n, Some("garbage"))
            .await
            .expect_err("bad ref");
        assert!(err.to_string().contains("<channel>/<ts>"), "{err}");
        assert_eq!(seen.lock().len(), 5);
    }

    #[tokio::test]
    async fn slack_errors_name_the_cause_and_never_the_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (addr, _) = stub_server(Arc::new(|_| {
            (200, r#"{"ok":false,"error":"channel_not_found"}"#.into())
        }))
        .await;
        let slack = SlackNotifier::new(&slack_cfg(addr, &dir)).expect("notifier");
        let err = slack.pending(&notice()).await.expect_err("error");
        assert!(
            matches!(&err, NotifyError::Api { error, .. } if error == "channel_not_found"),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("channel_not_found"), "{msg}");
        assert!(msg.contains("[slack] channel"), "{msg}");
        assert!(
            !msg.contains(TOKEN) && !format!("{err:?}").contains(TOKEN),
            "{msg}"
        );
        assert!(!format!("{slack:?}").contains(TOKEN));

        // A receiver that echoes the Authorization header back in an error page.
        let (addr, _) = stub_server(Arc::new(|r: &Recorded| {
            let auth = r.headers[header::AUTHORIZATION]
                .to_str()
                .unwrap_or("")
                .to_string();
            (500, format!("internal error; you sent {auth}"))
        }))
        .await;
        let slack = SlackNotifier::new(&slack_cfg(addr, &dir)).expect("notifier");
        let err = slack.pending(&notice()).await.expect_err("500");
        assert!(
            matches!(err, NotifyError::Status { code: 500, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("HTTP 500") && msg.contains("[redacted]"),
            "{msg}"
        );
        assert!(!msg.contains(TOKEN), "{msg}");

        // Missing scope: the hint names the scope Slack asks for.
        let (addr, _) = stub_server(Arc::new(|_| {
            (
                200,
                r#"{"ok":false,"error":"missing_scope","needed":"chat:write"}"#.into(),
            )
        }))
        .await;
        let slack = SlackNotifier::new(&slack_cfg(addr, &dir)).expect("notifier");
        let err = slack.pending(&notice()).await.expect_err("scope");
        assert!(
            err.to_string().contains("add the chat:write scope"),
            "{err}"
        );

        // Not JSON, and JSON without a ts.
        let (addr, _) = stub_server(Arc::new(|r: &Recorded| {
            if r.path == "/chat.postMessage" {
                (200, r#"{"ok":true}"#.into())
            } else {
                (200, "<html>".into())
            }
        }))
        .await;
        let slack = SlackNotifier::new(&slack_cfg(addr, &dir)).expect("notifier");
        let err = slack.pending(&notice()).await.expect_err("no ts");
        assert!(matches!(err, NotifyError::BadResponse { .. }), "{err:?}");
        let err = slack
            .decided(&notice(), Some("C1/1.2"))
            .await
            .expect_err("not json");
        assert!(err.to_string().contains("not JSON"), "{err}");
    }

    #[test]
    fn long_commands_are_cut_and_cannot_break_out_of_the_code_block() {
        let mut n = notice();
        n.text = format!("SELECT 1; ```<!channel>``` {}", "x".repeat(10_000));
        let blocks = pending_blocks(&n);
        for b in blocks.as_array().expect("blocks") {
            if let Some(t) = b.pointer("/text/text").and_then(Value::as_str) {
                assert!(t.chars().count() <= 3000, "section text over Slack's limit");
            }
        }
        let cmd = blocks[1]["text"]["text"].as_str().expect("command");
        assert!(
            cmd.starts_with("```SELECT 1; `\u{200b}`\u{200b}`&lt;!channel&gt;"),
            "{cmd}"
        );
        assert!(cmd.ends_with("```"));
        assert_eq!(cmd.matches("```").count(), 2);
        assert!(cmd.chars().count() <= MAX_COMMAND_CHARS + 6);
        let ctx = all_text(&blocks[2]);
        assert!(ctx.contains("more characters"), "{ctx}");

        // Escaping never leaves half an entity at the cut.
        let (s, left) = escape_cut("ab<<<<", 7);
        assert_eq!((s.as_str(), left), ("ab&lt;", 3));
        assert_eq!(escape_cut("a&b", 100), ("a&amp;b".to_string(), 0));
    }

    // -----------------------------------------------------------------------------------------
    // Signatures

    const DOC_TS: &str = "1531420618";
    const DOC_BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const DOC_SIG: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    #[test]
    fn slack_documented_example_verifies() {
        // Independently of slack_mac: the basestring and HMAC as Slack documents them.
        let mut mac = Hmac::<Sha256>::new_from_slice(SIGNING.as_bytes()).expect("key");
        mac.update(format!("v0:{DOC_TS}:{DOC_BODY}").as_bytes());
        let expected = format!("v0={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(expected, DOC_SIG);
        assert_eq!(
            sign_request(SIGNING.as_bytes(), DOC_TS, DOC_BODY.as_bytes()),
            DOC_SIG
        );

        let now = 1531420618 + 10;
        let ok = |secret: &str, ts: &str, sig: &str, body: &str, now: i64| {
            verify_signature(secret.as_bytes(), ts, sig, body.as_bytes(), now)
        };
        assert_eq!(ok(SIGNING, DOC_TS, DOC_SIG, DOC_BODY, now), Ok(()));
        assert_eq!(
            ok(
                SIGNING,
                DOC_TS,
                &DOC_SIG.to_uppercase().replace("V0=", "v0="),
                DOC_BODY,
                now
            ),
            Ok(())
        );
        // Tampered body.
        let tampered = DOC_BODY.replace("roadrunner", "wilecoyote");
        assert_eq!(
            ok(SIGNING, DOC_TS, DOC_SIG, &tampered, now),
            Err(SlackAuthError::BadSignature)
        );
        // Wrong secret.
        assert_eq!(
            ok(
                "8f742231b10e8888abcd99yyyzzz85a6",
                DOC_TS,
                DOC_SIG,
                DOC_BODY,
                now
            ),
            Err(SlackAuthError::BadSignature)
        );
        // Another timestamp, same signature.
        assert_eq!(
            ok(SIGNING, "1531420619", DOC_SIG, DOC_BODY, now),
            Err(SlackAuthError::BadSignature)
        );
        // Stale, both ways; 300 s is still fine.
        assert_eq!(
            ok(SIGNING, DOC_TS, DOC_SIG, DOC_BODY, 1531420618 + 300),
            Ok(())
        );
        assert_eq!(
            ok(SIGNING, DOC_TS, DOC_SIG, DOC_BODY, 1531420618 + 301),
            Err(SlackAuthError::Stale { age_secs: 301 })
        );
        assert_eq!(
            ok(SIGNING, DOC_TS, DOC_SIG, DOC_BODY, 1531420618 - 3600),
            Err(SlackAuthError::Stale { age_secs: -3600 })
        );
        // Missing headers.
        assert_eq!(
            ok(SIGNING, "", DOC_SIG, DOC_BODY, now),
            Err(SlackAuthError::MissingHeader("X-Slack-Request-Timestamp"))
        );
        assert_eq!(
            ok(SIGNING, DOC_TS, "", DOC_BODY, now),
            Err(SlackAuthError::MissingHeader("X-Slack-Signature"))
        );
        // Malformed values.
        assert_eq!(
            ok(SIGNING, "soon", DOC_SIG, DOC_BODY, now),
            Err(SlackAuthError::BadTimestamp)
        );
        assert_eq!(
            ok(
                SIGNING,
                DOC_TS,
                &DOC_SIG.replace("v0=", "v1="),
                DOC_BODY,
                now
            ),
            Err(SlackAuthError::BadSignature)
        );
        assert_eq!(
            ok(SIGNING, DOC_TS, "v0=xyz", DOC_BODY, now),
            Err(SlackAuthError::BadSignature)
        );
        assert_eq!(
            ok(SIGNING, DOC_TS, &DOC_SIG[..40], DOC_BODY, now),
            Err(SlackAuthError::BadSignature)
        );
        assert!(matches!(
            ok(SIGNING, "-9223372036854775808", DOC_SIG, DOC_BODY, i64::MAX),
            Err(SlackAuthError::Stale { .. })
        ));
        // Messages name the cause and not the secret.
        let msg = SlackAuthError::BadSignature.to_string();
        assert!(msg.contains("signing secret") && !msg.contains(SIGNING));
    }

    proptest! {
        #[test]
        fn signatures_round_trip_and_any_byte_change_fails(
            secret in proptest::collection::vec(any::<u8>(), 1..64),
            body in proptest::collection::vec(any::<u8>(), 1..512),
            ts in 1_000_000_000i64..2_000_000_000,
            skew in -300i64..=300,
            pos in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let t = ts.to_string();
            let sig = sign_request(&secret, &t, &body);
            prop_assert_eq!(verify_signature(&secret, &t, &sig, &body, ts + skew), Ok(()));

            let mut changed = body.clone();
            let i = pos.index(changed.len());
            changed[i] ^= flip;
            prop_assert_eq!(
                verify_signature(&secret, &t, &sig, &changed, ts),
                Err(SlackAuthError::BadSignature)
            );
            let mut bad_secret = secret.clone();
            let j = pos.index(bad_secret.len());
            bad_secret[j] ^= flip;
            prop_assert_eq!(
                verify_signature(&bad_secret, &t, &sig, &body, ts),
                Err(SlackAuthError::BadSignature)
            );
            let mut bad_sig = sig.clone().into_bytes();
            let k = 3 + pos.index(bad_sig.len() - 3);
            bad_sig[k] = if bad_sig[k] == b'0' { b'1' } else { b'0' };
            let bad_sig = String::from_utf8(bad_sig).expect("ascii");
            prop_assert_eq!(
                verify_signature(&secret, &t, &bad_sig, &body, ts),
                Err(SlackAuthError::BadSignature)
            );
        }

        #[test]
        fn parse_interaction_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_interaction(&body);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Interaction payloads

    fn payload(user: &str, action_id: &str, value: &str) -> Value {
        json!({
            "type": "block_actions",
            "user": { "id": user, "username": "alice", "name": "alice", "team_id": "T1" },
            "api_app_id": "A1",
            "token": "verification-token-not-used",
            "container": { "type": "message", "message_ts": "1700000000.000100", "channel_id": "C0123456789", "is_ephemeral": false },
            "trigger_id": "1.2.3",
            "team": { "id": "T1", "domain": "acme" },
            "channel": { "id": "C0123456789", "name": "approvals" },
            "message": { "type": "message", "ts": "1700000000.000100", "text": "Approval requested" },
            "response_url": "https://hooks.slack.com/actions/T1/1/abc",
            "actions": [ {
                "action_id": action_id, "block_id": "custos_approval",
                "text": { "type": "plain_text", "text": "Approve" },
                "value": value, "style": "primary", "type": "button", "action_ts": "1700000001.1"
            } ]
        })
    }

    fn form(payload: &Value) -> Vec<u8> {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("payload", &payload.to_string())
            .finish()
            .into_bytes()
    }

    const APPROVAL: &str = "0190a5c4-7d3e-7b8a-9f00-1234567890ab";

    #[test]
    fn parse_interaction_reads_block_actions() {
        let i =
            parse_interaction(&form(&payload("U0ALICE", ACTION_APPROVE, APPROVAL))).expect("ok");
        assert_eq!(
            i,
            Interaction {
                user_id: "U0ALICE".into(),
                user_name: "alice".into(),
                approval_id: APPROVAL.into(),
                approve: true,
                channel: "C0123456789".into(),
                message_ts: "1700000000.000100".into(),
            }
        );
        let i = parse_interaction(&form(&payload("U0ALICE", ACTION_DENY, APPROVAL))).expect("ok");
        assert!(!i.approve);

        // Channel and ts from the container when the message is absent.
        let mut p = payload("U0ALICE", ACTION_DENY, APPROVAL);
        p.as_object_mut().expect("object").remove("message");
        p.as_object_mut().expect("object").remove("channel");
        let i = parse_interaction(&form(&p)).expect("ok");
        assert_eq!(
            (i.channel.as_str(), i.message_ts.as_str()),
            ("C0123456789", "1700000000.000100")
        );

        for (body, want) in [
            (b"".to_vec(), "no `payload`"),
            (b"payload=%7Bnot json".to_vec(), "not the JSON"),
            (
                form(&json!({"type": "view_submission"})),
                "unsupported interaction type",
            ),
            (
                form(&payload("U0ALICE", "other_button", APPROVAL)),
                "no custos_approve",
            ),
            (form(&payload("", ACTION_APPROVE, APPROVAL)), "user id"),
            (
                form(&payload("U0ALICE", ACTION_APPROVE, "")),
                "not an approval id",
            ),
            (
                form(&payload("U0ALICE", ACTION_APPROVE, "a b\n")),
                "not an approval id",
            ),
            (
                form(&json!({"type": "block_actions", "actions": []})),
                "no user",
            ),
        ] {
            let err = parse_interaction(&body).expect_err(want);
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    // -----------------------------------------------------------------------------------------
    // Configuration

    #[test]
    fn config_example_parses_and_validates() {
        let example = r#"
            api_base = ""
            bot_token_file = "/etc/custos/slack-bot-token"
            channel = "C0123456789"
            signing_secret_env = "CUSTOS_SLACK_SIGNING_SECRET"
            listen = "0.0.0.0:7443"
            tls_cert = "/etc/custos/tls/slack.crt"
            tls_key = "/etc/custos/tls/slack.key"
            identity_from_email = false

            [users]
            U0123ABCD = "carol@example.com"
            U0456EFGH = "dave@example.com"
        "#;
        let cfg: SlackConfig = toml::from_str(example).expect("parses");
        cfg.validate().expect("valid");
        assert_eq!(cfg.api_base(), DEFAULT_API_BASE);
        assert_eq!(cfg.users["U0123ABCD"], "carol@example.com");
        assert!(
            toml::from_str::<SlackConfig>("chanel = \"C1\"").is_err(),
            "unknown field"
        );

        let base = || SlackConfig {
            channel: "C1".into(),
            bot_token_env: Some("SLACK_TOKEN".into()),
            ..Default::default()
        };
        base().validate().expect("minimal config");
        type Change = Box<dyn Fn(&mut SlackConfig)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|c| c.channel.clear()), "[slack] channel is empty"),
            (Box::new(|c| c.channel = "#general".into()), ""),
            (
                Box::new(|c| c.bot_token_env = None),
                "bot_token_file or bot_token_env",
            ),
            (
                Box::new(|c| c.bot_token_file = Some("/x".into())),
                "both bot_token_file and bot_token_env",
            ),
            (
                Box::new(|c| c.api_base = "http://slack.example.com/api".into()),
                "must use https",
            ),
            (
                Box::new(|c| c.api_base = "ftp://x".into()),
                "http:// or https://",
            ),
            (
                Box::new(|c| c.listen = "0.0.0.0:7443".into()),
                "signing_secret_file or signing_secret_env",
            ),
            (
                Box::new(|c| {
                    c.listen = "everywhere".into();
                    c.signing_secret_env = Some("S".into());
                }),
                "[slack] listen",
            ),
            (
                Box::new(|c| c.tls_cert = Some("/c".into())),
                "tls_cert is set without tls_key",
            ),
            (
                Box::new(|c| {
                    c.users.insert("alice".into(), "alice".into());
                }),
                "[slack.users] key \"alice\"",
            ),
            (
                Box::new(|c| {
                    c.users.insert("U1".into(), " ".into());
                }),
                "empty identity",
            ),
        ];
        for (change, want) in cases {
            let mut c = base();
            change(&mut c);
            match c.validate() {
                // "#general" is accepted here: Slack resolves names, though ids are preferred.
                Ok(()) if want.is_empty() => {}
                Ok(()) => panic!("accepted; wanted {want}"),
                Err(e) => assert!(e.contains(want), "wanted {want:?}, got {e}"),
            }
        }
        let mut c = base();
        c.api_base = "http://127.0.0.1:9/api/".into();
        c.validate().expect("loopback http is fine");
        assert_eq!(c.api_base(), "http://127.0.0.1:9/api");
    }

    #[test]
    fn secrets_are_read_from_files_and_env_and_never_shown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = SlackConfig {
            bot_token_file: Some(token_file(&dir)),
            ..Default::default()
        };
        assert_eq!(c.bot_token().expect("token"), TOKEN);
        c.bot_token_file = Some(dir.path().join("missing"));
        let err = c.bot_token().expect_err("missing file").to_string();
        assert!(
            err.contains("missing") && err.contains("bot_token_file"),
            "{err}"
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        c.bot_token_file = Some(empty);
        assert!(c
            .bot_token()
            .expect_err("empty")
            .to_string()
            .contains("is empty"));

        c.bot_token_file = None;
        c.signing_secret_env = Some("CUSTOS_TEST_SLACK_SIGNING_SECRET_UNSET".into());
        let err = c.signing_secret().expect_err("unset").to_string();
        assert!(
            err.contains("CUSTOS_TEST_SLACK_SIGNING_SECRET_UNSET") && err.contains("not set"),
            "{err}"
        );
        let err = c.bot_token().expect_err("none").to_string();
        assert!(
            err.contains("bot_token_file") && err.contains("bot_token_env"),
            "{err}"
        );
        // PATH is set in every test environment; the value is read, not the name.
        c.signing_secret_env = Some("PATH".into());
        assert_eq!(
            c.signing_secret().expect("env"),
            std::env::var("PATH").expect("PATH").trim()
        );
    }

    // -----------------------------------------------------------------------------------------
    // The interactions endpoint, over HTTPS

    #[derive(Default)]
    struct RecordingSink {
        calls: Mutex<Vec<(String, String, bool, String)>>,
        refuse: bool,
    }

    impl DecisionSink for RecordingSink {
        fn decide<'a>(
            &'a self,
            identity: &'a str,
            approval_id: &'a str,
            approve: bool,
            comment: &'a str,
        ) -> BoxFuture<'a, Result<String, String>> {
            Box::pin(async move {
                self.calls.lock().push((
                    identity.to_string(),
                    approval_id.to_string(),
                    approve,
                    comment.to_string(),
                ));
                if self.refuse {
                    Err("carol may not approve her own request".to_string())
                } else if approve {
                    Ok("approved; 1 of 2".to_string())
                } else {
                    Ok("denied".to_string())
                }
            })
        }
    }

    struct Endpoint {
        addr: SocketAddr,
        roots: Option<rustls::RootCertStore>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
        sink: Arc<RecordingSink>,
        _dir: tempfile::TempDir,
    }

    fn tls_pair() -> (Arc<rustls::ServerConfig>, rustls::RootCertStore) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        let cert = CertificateDer::from(ck.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        (Arc::new(cfg), roots)
    }

    async fn endpoint_with(
        https: bool,
        change: impl FnOnce(&mut SlackConfig),
        sink: RecordingSink,
    ) -> Endpoint {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret_file = dir.path().join("signing-secret");
        std::fs::write(&secret_file, format!("{SIGNING}\n")).expect("write");
        let mut cfg = SlackConfig {
            channel: "C0123456789".into(),
            bot_token_file: Some(token_file(&dir)),
            signing_secret_file: Some(secret_file),
            listen: "127.0.0.1:0".into(),
            ..Default::default()
        };
        cfg.users
            .insert("U0ALICE".into(), "alice@example.com".into());
        change(&mut cfg);
        let (tls, roots) = if https {
            let (t, r) = tls_pair();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, rx) = watch::channel(false);
        let sink = Arc::new(sink);
        let task = tokio::spawn(serve_interactions(
            listener,
            tls,
            Arc::new(cfg),
            sink.clone(),
            rx,
        ));
        Endpoint {
            addr,
            roots,
            stop,
            task,
            sink,
            _dir: dir,
        }
    }

    async fn endpoint() -> Endpoint {
        endpoint_with(true, |_| {}, RecordingSink::default()).await
    }

    /// One request on a fresh connection; answers status and body text.
    async fn send(ep: &Endpoint, req: Request<Full<Bytes>>) -> (u16, String) {
        let tcp = TcpStream::connect(ep.addr).await.expect("connect");
        let resp = match &ep.roots {
            Some(roots) => {
                let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
                let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                    .connect(ServerName::try_from("localhost").expect("name"), tcp)
                    .await
                    .expect("TLS handshake with the self-signed endpoint");
                exchange(TokioIo::new(tls), req).await
            }
            None => exchange(TokioIo::new(tcp), req).await,
        };
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn exchange<I>(io: I, req: Request<Full<Bytes>>) -> Response<Incoming>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("handshake");
        tokio::spawn(conn);
        tx.send_request(req).await.expect("response")
    }

    fn signed(body: Vec<u8>, ts: i64, secret: &str) -> Request<Full<Bytes>> {
        let t = ts.to_string();
        let sig = sign_request(secret.as_bytes(), &t, &body);
        Request::post(format!("https://localhost{INTERACTIONS_PATH}"))
            .header(header::HOST, "localhost")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header("x-slack-request-timestamp", t)
            .header("x-slack-signature", sig)
            .body(Full::new(Bytes::from(body)))
            .expect("request")
    }

    fn click(user: &str, approve: bool) -> Vec<u8> {
        form(&payload(
            user,
            if approve { ACTION_APPROVE } else { ACTION_DENY },
            APPROVAL,
        ))
    }

    async fn stop(ep: Endpoint) {
        ep.stop.send(true).expect("stop");
        tokio::time::timeout(Duration::from_secs(10), ep.task)
            .await
            .expect("the endpoint stops on shutdown")
            .expect("no panic");
    }

    #[tokio::test]
    async fn signed_click_calls_the_sink_once_with_the_mapped_identity() {
        let ep = endpoint().await;
        let (status, body) = send(&ep, signed(click("U0ALICE", true), now_secs(), SIGNING)).await;
        assert_eq!(status, 200, "{body}");
        let json: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(
            json,
            json!({"response_type": "ephemeral", "text": "approved; 1 of 2"})
        );
        assert_eq!(
            ep.sink.calls.lock().clone(),
            vec![(
                "alice@example.com".to_string(),
                APPROVAL.to_string(),
                true,
                CLICK_COMMENT.to_string()
            )]
        );

        // A deny click (a new request, so a new signature).
        let (status, body) = send(
            &ep,
            signed(click("U0ALICE", false), now_secs() - 1, SIGNING),
        )
        .await;
        assert_eq!((status, body.contains("denied")), (200, true), "{body}");
        assert_eq!(ep.sink.calls.lock().len(), 2);
        assert!(!ep.sink.calls.lock()[1].2);
        stop(ep).await;
    }

    #[tokio::test]
    async fn bad_signature_is_401_and_the_sink_is_not_called() {
        let ep = endpoint().await;
        let (status, body) = send(
            &ep,
            signed(click("U0ALICE", true), now_secs(), "wrong-secret"),
        )
        .await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("signature does not match"), "{body}");
        assert!(!body.contains(SIGNING));

        // Signed, then the body changed in transit.
        let mut req = signed(click("U0ALICE", true), now_secs(), SIGNING);
        *req.body_mut() = Full::new(Bytes::from(click("U0BOB", true)));
        let (status, _) = send(&ep, req).await;
        assert_eq!(status, 401);

        // No signature headers at all.
        let req = Request::post(INTERACTIONS_PATH)
            .header(header::HOST, "localhost")
            .body(Full::new(Bytes::from(click("U0ALICE", true))))
            .expect("request");
        let (status, body) = send(&ep, req).await;
        assert_eq!(status, 401);
        assert!(body.contains("X-Slack-Request-Timestamp"), "{body}");
        assert!(ep.sink.calls.lock().is_empty());
        stop(ep).await;
    }

    #[tokio::test]
    async fn replayed_request_is_401_and_counts_once() {
        let ep = endpoint().await;
        let ts = now_secs();
        let body = click("U0ALICE", true);
        let (first, _) = send(&ep, signed(body.clone(), ts, SIGNING)).await;
        let (second, text) = send(&ep, signed(body, ts, SIGNING)).await;
        assert_eq!((first, second), (200, 401), "{text}");
        assert!(text.contains("replay"), "{text}");
        assert_eq!(ep.sink.calls.lock().len(), 1);
        stop(ep).await;
    }

    #[tokio::test]
    async fn stale_request_is_401() {
        let ep = endpoint().await;
        let (status, body) = send(
            &ep,
            signed(click("U0ALICE", true), now_secs() - 301 - 5, SIGNING),
        )
        .await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("away from this server's clock"), "{body}");
        assert!(ep.sink.calls.lock().is_empty());
        stop(ep).await;
    }

    #[tokio::test]
    async fn unmapped_user_is_403_naming_the_user() {
        let ep = endpoint().await;
        let (status, body) = send(&ep, signed(click("U0MALLORY", true), now_secs(), SIGNING)).await;
        assert_eq!(status, 403, "{body}");
        assert!(
            body.contains("U0MALLORY") && body.contains("[slack.users]"),
            "{body}"
        );
        assert!(ep.sink.calls.lock().is_empty());
        stop(ep).await;
    }

    #[tokio::test]
    async fn garbage_payload_is_400() {
        let ep = endpoint().await;
        for body in [
            b"payload=%7B%7D".to_vec(),
            b"hello".to_vec(),
            vec![0xff, 0x00, 0x80],
        ] {
            let (status, text) = send(&ep, signed(body, now_secs(), SIGNING)).await;
            assert_eq!(status, 400, "{text}");
        }
        assert!(ep.sink.calls.lock().is_empty());
        stop(ep).await;
    }

    #[tokio::test]
    async fn oversize_body_is_413() {
        let ep = endpoint().await;
        let mut body = b"payload=".to_vec();
        body.resize(MAX_INTERACTION_BODY + 1, b'a');
        let (status, text) = send(&ep, signed(body, now_secs(), SIGNING)).await;
        assert_eq!(status, 413, "{text}");
        // Exactly at the limit is read (and then refused for what it says).
        let mut body = b"payload=".to_vec();
        body.resize(MAX_INTERACTION_BODY, b'a');
        let (status, _) = send(&ep, signed(body, now_secs(), SIGNING)).await;
        assert_eq!(status, 400);
        assert!(ep.sink.calls.lock().is_empty());
        stop(ep).await;
    }

    #[tokio::test]
    async fn unknown_paths_and_methods() {
        let ep = endpoint().await;
        let req = Request::post("/slack/other")
            .header(header::HOST, "localhost")
            .body(Full::new(Bytes::new()))
            .expect("request");
        assert_eq!(send(&ep, req).await.0, 404);
        let req = Request::get(INTERACTIONS_PATH)
            .header(header::HOST, "localhost")
            .body(Full::new(Bytes::new()))
            .expect("request");
        assert_eq!(send(&ep, req).await.0, 405);
        stop(ep).await;
    }

    #[tokio::test]
    async fn sink_refusal_is_shown_to_the_user() {
        let ep = endpoint_with(
            true,
            |_| {},
            RecordingSink {
                refuse: true,
                ..Default::default()
            },
        )
        .await;
        let (status, body) = send(&ep, signed(click("U0ALICE", true), now_secs(), SIGNING)).await;
        assert_eq!(status, 200, "{body}");
        let json: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(json["response_type"], "ephemeral");
        assert!(json["text"]
            .as_str()
            .expect("text")
            .contains("may not approve her own request"));
        assert_eq!(ep.sink.calls.lock().len(), 1);
        stop(ep).await;
    }

    #[tokio::test]
    async fn identity_from_email_uses_users_info_over_plain_http() {
        let (api, seen) = stub_server(Arc::new(|r: &Recorded| {
            if r.path == "/users.info?user=U0BOB" {
                (200, r#"{"ok":true,"user":{"id":"U0BOB","deleted":false,"is_bot":false,"profile":{"email":"Bob@Example.com"}}}"#.into())
            } else if r.path == "/users.info?user=U0GONE" {
                (200, r#"{"ok":true,"user":{"id":"U0GONE","deleted":true,"profile":{"email":"gone@example.com"}}}"#.into())
            } else {
                (200, r#"{"ok":false,"error":"user_not_found"}"#.into())
            }
        }))
        .await;
        let ep = endpoint_with(
            false,
            |c| {
                c.identity_from_email = true;
                c.api_base = format!("http://{api}");
            },
            RecordingSink::default(),
        )
        .await;
        let (status, body) = send(&ep, signed(click("U0BOB", true), now_secs(), SIGNING)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(ep.sink.calls.lock()[0].0, "bob@example.com");
        let rec = seen.lock()[0].clone();
        assert_eq!(
            rec.headers[header::AUTHORIZATION].to_str().expect("ascii"),
            format!("Bearer {TOKEN}")
        );
        // Mapped users do not need the lookup.
        let (status, _) = send(&ep, signed(click("U0ALICE", true), now_secs(), SIGNING)).await;
        assert_eq!(status, 200);
        assert_eq!(seen.lock().len(), 1);
        assert_eq!(ep.sink.calls.lock()[1].0, "alice@example.com");
        // Deactivated and unknown users are refused.
        for user in ["U0GONE", "U0NOBODY"] {
            let (status, body) = send(&ep, signed(click(user, true), now_secs(), SIGNING)).await;
            assert_eq!(status, 403, "{body}");
            assert!(body.contains(user) && !body.contains(TOKEN), "{body}");
        }
        assert_eq!(ep.sink.calls.lock().len(), 2);
        stop(ep).await;
    }

    #[tokio::test]
    async fn missing_signing_secret_refuses_every_click() {
        let ep = endpoint_with(
            true,
            |c| {
                c.signing_secret_file = None;
                c.signing_secret_env = Some("CUSTOS_TEST_SLACK_SIGNING_SECRET_UNSET".into());
            },
            RecordingSink::default(),
        )
        .await;
        let (status, body) = send(&ep, signed(click("U0ALICE", true), now_secs(), SIGNING)).await;
        assert_eq!(status, 503, "{body}");
        assert!(
            body.contains("CUSTOS_TEST_SLACK_SIGNING_SECRET_UNSET"),
            "{body}"
        );
        assert!(ep.sink.calls.lock().is_empty());
        stop(ep).await;
    }

    #[tokio::test]
    async fn server_tls_loads_pem_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, ck.cert.pem()).expect("write");
        std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write");
        let mut c = SlackConfig::default();
        assert!(c.server_tls().expect("none").is_none());
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key);
        let tls = c.server_tls().expect("loads").expect("some");
        assert_eq!(tls.alpn_protocols, vec![b"http/1.1".to_vec()]);
        c.tls_key = Some(cert);
        let err = c
            .server_tls()
            .expect_err("a certificate is not a key")
            .to_string();
        assert!(err.contains("tls_key"), "{err}");
    }
}
