//! The HTTP listener (18080): HTTP APIs, LLM APIs and MCP servers through the same pipeline as
//! Postgres.
//!
//! ```text
//!  client ──▶ route (Host option, else /<connection>/…) ──▶ authenticate (Bearer / x-api-key:
//!  custos token or OIDC JWT; removed) ──▶ classify (http:METHOD · llm:chat|embeddings · mcp:call|list)
//!  ──▶ authorize (Cedar) ──▶ hold for approval ──▶ record command_received (strict: bus ack)
//!  ──▶ forward with the connection's credential ──▶ response masked as it streams
//!      (JSON by field path and detectors · SSE, LLM deltas across events · text) ──▶ record completion
//! ```
//!
//! Denials are `403 application/problem+json` (RFC 9457) naming the policy; for MCP they are
//! JSON-RPC errors. Hop-by-hop headers (RFC 9110 §7.6.1) are not forwarded either way.

pub mod classify;
mod respond;
pub mod tunnel;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use custos_core::events::{new_id, Origin};
use custos_core::mask::Stats;
use custos_core::proto::v1::{
    event::Payload, Classification, Connection, SessionEnded, SessionStarted, Verdict as PbVerdict,
};
use http_body_util::combinators::BoxBody;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::field::Empty;
use tracing::Instrument as _;

use crate::pipeline::{
    command_received, ActionRequest, ApprovalHook, ApprovalRequest, AuditMode, Held, HoldStart,
    Identity, Outcome, Services, Verdict,
};
use classify::{Judged, McpMessage};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;
type Upstream = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Listener settings.
#[derive(Clone)]
pub struct HttpOptions {
    /// Terminate TLS with this configuration; plain HTTP when `None`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Largest request body accepted (413 beyond).
    pub max_body: usize,
    /// A client must send its request headers within this (slow-loris guard; 408 beyond).
    pub header_timeout: Duration,
    /// …and its request body within this.
    pub body_timeout: Duration,
    /// How long the upstream may take to send response headers.
    pub upstream_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            tls: None,
            max_body: 10 << 20,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            upstream_timeout: Duration::from_secs(300),
        }
    }
}

/// The HTTP side of an edge.
pub struct HttpEdge {
    svc: Services,
    opts: HttpOptions,
    client: Upstream,
}

/// One client connection; a session in the audit log once a request authenticated.
struct ConnSession {
    id: String,
    peer: SocketAddr,
    tls: bool,
    started: Mutex<Option<(Origin, Instant)>>,
    commands: AtomicU64,
    denied: AtomicU64,
}

impl HttpEdge {
    pub fn new(svc: Services, opts: HttpOptions) -> Result<Arc<HttpEdge>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Upstream sockets without Nagle's delay: a request whose head and body go out in two
        // writes must not wait for the upstream's delayed ACK (the client side already sets it).
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)
            .map_err(|e| format!("cannot load the system's CA certificates: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Arc::new(HttpEdge { svc, opts, client }))
    }

    /// Accept clients until `shutdown` fires.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.changed() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "http accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let edge = self.clone();
            tokio::spawn(async move { edge.connection(tcp, peer).await });
        }
    }

    async fn connection(self: Arc<Self>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
        let sess = Arc::new(ConnSession {
            id: new_id(),
            peer,
            tls: self.opts.tls.is_some(),
            started: Mutex::new(None),
            commands: AtomicU64::new(0),
            denied: AtomicU64::new(0),
        });
        let io: crate::pg::upstream::BoxIo = match &self.opts.tls {
            Some(cfg) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
                match tokio::time::timeout(self.opts.header_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => Box::new(s),
                    _ => return,
                }
            }
            None => Box::new(tcp),
        };
        let edge = self.clone();
        let s2 = sess.clone();
        let service = hyper::service::service_fn(move |req| {
            let edge = edge.clone();
            let sess = s2.clone();
            async move {
                // One span per request, up to the response headers (the path and query are
                // left out: they can carry data).
                let span = tracing::debug_span!(
                    "http.request",
                    otel.kind = "server",
                    http.request.method = req.method().as_str(),
                    client.address = %sess.peer,
                    protocol = Empty,
                    connection = Empty,
                    identity = Empty,
                    session_id = sess.id.as_str(),
                    command_id = Empty,
                    action = Empty,
                    verdict = Empty,
                    approval_id = Empty,
                    http.response.status_code = Empty,
                    otel.status_code = Empty,
                );
                let resp = edge.handle(sess, req).instrument(span.clone()).await;
                span.record("http.response.status_code", resp.status().as_u16());
                if resp.status().is_server_error() {
                    span.record("otel.status_code", "ERROR");
                }
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.opts.header_timeout)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        if let Err(e) = conn.await {
            tracing::debug!(peer = %peer, error = %e, "http connection ended with an error");
        }
        let started = sess.started.lock().take();
        if let Some((origin, at)) = started {
            let ev = origin.event(Payload::SessionEnded(SessionEnded {
                reason: "client_closed".into(),
                duration_ms: at.elapsed().as_millis() as u64,
                commands: sess.commands.load(Ordering::Relaxed),
                denied: sess.denied.load(Ordering::Relaxed),
                error: String::new(),
            }));
            self.svc.recorder.later(ev).await;
        }
    }

    /// The session's origin for this identity and connection, starting the session on first use.
    async fn origin(&self, sess: &ConnSession, who: &Identity, conn: &Connection) -> Origin {
        let origin = Origin {
            edge_id: self.svc.edge_id.clone(),
            session_id: sess.id.clone(),
            identity: who.subject.clone(),
            connection: conn.name.clone(),
        };
        let first = {
            let mut s = sess.started.lock();
            if s.is_none() {
                *s = Some((origin.clone(), Instant::now()));
                true
            } else {
                false
            }
        };
        if first {
            self.svc.recorder.metrics.inc(
                "custos_edge_sessions_total",
                &[("protocol", conn.kind.as_str())],
            );
            let ev = origin.event(Payload::SessionStarted(SessionStarted {
                protocol: conn.kind.clone(),
                client_addr: sess.peer.to_string(),
                groups: who.groups.clone(),
                auth_method: who.method.to_string(),
                client_name: String::new(),
                tls: sess.tls,
            }));
            self.svc.recorder.later(ev).await;
        }
        origin
    }

    async fn handle(
        self: Arc<Self>,
        sess: Arc<ConnSession>,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let cfg = self.svc.config();
        if !cfg.synced {
            return respond::problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "not-synced",
                "The edge has no configuration yet",
                &format!(
                    "custos edge {} has not received its configuration from the control plane, so it lets nobody in; check that the control plane is reachable and retry",
                    self.svc.edge_id
                ),
                json!({}),
            );
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let Some(routed) =
            classify::route(cfg.connections.values(), host.as_deref(), req.uri().path())
        else {
            return respond::problem(
                StatusCode::NOT_FOUND,
                "no-connection",
                "No connection serves this request",
                &format!(
                    "no http, llm or mcp connection matches {}; request /<connection>/<path>, or set the connection's host option (`custos connection list` shows the names)",
                    req.uri().path()
                ),
                json!({}),
            );
        };
        let Some(conn) = cfg.connections.get(&routed.connection).cloned() else {
            return respond::problem(
                StatusCode::NOT_FOUND,
                "no-connection",
                "No such connection",
                "the connection was just removed",
                json!({}),
            );
        };
        {
            let span = tracing::Span::current();
            span.record("connection", conn.name.as_str());
            span.record("protocol", conn.kind.as_str());
        }
        // Who is asking. (The refusal's origin and text are built only when one is recorded.)
        let anonymous = || Origin {
            edge_id: self.svc.edge_id.clone(),
            session_id: sess.id.clone(),
            identity: String::new(),
            connection: conn.name.clone(),
        };
        let req_method = req.method().clone();
        let request_line = || format!("{req_method} {}", routed.path);
        let audit_mode = AuditMode::of(&conn).unwrap_or(AuditMode::Strict);
        let Some(token) = respond::client_token(req.headers(), &conn) else {
            let why = "no token: send `Authorization: Bearer <custos token or OIDC JWT>`";
            self.record_refusal(
                &anonymous(),
                audit_mode,
                &request_line(),
                "auth:failed",
                why,
            )
            .await;
            return respond::unauthorized(why);
        };
        let who = match self.svc.auth.identify(&cfg, &token).await {
            Ok(w) => w,
            Err(e) => {
                tracing::info!(peer = %sess.peer, reason = %e, "http client authentication failed");
                let why = format!("authentication failed: {e}");
                self.record_refusal(
                    &anonymous(),
                    audit_mode,
                    &request_line(),
                    "auth:failed",
                    &why,
                )
                .await;
                return respond::unauthorized(&e.to_string());
            }
        };
        drop(token);
        tracing::Span::current().record("identity", who.subject.as_str());
        let origin = self.origin(&sess, &who, &conn).await;
        let mut req = req;
        let upgrade = if respond::is_upgrade(req.headers()) {
            if conn.kind != "http" {
                return respond::problem(
                    StatusCode::NOT_IMPLEMENTED,
                    "upgrade-unsupported",
                    "Protocol upgrades are relayed for http connections only",
                    &format!("connection {} is of kind {}; WebSocket and other upgrades pass through http connections", conn.name, conn.kind),
                    json!({}),
                );
            }
            Some(hyper::upgrade::on(&mut req))
        } else {
            None
        };
        let websocket = upgrade.is_some() && respond::is_websocket(req.headers());
        let mode = match AuditMode::of(&conn) {
            Ok(m) => m,
            Err(e) => {
                return respond::problem(
                    StatusCode::BAD_GATEWAY,
                    "bad-connection",
                    "Misconfigured connection",
                    &e,
                    json!({}),
                )
            }
        };
        let (parts, body) = req.into_parts();
        let body = match respond::read_body(body, self.opts.max_body, self.opts.body_timeout).await
        {
            Ok(b) => b,
            Err(e) => {
                let (status, slug, title, detail) = match e {
                    respond::BodyError::TooLarge => (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body-too-large",
                        "Request body too large",
                        format!(
                            "the request body exceeds {} bytes, the edge's limit",
                            self.opts.max_body
                        ),
                    ),
                    respond::BodyError::Timeout => (
                        StatusCode::REQUEST_TIMEOUT,
                        "body-timeout",
                        "Request body too slow",
                        format!(
                            "the request body did not arrive within {:?}",
                            self.opts.body_timeout
                        ),
                    ),
                    respond::BodyError::Read(e) => (
                        StatusCode::BAD_REQUEST,
                        "bad-body",
                        "Unreadable request body",
                        format!("the request body could not be read: {e}"),
                    ),
                };
                sess.denied.fetch_add(1, Ordering::Relaxed);
                let request_line = format!("{} {}", parts.method, routed.path);
                self.record_refusal(&origin, mode, &request_line, "http:refused", &detail)
                    .await;
                return respond::problem(status, slug, title, &detail, json!({}));
            }
        };
        let method = parts.method.as_str().to_string();
        let query = parts.uri.query().unwrap_or("").to_string();
        // Classify.
        let mut mcp: Vec<McpMessage> = Vec::new();
        let judged: Vec<Judged> = match conn.kind.as_str() {
            "llm" => match classify::classify_llm(&method, &routed.path, &body) {
                Ok(r) => {
                    let detectors: Vec<String> = {
                        let mut d: Vec<String> = self
                            .svc
                            .masker
                            .find(&r.prompt)
                            .iter()
                            .map(|f| f.detector.name().to_string())
                            .collect();
                        d.sort();
                        d.dedup();
                        d
                    };
                    let mut text = format!("{method} {} model={}", routed.path, r.model);
                    if !r.prompt.is_empty() {
                        text.push('\n');
                        text.push_str(&respond::cap(&r.prompt, 64 * 1024));
                    }
                    vec![Judged {
                        action: r.action.to_string(),
                        context: classify::llm_context(&r, detectors),
                        text,
                    }]
                }
                Err(e) => {
                    return respond::problem(
                        StatusCode::BAD_REQUEST,
                        "bad-llm-request",
                        "Request not understood",
                        &e,
                        json!({}),
                    )
                }
            },
            "mcp" if parts.method == Method::POST => match classify::parse_mcp(&body) {
                Ok(m) => {
                    mcp = m;
                    mcp.iter()
                        .map(|m| Judged {
                            action: m.action().to_string(),
                            context: classify::mcp_context(m),
                            text: if m.method == "tools/call" {
                                format!(
                                    "tools/call {} {}",
                                    m.tool,
                                    respond::cap(&m.arguments, 64 * 1024)
                                )
                            } else {
                                m.method.clone()
                            },
                        })
                        .collect()
                }
                Err(e) => {
                    let code = if e.starts_with("parse error") {
                        -32700
                    } else {
                        -32600
                    };
                    self.record_refusal(
                        &origin,
                        mode,
                        &format!("{method} {}", routed.path),
                        "mcp:invalid",
                        &e,
                    )
                    .await;
                    sess.denied.fetch_add(1, Ordering::Relaxed);
                    return respond::jsonrpc_error(
                        StatusCode::BAD_REQUEST,
                        &serde_json::Value::Null,
                        code,
                        &format!("custos: {e}"),
                        json!({}),
                    );
                }
            },
            "mcp" => vec![Judged {
                action: "mcp:list".into(),
                context: classify::mcp_context(&McpMessage {
                    id: None,
                    method: String::new(),
                    tool: String::new(),
                    arguments: String::new(),
                }),
                text: format!("{method} {}", routed.path),
            }],
            _ => vec![classify::classify_http(
                &conn,
                &method,
                &routed.path,
                &query,
                classify::policy_headers(&conn, &parts.headers),
            )],
        };
        // Authorize.
        let actions: Vec<ActionRequest<'_>> = judged
            .iter()
            .enumerate()
            .map(|(i, j)| ActionRequest {
                action: &j.action,
                context: j.context.clone(),
                index: i,
            })
            .collect();
        let mut verdict = self.svc.policies.decide(&cfg, &who, &conn, &actions);
        let text = judged
            .iter()
            .map(|j| j.text.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let mut audit_stats = Stats::default();
        let masked_text = self
            .svc
            .masker
            .audit_scope()
            .mask_text(&text, &mut audit_stats)
            .into_owned();
        let classifications: Vec<Classification> = judged
            .iter()
            .enumerate()
            .map(|(i, j)| Classification {
                action: j.action.clone(),
                resources: mcp
                    .get(i)
                    .filter(|m| !m.tool.is_empty())
                    .map(|m| vec![m.tool.clone()])
                    .unwrap_or_default(),
                functions: vec![],
                has_where: false,
                parsed: true,
                statement_index: i as u32,
            })
            .collect();
        let command_id = new_id();
        // Hold for approval.
        let mut approval_id = String::new();
        let mut approved = false;
        if let Outcome::Approval(requirement) = &verdict.outcome {
            let refuse_now = conn
                .options
                .get("approval_wait")
                .is_some_and(|v| v == "refuse");
            let areq = ApprovalRequest {
                origin: origin.clone(),
                groups: who.groups.clone(),
                command_id: command_id.clone(),
                text: masked_text.clone(),
                classifications: classifications.clone(),
                action: verdict.action.clone(),
                policies: verdict.policies.clone(),
                requirement: requirement.clone(),
                reason: parts
                    .headers
                    .get("x-custos-reason")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .chars()
                    .take(512)
                    .collect(),
                refuse_now,
            };
            let hook = self.svc.approvals.clone();
            let hold = tracing::debug_span!(
                "approval.hold",
                group = requirement.group.as_str(),
                approval_id = Empty,
                outcome = Empty
            );
            let out = match hook.start(&areq).instrument(hold.clone()).await {
                HoldStart::Done(o) => o,
                HoldStart::Held(held) if refuse_now => {
                    crate::pipeline::refused_at_once(&verdict, &held, &conn.name)
                }
                HoldStart::Held(held) => {
                    hold.record("approval_id", held.approval_id.as_str());
                    // If the client goes away, hyper drops this future: the guard cancels.
                    let mut guard = CancelOnDrop {
                        hook: hook.clone(),
                        held: Some(held.clone()),
                    };
                    let o = hook.wait(&held).instrument(hold.clone()).await;
                    guard.held = None;
                    o
                }
            };
            (approval_id, approved) = self
                .svc
                .settle_approval(mode, &origin, &command_id, &mut verdict, out)
                .instrument(hold.clone())
                .await;
            hold.record("outcome", verdict.label(approved));
            if !approval_id.is_empty() {
                hold.record("approval_id", approval_id.as_str());
            }
        }
        {
            let span = tracing::Span::current();
            span.record("command_id", command_id.as_str());
            span.record("action", verdict.action.as_str());
            span.record("verdict", verdict.label(approved));
            if !approval_id.is_empty() {
                span.record("approval_id", approval_id.as_str());
            }
        }
        // Record the command (strict: acknowledged before anything is forwarded).
        let mut ev = command_received(
            &origin,
            &command_id,
            masked_text,
            classifications,
            &verdict,
            vec![],
        );
        if let Some(Payload::CommandReceived(c)) = ev.payload.as_mut() {
            c.approval_id = approval_id.clone();
            if approved {
                c.verdict = PbVerdict::Approved as i32;
            }
        }
        self.svc
            .recorder
            .count_command(&conn.kind, &verdict, approved);
        let recorded = self.svc.recorder.record(mode, ev).await;
        sess.commands.fetch_add(1, Ordering::Relaxed);
        if verdict.outcome == Outcome::Deny {
            sess.denied.fetch_add(1, Ordering::Relaxed);
            return self.denied(&conn, &verdict, &command_id, &approval_id, &mcp);
        }
        if let Err(e) = recorded {
            return respond::problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit-unavailable",
                "Not forwarded: the audit bus is unavailable",
                &format!("connection {} records strictly and the audit bus did not take the record ({e}); retry when it is back", conn.name),
                json!({"command_id": command_id}),
            );
        }
        // Forward.
        let started = Instant::now();
        let upstream_req =
            match respond::upstream_request(&conn, &parts, &routed.path, &query, body) {
                Ok(mut r) => {
                    if upgrade.is_some() {
                        // The upgrade itself is hop-by-hop, but it is what this request is for.
                        for h in [header::CONNECTION, header::UPGRADE] {
                            if let Some(v) = parts.headers.get(&h) {
                                r.headers_mut().insert(h, v.clone());
                            }
                        }
                        // Compressed frames could not be transcribed: offer no extensions.
                        if websocket {
                            r.headers_mut().remove(header::SEC_WEBSOCKET_EXTENSIONS);
                        }
                    }
                    r
                }
                Err(e) => {
                    return self
                        .fail_forward(
                            &origin,
                            &command_id,
                            started,
                            StatusCode::BAD_GATEWAY,
                            "bad-connection",
                            "Misconfigured connection",
                            e,
                        )
                        .await;
                }
            };
        let upstream = tracing::debug_span!(
            "upstream",
            otel.kind = "client",
            http.response.status_code = Empty,
            otel.status_code = Empty,
        );
        let sent = tokio::time::timeout(
            self.opts.upstream_timeout,
            self.client.request(upstream_req),
        )
        .instrument(upstream.clone())
        .await;
        match &sent {
            Ok(Ok(r)) => {
                upstream.record("http.response.status_code", r.status().as_u16());
            }
            _ => {
                upstream.record("otel.status_code", "ERROR");
            }
        }
        drop(upstream);
        let resp = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let why = format!(
                    "upstream of connection {} cannot be reached: {}",
                    conn.name,
                    respond::error_chain(&e)
                );
                return self
                    .fail_forward(
                        &origin,
                        &command_id,
                        started,
                        StatusCode::BAD_GATEWAY,
                        "upstream-unreachable",
                        "Upstream unreachable",
                        why,
                    )
                    .await;
            }
            Err(_) => {
                let why = format!(
                    "upstream of connection {} sent no response within {:?}",
                    conn.name, self.opts.upstream_timeout
                );
                return self
                    .fail_forward(
                        &origin,
                        &command_id,
                        started,
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream-timeout",
                        "Upstream timed out",
                        why,
                    )
                    .await;
            }
        };
        if let Some(client_side) = upgrade {
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                // The upstream's text messages are masked for the caller's scope.
                let scope = self.svc.masker.scope(&conn.name, &who.groups);
                let mask = (!scope.is_clear()).then(|| scope.stream());
                return self.upgraded(
                    resp,
                    client_side,
                    websocket,
                    mask,
                    origin,
                    command_id,
                    started,
                );
            }
        }
        let tools_list: Vec<serde_json::Value> = mcp
            .iter()
            .filter(|m| m.method == "tools/list")
            .filter_map(|m| m.id.clone())
            .collect();
        let filter = if tools_list.is_empty() {
            None
        } else {
            let edge = self.clone();
            let who = who.clone();
            let conn2 = conn.clone();
            Some(
                Box::new(move |tool: &str| edge.may_call(&who, &conn2, tool))
                    as Box<dyn Fn(&str) -> bool + Send>,
            )
        };
        let scope_groups = who.groups.clone();
        let edge = self.clone();
        let done_origin = origin.clone();
        let done_id = command_id.clone();
        respond::relay_response(
            resp,
            respond::Rewrite {
                masker: self.svc.masker.clone(),
                connection: conn.clone(),
                groups: scope_groups,
                tools_list,
                may_call: filter,
            },
            Box::new(
                move |status: u16,
                      error: Option<String>,
                      captured: respond::Captured,
                      stats: Stats| {
                    Box::pin(async move {
                        edge.complete(
                            &done_origin,
                            &done_id,
                            started,
                            status,
                            error,
                            captured,
                            stats,
                        )
                        .await;
                    }) as futures::future::BoxFuture<'static, ()>
                },
            ),
        )
        .await
    }

    /// The upstream switched protocols (WebSocket …): answer 101 and relay bytes both ways,
    /// recording what went each way (a WebSocket's messages, see [`tunnel`]) when it closes.
    /// With `mask`, a WebSocket upstream's text messages reach the client masked.
    #[allow(clippy::too_many_arguments)]
    fn upgraded(
        self: &Arc<Self>,
        mut resp: Response<Incoming>,
        client_side: hyper::upgrade::OnUpgrade,
        websocket: bool,
        mask: Option<custos_core::mask::StreamMasker>,
        origin: Origin,
        command_id: String,
        started: Instant,
    ) -> Response<Body> {
        let upstream_side = hyper::upgrade::on(&mut resp);
        // Read frames only when the upstream switched to a WebSocket, not to another protocol
        // the client also offered.
        let websocket = websocket && respond::is_websocket(resp.headers());
        let (parts, _) = resp.into_parts();
        let edge = self.clone();
        tokio::spawn(async move {
            let (c, u) = match tokio::try_join!(client_side, upstream_side) {
                Ok(x) => x,
                Err(e) => {
                    let why = format!("the upgrade did not complete: {e}");
                    edge.complete(
                        &origin,
                        &command_id,
                        started,
                        101,
                        Some(why),
                        respond::Captured::default(),
                        Stats::default(),
                    )
                    .await;
                    return;
                }
            };
            let out = tunnel::relay(TokioIo::new(c), TokioIo::new(u), websocket, mask).await;
            let cap = respond::Captured {
                head: out.record,
                tail: Vec::new(),
                bytes: out.from_upstream,
                truncated: out.truncated,
                llm: false,
            };
            edge.complete(
                &origin,
                &command_id,
                started,
                101,
                out.error,
                cap,
                out.stats,
            )
            .await;
        });
        let mut r = Response::new(respond::empty());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *r.headers_mut() = parts.headers;
        r
    }

    /// A command that was recorded but could not be forwarded: record its completion with the
    /// reason, and answer with a problem document naming it.
    #[allow(clippy::too_many_arguments)]
    async fn fail_forward(
        &self,
        origin: &Origin,
        command_id: &str,
        started: Instant,
        status: StatusCode,
        slug: &str,
        title: &str,
        why: String,
    ) -> Response<Body> {
        self.complete(
            origin,
            command_id,
            started,
            0,
            Some(why.clone()),
            respond::Captured::default(),
            Stats::default(),
        )
        .await;
        respond::problem(status, slug, title, &why, json!({"command_id": command_id}))
    }

    /// Whether `who` may call `tool` on `conn` (for filtering tools/list).
    fn may_call(&self, who: &Identity, conn: &Connection, tool: &str) -> bool {
        let cfg = self.svc.config();
        let m = McpMessage {
            id: None,
            method: "tools/call".into(),
            tool: tool.to_string(),
            arguments: String::new(),
        };
        let v = self.svc.policies.decide(
            &cfg,
            who,
            conn,
            &[ActionRequest {
                action: "mcp:call",
                context: classify::mcp_context(&m),
                index: 0,
            }],
        );
        v.outcome != Outcome::Deny
    }

    fn denied(
        &self,
        conn: &Connection,
        verdict: &Verdict,
        command_id: &str,
        approval_id: &str,
        mcp: &[McpMessage],
    ) -> Response<Body> {
        let detail = format!("custos: permission denied: {}", verdict.reason);
        let extra = json!({
            "policies": verdict.policies,
            "command_id": command_id,
            "approval_id": if approval_id.is_empty() { serde_json::Value::Null } else { json!(approval_id) },
        });
        if conn.kind == "mcp" && !mcp.is_empty() {
            let id = mcp
                .iter()
                .find_map(|m| m.id.clone())
                .unwrap_or(serde_json::Value::Null);
            return respond::jsonrpc_error(StatusCode::OK, &id, -32001, &detail, extra);
        }
        respond::problem(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden by policy",
            &detail,
            extra,
        )
    }

    async fn record_refusal(
        &self,
        origin: &Origin,
        mode: AuditMode,
        text: &str,
        action: &str,
        reason: &str,
    ) {
        let v = Verdict {
            outcome: Outcome::Deny,
            policies: vec![],
            reason: reason.to_string(),
            action: action.to_string(),
        };
        let ev = command_received(origin, &new_id(), text.to_string(), vec![], &v, vec![]);
        let _ = self.svc.recorder.record(mode, ev).await;
    }

    #[allow(clippy::too_many_arguments)]
    async fn complete(
        &self,
        origin: &Origin,
        command_id: &str,
        started: Instant,
        status: u16,
        error: Option<String>,
        captured: respond::Captured,
        stats: Stats,
    ) {
        let mut audit = Stats::default();
        let excerpt_raw = String::from_utf8_lossy(&captured.head).into_owned();
        let excerpt = self
            .svc
            .masker
            .audit_scope()
            .mask_text(&excerpt_raw, &mut audit)
            .into_owned();
        let usage = if captured.llm {
            respond::llm_usage(&captured.head, &captured.tail)
        } else {
            (String::new(), 0, 0)
        };
        let ev = origin.event(Payload::CommandCompleted(
            custos_core::proto::v1::CommandCompleted {
                command_id: command_id.to_string(),
                duration_us: started.elapsed().as_micros() as u64,
                rows: 0,
                bytes: captured.bytes,
                masked_values: stats.total(),
                error: error.unwrap_or_default(),
                result_excerpt: excerpt,
                result_truncated: captured.truncated,
                status: status as u32,
                model: usage.0,
                input_tokens: usage.1,
                output_tokens: usage.2,
            },
        ));
        self.svc.recorder.later(ev).await;
    }
}

/// Cancels a held request when the waiting client goes away (the future is dropped).
struct CancelOnDrop {
    hook: Arc<dyn ApprovalHook>,
    held: Option<Held>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.held.take() {
            let hook = self.hook.clone();
            tokio::spawn(async move {
                hook.cancel(&h, "the client disconnected while waiting")
                    .await;
            });
        }
    }
}
