//! The session pipeline every protocol shares:
//!
//! ```text
//! accept → authenticate → classify → authorize → hold for approval → forward with injected
//!          (Authenticator)  (protocol)  (Policies)   (ApprovalHook)     credentials (protocol)
//!                                                                    → mask (core::mask) → record (Recorder)
//! ```
//!
//! A protocol module (today `pg`) owns the wire format and the classification of its commands;
//! everything that decides or records lives here, so MySQL, SSH, Kubernetes and HTTP plug into
//! the same steps.
//!
//! Each step is a DEBUG tracing span (`authenticate`, `authorize`, `approval.hold`, `record`;
//! the protocols add their session, statement and `upstream` spans), exported over OTLP when the
//! process has an endpoint (docs/operations.md, Traces). Span attributes name kinds, verdicts and
//! ids, never tokens, secrets or statement text.

use std::sync::Arc;
use std::time::Duration;

use custos_core::authz::{self, ApprovalRequirement, Decision, Engine, Principal, Target};
use custos_core::bus::{BusError, EventBus};
use custos_core::events::Origin;
use custos_core::oidc::{looks_like_jwt, OidcVerifier};
use custos_core::proto::v1::{
    event::Payload, Classification, CommandReceived, Connection, Event, Verdict as PbVerdict,
};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use crate::watch::EdgeConfig;

// ===== authenticate ============================================================================

/// Who a session belongs to, after authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub subject: String,
    pub groups: Vec<String>,
    /// `custos-token` or `oidc`.
    pub method: &'static str,
}

/// Why a client was not let in. The text is shown to the client: it names the cause and never
/// echoes the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token given: connect with password=<custos token or OIDC JWT>")]
    Empty,
    #[error("token is not a custos token (cst_…) nor a JWT")]
    Malformed,
    #[error("unknown token id {0}: it was never issued or this edge has not seen it yet")]
    Unknown(String),
    #[error("token {0} is revoked")]
    Revoked(String),
    #[error("token {0} expired")]
    Expired(String),
    #[error("token {0} does not match its stored hash (tampered or mistyped)")]
    BadSecret(String),
    #[error(
        "user {user:?} does not match the token's subject {subject:?}: connect with user={subject}"
    )]
    SubjectMismatch { user: String, subject: String },
    #[error("OIDC token rejected: {0}")]
    Oidc(String),
    #[error("OIDC tokens are not accepted by this edge (no [oidc] section in its config)")]
    OidcDisabled,
}

impl AuthError {
    /// A short name of the cause, for span attributes (no ids, no user input).
    pub fn kind(&self) -> &'static str {
        match self {
            AuthError::Empty => "empty",
            AuthError::Malformed => "malformed",
            AuthError::Unknown(_) => "unknown_token",
            AuthError::Revoked(_) => "revoked",
            AuthError::Expired(_) => "expired",
            AuthError::BadSecret(_) => "bad_secret",
            AuthError::SubjectMismatch { .. } => "subject_mismatch",
            AuthError::Oidc(_) => "oidc_rejected",
            AuthError::OidcDisabled => "oidc_disabled",
        }
    }
}

/// Checks custos-issued tokens against the hashes the control plane streamed, and OIDC JWTs
/// against the configured issuer's JWKS.
#[derive(Clone, Default)]
pub struct Authenticator {
    pub oidc: Option<Arc<OidcVerifier>>,
}

impl Authenticator {
    /// A login with a user name (Postgres): the token must belong to that user.
    #[tracing::instrument(name = "authenticate", level = "debug", skip_all,
        fields(method = tracing::field::Empty, result = tracing::field::Empty, otel.status_code = tracing::field::Empty))]
    pub async fn authenticate(
        &self,
        cfg: &EdgeConfig,
        user: &str,
        token: &str,
    ) -> Result<Identity, AuthError> {
        let r = match self.check(cfg, token).await {
            Ok(id) if id.subject != user => Err(AuthError::SubjectMismatch {
                user: user.to_string(),
                subject: id.subject,
            }),
            r => r,
        };
        auth_span_result(&r);
        r
    }

    /// Who a bearer token belongs to (HTTP): a custos token or an OIDC JWT.
    #[tracing::instrument(name = "authenticate", level = "debug", skip_all,
        fields(method = tracing::field::Empty, result = tracing::field::Empty, otel.status_code = tracing::field::Empty))]
    pub async fn identify(&self, cfg: &EdgeConfig, token: &str) -> Result<Identity, AuthError> {
        let r = self.check(cfg, token).await;
        auth_span_result(&r);
        r
    }

    async fn check(&self, cfg: &EdgeConfig, token: &str) -> Result<Identity, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Empty);
        }
        let id = if looks_like_jwt(token) {
            let Some(v) = &self.oidc else {
                return Err(AuthError::OidcDisabled);
            };
            let claims = v
                .verify(token)
                .await
                .map_err(|e| AuthError::Oidc(e.to_string()))?;
            Identity {
                subject: claims.subject,
                groups: claims.groups,
                method: "oidc",
            }
        } else {
            let token_id = custos_core::token::parse(token).map_err(|_| AuthError::Malformed)?;
            let rec = cfg
                .tokens
                .get(token_id)
                .ok_or_else(|| AuthError::Unknown(token_id.to_string()))?;
            if !custos_core::token::hashes_equal(&custos_core::token::hash(token), &rec.sha256) {
                return Err(AuthError::BadSecret(token_id.to_string()));
            }
            if rec.revoked {
                return Err(AuthError::Revoked(token_id.to_string()));
            }
            if rec.expires_unix_nano != 0
                && rec.expires_unix_nano <= custos_core::events::now_unix_nano()
            {
                return Err(AuthError::Expired(token_id.to_string()));
            }
            Identity {
                subject: rec.subject.clone(),
                groups: rec.groups.clone(),
                method: "custos-token",
            }
        };
        Ok(id)
    }
}

/// The outcome of an authentication on the current (`authenticate`) span.
fn auth_span_result(r: &Result<Identity, AuthError>) {
    let span = tracing::Span::current();
    match r {
        Ok(id) => {
            span.record("method", id.method);
            span.record("result", "ok");
        }
        Err(e) => {
            span.record("result", e.kind());
            span.record("otel.status_code", "ERROR");
        }
    }
}

// ===== authorize ===============================================================================

/// What a command may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allow,
    Deny,
    Approval(ApprovalRequirement),
}

/// The decision for a whole command (all its statements/actions).
#[derive(Debug, Clone)]
pub struct Verdict {
    pub outcome: Outcome,
    /// Policies that determined the outcome.
    pub policies: Vec<String>,
    /// Why (for denials: which rule, which statement).
    pub reason: String,
    /// The action that decided it (the denied or held one; the first one when allowed).
    pub action: String,
}

impl Verdict {
    /// `allow`, `deny`, `pending_approval`, or `approved` when an approval or grant let it run
    /// (the label of `custos_edge_commands_total` and of the spans).
    pub fn label(&self, approved: bool) -> &'static str {
        if approved {
            return "approved";
        }
        match self.outcome {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Approval(_) => "pending_approval",
        }
    }

    pub fn pb(&self) -> PbVerdict {
        match self.outcome {
            Outcome::Allow => PbVerdict::Allow,
            Outcome::Deny => PbVerdict::Deny,
            Outcome::Approval(_) => PbVerdict::PendingApproval,
        }
    }
}

/// One action to authorize, with its Cedar context.
pub struct ActionRequest<'a> {
    pub action: &'a str,
    pub context: Vec<(&'static str, authz::Value)>,
    /// Position of the statement in the command (for the message), 0-based.
    pub index: usize,
}

/// The compiled policy, recompiled when the control plane sends a new version.
#[derive(Default)]
pub struct Policies {
    cache: Mutex<Option<(u64, String, Arc<Engine>)>>,
}

impl Policies {
    fn engine(&self, cfg: &EdgeConfig) -> Result<Arc<Engine>, String> {
        let Some(p) = &cfg.policy else {
            return Err("no policy has been applied yet (custos policy apply FILE)".into());
        };
        let mut cache = self.cache.lock();
        if let Some((v, sha, e)) = cache.as_ref() {
            if *v == p.version && *sha == p.sha256 {
                return Ok(e.clone());
            }
        }
        let e = Arc::new(Engine::new(&p.text, p.version).map_err(|errs| {
            format!(
                "policy version {} does not compile on this edge: {}",
                p.version,
                errs.join("; ")
            )
        })?);
        *cache = Some((p.version, p.sha256.clone(), e.clone()));
        Ok(e)
    }

    /// Decide a command: every action must be allowed. The first denial wins; otherwise the first
    /// approval requirement holds the command. Fails closed when there is no usable policy.
    pub fn decide(
        &self,
        cfg: &EdgeConfig,
        who: &Identity,
        conn: &Connection,
        actions: &[ActionRequest<'_>],
    ) -> Verdict {
        let span = tracing::debug_span!(
            "authorize",
            actions = actions.len(),
            action = tracing::field::Empty,
            verdict = tracing::field::Empty,
            policies = tracing::field::Empty,
        );
        let _in = span.enter();
        let v = self.decide_now(cfg, who, conn, actions);
        span.record("action", v.action.as_str());
        span.record("verdict", v.label(false));
        if !v.policies.is_empty() {
            span.record("policies", v.policies.join(",").as_str());
        }
        v
    }

    fn decide_now(
        &self,
        cfg: &EdgeConfig,
        who: &Identity,
        conn: &Connection,
        actions: &[ActionRequest<'_>],
    ) -> Verdict {
        let engine = match self.engine(cfg) {
            Ok(e) => e,
            Err(reason) => {
                return Verdict {
                    outcome: Outcome::Deny,
                    policies: vec![],
                    reason,
                    action: actions.first().map(|a| a.action).unwrap_or("").into(),
                }
            }
        };
        let principal = Principal {
            identity: &who.subject,
            groups: &who.groups,
        };
        let target = Target {
            connection: &conn.name,
            kind: &conn.kind,
            environment: conn.options.get("environment").map(String::as_str),
        };
        let many = actions.iter().map(|a| a.index).max().unwrap_or(0) > 0;
        let mut approval: Option<Verdict> = None;
        let mut allowed: Vec<String> = Vec::new();
        for a in actions {
            match engine.authorize(&principal, &target, a.action, &a.context) {
                Decision::Allow { policies } => allowed.extend(policies),
                Decision::Deny { policies, reason } => {
                    let reason = if many {
                        format!("statement {}: {} ({reason})", a.index + 1, a.action)
                    } else {
                        format!("{} ({reason})", a.action)
                    };
                    return Verdict {
                        outcome: Outcome::Deny,
                        policies,
                        reason,
                        action: a.action.to_string(),
                    };
                }
                Decision::NeedsApproval {
                    policies,
                    requirement,
                } => {
                    if approval.is_none() {
                        approval = Some(Verdict {
                            reason: format!(
                                "{} needs approval by {} (policy {})",
                                a.action,
                                requirement.group,
                                policies.join(", ")
                            ),
                            outcome: Outcome::Approval(requirement),
                            policies,
                            action: a.action.to_string(),
                        });
                    }
                }
            }
        }
        if let Some(v) = approval {
            return v;
        }
        allowed.sort();
        allowed.dedup();
        Verdict {
            outcome: Outcome::Allow,
            policies: allowed,
            reason: String::new(),
            action: actions.first().map(|a| a.action).unwrap_or("").into(),
        }
    }
}

// ===== hold for approval =======================================================================

/// A command held for approval.
#[derive(Debug, Clone)]
pub struct ApprovalRequest {
    pub origin: Origin,
    pub groups: Vec<String>,
    pub command_id: String,
    /// The command text, masked.
    pub text: String,
    pub classifications: Vec<Classification>,
    pub action: String,
    pub policies: Vec<String>,
    pub requirement: ApprovalRequirement,
    /// The requester's reason (`/* reason: … */` in SQL); empty when none was given.
    pub reason: String,
    /// The connection refuses at once instead of holding (`approval_wait = refuse`): the request
    /// stays open and the client's retry runs once it is approved.
    pub refuse_now: bool,
}

/// A request the approvals service opened; the command waits on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub approval_id: String,
    pub approver_group: String,
    pub quorum: u32,
    pub expires_unix_nano: i64,
}

impl Held {
    /// The notice a client sees while its command waits: the id, who must approve, the command
    /// an approver runs, and the deadline.
    pub fn notice(&self, action: &str, connection: &str) -> String {
        let deadline = chrono::DateTime::from_timestamp_nanos(self.expires_unix_nano)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        format!(
            "custos: {action} on {connection} is waiting for approval {id}: {q} approval{s} from group {g} needed before {deadline}; an approver runs `custos approvals approve {id}`",
            id = self.approval_id,
            q = self.quorum,
            s = if self.quorum == 1 { "" } else { "s" },
            g = self.approver_group,
        )
    }
}

/// How a hold ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalOutcome {
    Approved {
        approval_id: String,
        approver: String,
    },
    /// A grant let the command through without asking. `record`: the edge must record the use
    /// (time-boxed grants; a one-shot use is recorded by the control plane when consumed).
    Granted {
        grant_id: String,
        approval_id: String,
        kind: String,
        record: bool,
    },
    Refused {
        approval_id: String,
        /// Shown to the client: who refused, or that it timed out, and what to do next.
        reason: String,
    },
}

/// The first step of a hold: decided at once, or waiting on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldStart {
    Done(ApprovalOutcome),
    Held(Held),
}

/// The "hold for approval" step. The approvals service implements it; the edge awaits the
/// outcome before forwarding. It must fail closed: no decision means `Refused`.
pub trait ApprovalHook: Send + Sync + 'static {
    /// Use a grant that covers the command, or open a request.
    fn start<'a>(&'a self, req: &'a ApprovalRequest) -> BoxFuture<'a, HoldStart>;
    /// Wait for the decision. Must return by the request's deadline (plus a little slack).
    fn wait<'a>(&'a self, held: &'a Held) -> BoxFuture<'a, ApprovalOutcome>;
    /// The client went away while its command was held.
    fn cancel<'a>(&'a self, held: &'a Held, reason: &'a str) -> BoxFuture<'a, ()>;
}

/// The hook used when no approval service is configured: refuses, naming what was needed.
pub struct NoApprovals;

impl ApprovalHook for NoApprovals {
    fn start<'a>(&'a self, req: &'a ApprovalRequest) -> BoxFuture<'a, HoldStart> {
        Box::pin(async move {
            HoldStart::Done(ApprovalOutcome::Refused {
                approval_id: String::new(),
                reason: format!(
                    "{} needs approval by group {} (policy {}), and this edge has no approval service configured",
                    req.action,
                    req.requirement.group,
                    req.policies.join(", ")
                ),
            })
        })
    }

    fn wait<'a>(&'a self, held: &'a Held) -> BoxFuture<'a, ApprovalOutcome> {
        Box::pin(async move {
            ApprovalOutcome::Refused {
                approval_id: held.approval_id.clone(),
                reason: "this edge has no approval service configured".into(),
            }
        })
    }

    fn cancel<'a>(&'a self, _: &'a Held, _: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// The requester's reason, from a `/* reason: … */` or `-- reason: …` comment in the text.
pub fn sql_reason(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let Some(at) = lower.find("reason:") else {
        return String::new();
    };
    // Only inside a comment that starts before it.
    let before = &lower[..at];
    let in_block = before
        .rfind("/*")
        .is_some_and(|o| before[o..].find("*/").is_none());
    let in_line = before
        .rfind("--")
        .is_some_and(|o| !before[o..].contains('\n'));
    if !in_block && !in_line {
        return String::new();
    }
    let rest = &text[at + "reason:".len()..];
    let end = rest
        .find("*/")
        .into_iter()
        .chain(rest.find('\n'))
        .min()
        .unwrap_or(rest.len());
    rest[..end].trim().chars().take(512).collect()
}

// ===== record ==================================================================================

/// Per-connection audit mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditMode {
    /// A command is forwarded only after its command-received event is acknowledged by the bus.
    Strict,
    /// Events are queued and published in the background.
    Async,
}

impl AuditMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditMode::Strict => "strict",
            AuditMode::Async => "async",
        }
    }

    pub fn of(conn: &Connection) -> Result<AuditMode, String> {
        match conn.options.get("audit_mode").map(String::as_str) {
            None | Some("strict") => Ok(AuditMode::Strict),
            Some("async") => Ok(AuditMode::Async),
            Some(other) => Err(format!(
                "connection {} has audit_mode={other:?}; use strict or async",
                conn.name
            )),
        }
    }
}

/// Publishes events. Strict publishes await the bus; the others go through an ordered
/// background queue that retries until the bus takes them (or the edge shuts down).
#[derive(Clone)]
pub struct Recorder {
    bus: Arc<dyn EventBus>,
    tx: mpsc::Sender<Event>,
    strict_timeout: Duration,
    /// Queued events not yet taken by the bus.
    outstanding: Arc<std::sync::atomic::AtomicUsize>,
    /// This edge's Prometheus metrics (`custos_edge_*`).
    pub metrics: Arc<custos_core::metrics::Metrics>,
}

impl Recorder {
    pub fn new(bus: Arc<dyn EventBus>, shutdown: watch::Receiver<bool>) -> Recorder {
        let (tx, mut rx) = mpsc::channel::<Event>(65_536);
        let b = bus.clone();
        let outstanding = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let left = outstanding.clone();
        tokio::spawn(async move {
            // Publish what is queued in batches of concurrent publishes: one at a time would cap
            // an edge at one bus round trip per event.
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < 512 {
                    match rx.try_recv() {
                        Ok(ev) => batch.push(ev),
                        Err(_) => break,
                    }
                }
                let sent = futures::future::join_all(
                    batch
                        .iter()
                        .map(|ev| publish_until_taken(&*b, ev, shutdown.clone())),
                )
                .await;
                left.fetch_sub(
                    sent.iter().filter(|ok| **ok).count(),
                    std::sync::atomic::Ordering::SeqCst,
                );
                if sent.iter().any(|ok| !ok) {
                    tracing::error!(
                        unpublished = sent.iter().filter(|ok| !**ok).count(),
                        "edge shutting down with unpublished audit events"
                    );
                    return;
                }
            }
        });
        let metrics = custos_core::metrics::Metrics::new();
        metrics.describe(
            "custos_edge_sessions_total",
            "counter",
            "Client sessions authenticated, by protocol.",
        );
        metrics.describe(
            "custos_edge_commands_total",
            "counter",
            "Commands judged, by protocol and verdict.",
        );
        metrics.describe(
            "custos_edge_bus_publish_seconds",
            "histogram",
            "Time for the bus to acknowledge a strict audit event.",
        );
        metrics.describe(
            "custos_edge_bus_publish_failures_total",
            "counter",
            "Strict audit events the bus did not take (the command was refused).",
        );
        Recorder {
            bus,
            tx,
            strict_timeout: Duration::from_secs(5),
            outstanding,
            metrics,
        }
    }

    /// Queued events the bus has not taken yet.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wait until every queued event is published, or `within` passes; returns what is left.
    pub async fn drain(&self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        while self.outstanding() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.outstanding()
    }

    /// Publish and wait for the bus's acknowledgement.
    pub async fn strict(&self, ev: &Event) -> Result<(), BusError> {
        let t = std::time::Instant::now();
        let r = match tokio::time::timeout(self.strict_timeout, self.bus.publish(ev)).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(BusError::Timeout {
                what: "acknowledgement of the audit event".into(),
                after: self.strict_timeout,
            }),
        };
        match &r {
            Ok(()) => self.metrics.observe(
                "custos_edge_bus_publish_seconds",
                &[],
                t.elapsed().as_secs_f64(),
            ),
            Err(_) => self
                .metrics
                .inc("custos_edge_bus_publish_failures_total", &[]),
        }
        r
    }

    /// Count a judged command (`custos_edge_commands_total`).
    pub fn count_command(&self, protocol: &str, verdict: &Verdict, approved: bool) {
        self.metrics.inc(
            "custos_edge_commands_total",
            &[("protocol", protocol), ("verdict", verdict.label(approved))],
        );
    }

    /// Queue for background publishing (ordered with other queued events).
    pub async fn later(&self, ev: Event) {
        self.outstanding
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.tx.send(ev).await.is_err() {
            self.outstanding
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            tracing::error!("audit queue closed; event dropped");
        }
    }

    /// Strict or queued, by mode.
    #[tracing::instrument(name = "record", level = "debug", skip_all,
        fields(audit_mode = mode.as_str(), otel.status_code = tracing::field::Empty))]
    pub async fn record(&self, mode: AuditMode, ev: Event) -> Result<(), BusError> {
        match mode {
            AuditMode::Strict => {
                let r = self.strict(&ev).await;
                if r.is_err() {
                    tracing::Span::current().record("otel.status_code", "ERROR");
                }
                r
            }
            AuditMode::Async => {
                self.later(ev).await;
                Ok(())
            }
        }
    }
}

/// Publish with back-off until the bus takes the event; false if shutdown came first.
async fn publish_until_taken(
    bus: &dyn EventBus,
    ev: &Event,
    mut shutdown: watch::Receiver<bool>,
) -> bool {
    let mut backoff = Duration::from_millis(50);
    loop {
        match bus.publish(ev).await {
            Ok(_) => return true,
            Err(e) => {
                tracing::warn!(error = %e, event = %ev.id, "audit event not yet published; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return false,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Build a command-received event.
pub fn command_received(
    origin: &Origin,
    command_id: &str,
    text: String,
    classifications: Vec<Classification>,
    verdict: &Verdict,
    parameters: Vec<String>,
) -> Event {
    origin.event(Payload::CommandReceived(CommandReceived {
        command_id: command_id.to_string(),
        text,
        classifications,
        verdict: verdict.pb() as i32,
        policies: verdict.policies.clone(),
        reason: verdict.reason.clone(),
        parameters,
        approval_id: String::new(),
    }))
}

/// Numeric connection options with defaults (`audit_rows`, `audit_bytes` …).
pub fn option_usize(conn: &Connection, key: &str, default: usize) -> usize {
    conn.options
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the runtime hands each session: the latest config and the shared services.
#[derive(Clone)]
pub struct Services {
    pub edge_id: String,
    pub config: watch::Receiver<Arc<EdgeConfig>>,
    pub policies: Arc<Policies>,
    pub auth: Authenticator,
    pub approvals: Arc<dyn ApprovalHook>,
    pub recorder: Recorder,
    pub masker: Arc<custos_core::mask::Masker>,
}

impl Services {
    pub fn config(&self) -> Arc<EdgeConfig> {
        self.config.borrow().clone()
    }

    /// Apply how a hold ended to the verdict, recording the use of a time-boxed grant.
    /// Returns the approval id and whether an approval or grant let the command through.
    pub async fn settle_approval(
        &self,
        mode: AuditMode,
        origin: &Origin,
        command_id: &str,
        verdict: &mut Verdict,
        out: ApprovalOutcome,
    ) -> (String, bool) {
        match out {
            ApprovalOutcome::Approved { approval_id, .. } => {
                verdict.outcome = Outcome::Allow;
                (approval_id, true)
            }
            ApprovalOutcome::Granted {
                grant_id,
                approval_id,
                kind,
                record,
            } => {
                verdict.outcome = Outcome::Allow;
                if record {
                    let used =
                        origin.event(Payload::GrantUsed(custos_core::proto::v1::GrantUsed {
                            grant_id,
                            approval_id: approval_id.clone(),
                            kind,
                            command_id: command_id.to_string(),
                            action: verdict.action.clone(),
                        }));
                    if let Err(e) = self.recorder.record(mode, used).await {
                        tracing::warn!(error = %e, "could not record a grant use");
                    }
                }
                (approval_id, true)
            }
            ApprovalOutcome::Refused {
                approval_id,
                reason,
            } => {
                verdict.outcome = Outcome::Deny;
                verdict.reason = reason;
                (approval_id, false)
            }
        }
    }
}

/// The refusal for a held command on a connection that does not wait (`approval_wait=refuse`).
pub fn refused_at_once(verdict: &Verdict, held: &Held, connection: &str) -> ApprovalOutcome {
    ApprovalOutcome::Refused {
        reason: format!(
            "{} needs approval {} and connection {connection} does not wait (approval_wait=refuse); run the same command again once it is approved",
            verdict.action, held.approval_id
        ),
        approval_id: held.approval_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_comes_only_from_a_comment() {
        assert_eq!(
            sql_reason("/* reason: ticket OPS-42 */ DELETE FROM t WHERE id = 1"),
            "ticket OPS-42"
        );
        assert_eq!(
            sql_reason("DELETE FROM t WHERE id = 1 -- Reason: cleanup\n"),
            "cleanup"
        );
        // In a string literal it is data, not a reason.
        assert_eq!(sql_reason("UPDATE t SET note = 'reason: none'"), "");
        assert_eq!(sql_reason("DELETE FROM t"), "");
        // Closed comment before: not inside a comment.
        assert_eq!(sql_reason("/* x */ SELECT 'reason: y'"), "");
    }

    #[test]
    fn the_notice_names_the_id_the_group_the_command_and_the_deadline() {
        let h = Held {
            approval_id: "0193-x".into(),
            approver_group: "dba".into(),
            quorum: 2,
            expires_unix_nano: 1_800_000_000_000_000_000,
        };
        let n = h.notice("sql:delete", "prod-pg");
        assert!(n.contains("sql:delete on prod-pg is waiting for approval 0193-x"));
        assert!(n.contains("2 approvals from group dba"));
        assert!(n.contains("2027-01-15T08:00:00Z"));
        assert!(n.contains("custos approvals approve 0193-x"));
    }
}
