//! The gRPC services: Admin, Audit, EdgeSync, Cluster and the internal Raft transport.
//!
//! Every handler authenticates first ([`Inner::authorize`]); errors map once, here, to gRPC
//! statuses whose messages say what to do next.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use custos_proto::v1::{
    self as pb, admin_server::Admin, audit_server::Audit, cluster_server::Cluster,
    edge_sync_server::EdgeSync, event::Payload, raft_server, Event,
};
use futures::Stream;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use prost::Message;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response as TResponse, Status};

use crate::network::MAX_MESSAGE;
use crate::node::{Inner, WriteError};
use crate::store::{connection_to_proto, StateChange};
use crate::types::{Command, Response, StoredConnection, StoredToken, TypeConfig};

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Who a bearer token turned out to be.
#[derive(Debug, Clone)]
pub struct Caller {
    pub subject: String,
    /// Groups from the caller's token (none for the bootstrap admin token).
    pub groups: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Need {
    Admin,
    Edge,
    Cluster,
    /// List, watch and decide approvals: the `approver` (or `admin`) role.
    Approver,
}

fn bearer<T>(req: &Request<T>) -> Option<String> {
    let v = req.metadata().get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(|s| s.trim().to_string())
}

impl Inner {
    /// Refuse reads of the replicated state while a snapshot install has it part loaded: an
    /// answer then would show records or connections missing that are not missing.
    fn whole_state(&self) -> Result<(), Status> {
        if self.store.installing_snapshot() {
            return Err(Status::unavailable(format!(
                "node {} is installing a Raft snapshot from the leader, so its copy of the log and \
                 configuration is part loaded; retry in a few seconds or ask another node",
                self.id
            )));
        }
        Ok(())
    }

    pub(crate) fn authorize<T>(&self, req: &Request<T>, need: Need) -> Result<Caller, Status> {
        let Some(token) = bearer(req) else {
            return Err(Status::unauthenticated(
                "missing bearer token: pass --token or set CUSTOS_TOKEN (the admin token of `custos dev` is in <data-dir>/admin.token)",
            ));
        };
        let h = custos_core::token::hash(&token);
        if need == Need::Cluster {
            if custos_core::token::hashes_equal(&h, &custos_core::token::hash(&self.cluster_secret))
            {
                return Ok(Caller {
                    subject: "cluster".into(),
                    groups: vec![],
                });
            }
            return Err(Status::unauthenticated(
                "bad cluster secret: every node needs the same cluster_secret_file",
            ));
        }
        if custos_core::token::hashes_equal(&h, &self.admin_token_hash) {
            return Ok(Caller {
                subject: "admin".into(),
                groups: vec![],
            });
        }
        let invalid = || {
            Status::unauthenticated("token is not valid here: it is unknown, revoked or expired; issue a new one with `custos token issue`")
        };
        let id = custos_core::token::parse(&token).map_err(|_| invalid())?;
        let t = self.store.token(id).ok_or_else(invalid)?;
        if t.revoked
            || t.expires_unix_nano < custos_core::events::now_unix_nano()
            || !custos_core::token::hashes_equal(&h, &t.sha256)
        {
            return Err(invalid());
        }
        let role = match need {
            Need::Edge => "edge",
            Need::Approver => "approver",
            _ => "admin",
        };
        let ok = t.roles.iter().any(|r| r == "admin" || r == role);
        if !ok {
            return Err(Status::permission_denied(format!(
                "token of {} lacks the {role} role for this call",
                t.subject,
            )));
        }
        Ok(Caller {
            subject: t.subject,
            groups: t.groups,
        })
    }

    fn origin_event(&self, identity: &str, connection: &str, payload: Payload) -> Vec<u8> {
        let origin = custos_core::events::Origin {
            edge_id: format!("controlplane-{}", self.id),
            session_id: String::new(),
            identity: identity.to_string(),
            connection: connection.to_string(),
        };
        origin.event(payload).encode_to_vec()
    }

    /// Wait (up to 5 s) until this node's state machine reached `revision`.
    pub(crate) async fn wait_applied(&self, revision: u64) {
        self.wait_until(|| self.store.revision() >= revision).await
    }

    /// Wait (up to 5 s) until `done` holds: a write committed through the leader is applied on
    /// this node a moment later.
    pub(crate) async fn wait_until(&self, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub(crate) async fn commit(&self, cmd: Command) -> Result<Response, Status> {
        self.write(cmd).await.map_err(|e| match e {
            WriteError::NoLeader | WriteError::Forward { .. } => Status::unavailable(e.to_string()),
            WriteError::Raft(_) => Status::internal(e.to_string()),
        })
    }
}

/// A service wrapper; one struct implements every service.
#[derive(Clone)]
pub(crate) struct Svc(pub Arc<Inner>);

pub(crate) async fn serve(
    inner: Arc<Inner>,
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let svc = Svc(inner);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = match builder.tls_config(tls) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "invalid TLS configuration; gRPC server not started");
                return;
            }
        };
    }
    // Small replies must not wait for a delayed ACK (Nagle): that added ~40 ms to every call.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |s| {
            if let Ok(s) = &s {
                let _ = s.set_nodelay(true);
            }
            s
        },
    );
    let res = builder
        .trace_fn(grpc_span)
        .add_service(pb::admin_server::AdminServer::new(svc.clone()))
        .add_service(
            pb::audit_server::AuditServer::new(svc.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(pb::edge_sync_server::EdgeSyncServer::new(svc.clone()))
        .add_service(pb::approvals_server::ApprovalsServer::new(svc.clone()))
        .add_service(pb::cluster_server::ClusterServer::new(svc.clone()))
        .add_service(
            raft_server::RaftServer::new(svc)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "gRPC server stopped");
    }
}

/// One span per gRPC call (`grpc.request`, with the method), except node-to-node Raft traffic:
/// heartbeats several times a second would drown everything else. The caller's metadata (its
/// bearer token) is not looked at.
fn grpc_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let path = req.uri().path();
    if path.starts_with("/custos.v1.Raft/") {
        return tracing::Span::none();
    }
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("", path));
    tracing::debug_span!(
        "grpc.request",
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
    )
}

// ===== Admin =================================================================================

const KINDS: &[&str] = &[
    "postgres",
    "mysql",
    "ssh",
    "kubernetes",
    "http",
    "llm",
    "mcp",
];

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[tonic::async_trait]
impl Admin for Svc {
    async fn apply_policy(
        &self,
        req: Request<pb::ApplyPolicyRequest>,
    ) -> Result<TResponse<pb::PolicySet>, Status> {
        let caller = self.0.authorize(&req, Need::Admin)?;
        let r = req.into_inner();
        let validated = custos_core::policy::validate(&r.text).map_err(|e| {
            Status::invalid_argument(format!(
                "policy rejected; the previous version stays in force:\n{e}"
            ))
        })?;
        custos_core::authz::check_annotations(&validated.set).map_err(|errs| {
            Status::invalid_argument(format!(
                "policy rejected; the previous version stays in force:\n{}",
                errs.join("\n")
            ))
        })?;
        let next = self.0.store.policy(0).map(|p| p.version).unwrap_or(0) + 1;
        let event = self.0.origin_event(
            &caller.subject,
            "",
            Payload::PolicyApplied(pb::PolicyApplied {
                version: next,
                sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(r.text.as_bytes())),
                policies: validated.count as u32,
                description: r.description.clone(),
            }),
        );
        let cmd = Command::ApplyPolicy {
            text: r.text,
            description: r.description,
            author: caller.subject,
            expected_version: r.expected_version,
            applied_unix_nano: custos_core::events::now_unix_nano(),
            event,
        };
        match self.0.commit(cmd).await? {
            Response::PolicyVersion(v) => {
                // Committed through the leader: this node may apply it a moment later.
                self.0.wait_until(|| self.0.store.policy(v).is_some()).await;
                self.0
                    .store
                    .policy(v)
                    .map(TResponse::new)
                    .ok_or_else(|| Status::unavailable("the policy was applied, but this node has not caught up yet; read it with `custos policy get`"))
            }
            Response::VersionConflict { current } => Err(Status::failed_precondition(format!(
                "policy version is {current}, not the expected one; get the current policy and apply again"
            ))),
            other => Err(Status::internal(format!("unexpected response {other:?}"))),
        }
    }

    async fn validate_policy(
        &self,
        req: Request<pb::ApplyPolicyRequest>,
    ) -> Result<TResponse<pb::ValidatePolicyReply>, Status> {
        self.0.authorize(&req, Need::Admin)?;
        Ok(TResponse::new(
            match custos_core::policy::validate(&req.get_ref().text) {
                Ok(v) => pb::ValidatePolicyReply {
                    ok: true,
                    errors: vec![],
                    policies: v.count as u32,
                },
                Err(e) => pb::ValidatePolicyReply {
                    ok: false,
                    errors: e
                        .problems
                        .iter()
                        .map(|p| format!("line {}, column {}: {}", p.line, p.column, p.message))
                        .collect(),
                    policies: 0,
                },
            },
        ))
    }

    async fn get_policy(
        &self,
        req: Request<pb::GetPolicyRequest>,
    ) -> Result<TResponse<pb::PolicySet>, Status> {
        self.0.authorize(&req, Need::Admin)?;
        let v = req.get_ref().version;
        match self.0.store.policy(v) {
            Some(p) => Ok(TResponse::new(p)),
            None if v == 0 => Ok(TResponse::new(pb::PolicySet::default())),
            None => Err(Status::not_found(format!(
                "policy version {v} does not exist"
            ))),
        }
    }

    async fn put_connection(
        &self,
        req: Request<pb::Connection>,
    ) -> Result<TResponse<pb::Connection>, Status> {
        let caller = self.0.authorize(&req, Need::Admin)?;
        let c = req.into_inner();
        if !valid_name(&c.name) {
            return Err(Status::invalid_argument(
                "connection name must be 1-128 characters of letters, digits, '-', '_' or '.'",
            ));
        }
        if !KINDS.contains(&c.kind.as_str()) {
            return Err(Status::invalid_argument(format!(
                "connection kind {:?} is not one of {}",
                c.kind,
                KINDS.join(", ")
            )));
        }
        if c.address.is_empty() {
            return Err(Status::invalid_argument(
                "connection address is required (host:port or URL)",
            ));
        }
        let existed = self.0.store.connection(&c.name).is_some();
        let sealed: BTreeMap<String, Vec<u8>> = c
            .secrets
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    self.0.secret_key.seal(v.as_bytes(), c.name.as_bytes()),
                )
            })
            .collect();
        let event = self.0.origin_event(
            &caller.subject,
            &c.name,
            Payload::ConnectionChanged(pb::ConnectionChanged {
                change: if existed { "updated" } else { "created" }.into(),
                kind: c.kind.clone(),
                address: c.address.clone(),
                credentials_changed: !c.secrets.is_empty(),
            }),
        );
        let conn = StoredConnection {
            name: c.name.clone(),
            kind: c.kind,
            address: c.address,
            options: c.options.into_iter().collect(),
            sealed_secrets: sealed,
            revision: 0,
        };
        let resp = self
            .0
            .commit(Command::PutConnection {
                conn,
                keep_secrets: true,
                event,
                committed_unix_nano: custos_core::events::now_unix_nano(),
            })
            .await?;
        // Committed through the leader: read it back once this node has applied it too.
        if let Response::Revision(rev) = resp {
            self.0.wait_applied(rev).await;
        }
        let stored = self
            .0
            .store
            .connection(&c.name)
            .ok_or_else(|| Status::internal("connection not readable after commit"))?;
        Ok(TResponse::new(public_connection(&stored)))
    }

    async fn get_connection(
        &self,
        req: Request<pb::ConnectionName>,
    ) -> Result<TResponse<pb::Connection>, Status> {
        self.0.authorize(&req, Need::Admin)?;
        let name = &req.get_ref().name;
        self.0
            .store
            .connection(name)
            .map(|c| TResponse::new(public_connection(&c)))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no connection named {name:?}; list them with `custos connection list`"
                ))
            })
    }

    async fn list_connections(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<TResponse<pb::ConnectionList>, Status> {
        self.0.authorize(&req, Need::Admin)?;
        Ok(TResponse::new(pb::ConnectionList {
            connections: self
                .0
                .store
                .connections()
                .iter()
                .map(public_connection)
                .collect(),
        }))
    }

    async fn delete_connection(
        &self,
        req: Request<pb::ConnectionName>,
    ) -> Result<TResponse<pb::Empty>, Status> {
        let caller = self.0.authorize(&req, Need::Admin)?;
        let name = req.into_inner().name;
        let kind = self
            .0
            .store
            .connection(&name)
            .map(|c| (c.kind, c.address))
            .unwrap_or_default();
        let event = self.0.origin_event(
            &caller.subject,
            &name,
            Payload::ConnectionChanged(pb::ConnectionChanged {
                change: "deleted".into(),
                kind: kind.0,
                address: kind.1,
                credentials_changed: false,
            }),
        );
        match self
            .0
            .commit(Command::DeleteConnection {
                name: name.clone(),
                event,
                committed_unix_nano: custos_core::events::now_unix_nano(),
            })
            .await?
        {
            Response::NotFound => Err(Status::not_found(format!("no connection named {name:?}"))),
            _ => Ok(TResponse::new(pb::Empty {})),
        }
    }

    async fn issue_token(
        &self,
        req: Request<pb::IssueTokenRequest>,
    ) -> Result<TResponse<pb::IssuedToken>, Status> {
        let caller = self.0.authorize(&req, Need::Admin)?;
        let r = req.into_inner();
        if r.subject.is_empty() || r.subject.len() > 256 {
            return Err(Status::invalid_argument(
                "token subject is required (at most 256 characters)",
            ));
        }
        for role in &r.roles {
            if !["admin", "edge", "approver"].contains(&role.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "unknown role {role:?}: use admin, edge or approver"
                )));
            }
        }
        let ttl = if r.ttl_seconds == 0 {
            3600
        } else {
            r.ttl_seconds
        };
        if ttl > 90 * 86400 {
            return Err(Status::invalid_argument(
                "token lifetime is at most 90 days",
            ));
        }
        let new = custos_core::token::generate();
        let expires = custos_core::events::now_unix_nano()
            .saturating_add((ttl as i64).saturating_mul(1_000_000_000));
        let token = StoredToken {
            token_id: new.id.clone(),
            sha256: custos_core::token::hash(&new.token),
            subject: r.subject.clone(),
            groups: r.groups.clone(),
            roles: r.roles.clone(),
            expires_unix_nano: expires,
            revoked: false,
        };
        let event = self.0.origin_event(
            &caller.subject,
            "",
            Payload::TokenIssued(pb::TokenIssued {
                token_id: new.id.clone(),
                subject: r.subject,
                groups: r.groups,
                expires_unix_nano: expires,
                roles: r.roles,
            }),
        );
        self.0
            .commit(Command::IssueToken {
                token,
                event,
                committed_unix_nano: custos_core::events::now_unix_nano(),
            })
            .await?;
        Ok(TResponse::new(pb::IssuedToken {
            token: new.token,
            token_id: new.id,
            expires_unix_nano: expires,
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<TResponse<pb::Empty>, Status> {
        self.0.authorize(&req, Need::Admin)?;
        let id = req.into_inner().token_id;
        match self
            .0
            .commit(Command::RevokeToken {
                token_id: id.clone(),
            })
            .await?
        {
            Response::NotFound => Err(Status::not_found(format!("no token with id {id}"))),
            _ => Ok(TResponse::new(pb::Empty {})),
        }
    }
}

/// A connection as admins see it: secrets left out, their names listed.
fn public_connection(c: &StoredConnection) -> pb::Connection {
    let mut p = connection_to_proto(c, BTreeMap::new());
    if !c.sealed_secrets.is_empty() {
        p.options.insert(
            "secrets".into(),
            c.sealed_secrets
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    p
}

// ===== Audit =================================================================================

fn matches(q: &pb::AuditQuery, rec: &pb::AuditRecord) -> bool {
    let Ok(e) = Event::decode(&*rec.event) else {
        return false;
    };
    (q.since_unix_nano == 0 || e.time_unix_nano >= q.since_unix_nano)
        && (q.until_unix_nano == 0 || e.time_unix_nano < q.until_unix_nano)
        && (q.identity.is_empty() || e.identity == q.identity)
        && (q.connection.is_empty() || e.connection == q.connection)
        && (q.session_id.is_empty() || e.session_id == q.session_id)
        && (q.kind.is_empty() || custos_proto::payload_kind(e.payload.as_ref()) == q.kind)
        && (q.verdict.is_empty()
            || custos_core::audit::event_verdict(&e) == Some(q.verdict.as_str()))
}

#[tonic::async_trait]
impl Audit for Svc {
    async fn query(
        &self,
        req: Request<pb::AuditQuery>,
    ) -> Result<TResponse<pb::AuditRecords>, Status> {
        self.0.authorize(&req, Need::Admin)?;
        self.0.whole_state()?;
        let q = req.into_inner();
        let limit = match q.limit {
            0 => 1000,
            n => n.min(10_000) as usize,
        };
        let head = self.0.store.audit_head().seq;
        let mut out = Vec::new();
        let mut next = q.after_seq + 1;
        while out.len() < limit && next <= head {
            let chunk = self.0.store.audit_range(next, 2000);
            let Some(last) = chunk.last() else { break };
            next = last.seq + 1;
            out.extend(
                chunk
                    .into_iter()
                    .filter(|r| matches(&q, r))
                    .take(limit - out.len()),
            );
        }
        Ok(TResponse::new(pb::AuditRecords {
            records: out,
            head_seq: head,
        }))
    }

    type TailStream = Stream_<pb::AuditRecord>;

    async fn tail(
        &self,
        req: Request<pb::TailRequest>,
    ) -> Result<TResponse<Self::TailStream>, Status> {
        self.0.authorize(&req, Need::Admin)?;
        self.0.whole_state()?;
        let r = req.into_inner();
        let inner = self.0.clone();
        let (tx, rx) = mpsc::channel(256);
        // Subscribe before reading the stored part, so nothing committed in between is missed.
        let mut live = inner.store.audit_tx.subscribe();
        let head = inner.store.audit_head().seq;
        let mut next = if r.last > 0 {
            head.saturating_sub(r.last as u64) + 1
        } else {
            r.after_seq + 1
        };
        tokio::spawn(async move {
            loop {
                let chunk = inner.store.audit_range(next, 1000);
                if chunk.is_empty() {
                    break;
                }
                for rec in chunk {
                    next = rec.seq + 1;
                    if tx.send(Ok(rec)).await.is_err() {
                        return;
                    }
                }
            }
            if !r.follow {
                return;
            }
            loop {
                match live.recv().await {
                    Ok(rec) if rec.seq < next => {}
                    Ok(rec) => {
                        next = rec.seq + 1;
                        if tx.send(Ok(rec)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind the live feed: catch up from storage.
                        for rec in inner.store.audit_range(next, usize::MAX) {
                            next = rec.seq + 1;
                            if tx.send(Ok(rec)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(TResponse::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<TResponse<pb::VerifyReply>, Status> {
        self.0.authorize(&req, Need::Admin)?;
        self.0.whole_state()?;
        let store = self.0.store.clone();
        let out = tokio::task::spawn_blocking(move || store.verify())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let reason = match out.fault {
            Some(f) => f.1.to_string(),
            None if out.lost > 0 => "lost_before_ingest".to_string(),
            None => String::new(),
        };
        Ok(TResponse::new(pb::VerifyReply {
            ok: out.fault.is_none() && out.lost == 0,
            checked: out.checked,
            first_bad_seq: out.fault.map(|f| f.0).unwrap_or(0),
            reason,
            lost: out.lost,
            head_hash: hex::encode(out.head_hash),
            node_id: self.0.id,
            parked: out.parked,
        }))
    }
}

// ===== EdgeSync ==============================================================================

impl Inner {
    fn edge_connection(&self, c: &StoredConnection) -> pb::Connection {
        let secrets = c
            .sealed_secrets
            .iter()
            .filter_map(|(k, v)| {
                let plain = self.secret_key.open(v, c.name.as_bytes()).ok()?;
                Some((k.clone(), String::from_utf8(plain).ok()?))
            })
            .collect();
        connection_to_proto(c, secrets)
    }

    fn edge_snapshot(&self) -> pb::EdgeSyncMessage {
        pb::EdgeSyncMessage {
            revision: self.store.revision(),
            body: Some(pb::edge_sync_message::Body::Snapshot(pb::EdgeSnapshot {
                policy: self.store.policy(0),
                connections: self
                    .store
                    .connections()
                    .iter()
                    .map(|c| self.edge_connection(c))
                    .collect(),
                tokens: self.store.tokens().iter().map(token_record).collect(),
                approvals: crate::approvals_svc::recent_approvals(&self.store),
                grants: crate::approvals_svc::active_grants(&self.store),
            })),
        }
    }
}

fn token_record(t: &StoredToken) -> pb::TokenRecord {
    pb::TokenRecord {
        token_id: t.token_id.clone(),
        sha256: t.sha256.clone(),
        subject: t.subject.clone(),
        groups: t.groups.clone(),
        roles: t.roles.clone(),
        expires_unix_nano: t.expires_unix_nano,
        revoked: t.revoked,
    }
}

#[tonic::async_trait]
impl EdgeSync for Svc {
    type WatchStream = Stream_<pb::EdgeSyncMessage>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<TResponse<Self::WatchStream>, Status> {
        let caller = self.0.authorize(&req, Need::Edge)?;
        self.0.whole_state()?;
        tracing::info!(edge = %req.get_ref().edge_id, subject = %caller.subject, "edge watching configuration");
        let inner = self.0.clone();
        let mut changes = inner.store.changes_tx.subscribe();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let snap = inner.edge_snapshot();
            let mut rev = snap.revision;
            if tx.send(Ok(snap)).await.is_err() {
                return;
            }
            loop {
                let (r, change) =
                    match tokio::time::timeout(Duration::from_secs(30), changes.recv()).await {
                        Err(_) => {
                            if tx.is_closed() {
                                return;
                            }
                            continue;
                        }
                        Ok(Ok(c)) => c,
                        Ok(Err(broadcast::error::RecvError::Lagged(_))) => (0, StateChange::Resync),
                        Ok(Err(broadcast::error::RecvError::Closed)) => return,
                    };
                if r != 0 && r <= rev {
                    continue;
                }
                let body = match change {
                    StateChange::Resync => {
                        let snap = inner.edge_snapshot();
                        rev = snap.revision;
                        if tx.send(Ok(snap)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    StateChange::Policy(p) => pb::edge_change::Change::Policy(p),
                    StateChange::ConnectionUpserted(name) => match inner.store.connection(&name) {
                        Some(c) => {
                            pb::edge_change::Change::ConnectionUpserted(inner.edge_connection(&c))
                        }
                        None => continue,
                    },
                    StateChange::ConnectionDeleted(name) => {
                        pb::edge_change::Change::ConnectionDeleted(name)
                    }
                    StateChange::Token(id) => match inner.store.token(&id) {
                        Some(t) => pb::edge_change::Change::Token(token_record(&t)),
                        None => continue,
                    },
                    StateChange::Approval(a) => pb::edge_change::Change::Approval(a),
                    StateChange::Grant(g) => pb::edge_change::Change::Grant(g),
                };
                rev = r;
                let msg = pb::EdgeSyncMessage {
                    revision: r,
                    body: Some(pb::edge_sync_message::Body::Change(pb::EdgeChange {
                        change: Some(body),
                    })),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(TResponse::new(Box::pin(ReceiverStream::new(rx))))
    }
}

// ===== Cluster ===============================================================================

impl Inner {
    pub(crate) fn status(&self) -> pb::ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let nodes = membership
            .nodes()
            .map(|(id, n)| pb::ClusterNode {
                id: *id,
                addr: n.addr.clone(),
                role: if voters.contains(id) {
                    "voter"
                } else {
                    "learner"
                }
                .into(),
            })
            .collect();
        let leader_addr = m
            .current_leader
            .and_then(|l| membership.get_node(&l).map(|n| n.addr.clone()))
            .unwrap_or_default();
        pb::ClusterStatus {
            node_id: self.id,
            leader_id: m.current_leader.unwrap_or(0),
            leader_addr,
            term: m.current_term,
            state: format!("{:?}", m.state).to_lowercase(),
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            nodes,
            audit_head_seq: self.store.audit_head().seq,
            snapshot_index: m.snapshot.map(|s| s.index).unwrap_or(0),
        }
    }

    async fn on_leader<T: Clone + Send + 'static>(
        &self,
        req: &Request<T>,
        call: impl Fn(
            pb::cluster_client::ClusterClient<tonic::transport::Channel>,
            Request<T>,
        ) -> futures::future::BoxFuture<
            'static,
            Result<TResponse<pb::ClusterStatus>, Status>,
        >,
    ) -> Result<TResponse<pb::ClusterStatus>, Status> {
        let Some((_, addr)) = self.leader() else {
            return Err(Status::unavailable("no leader elected yet; retry shortly"));
        };
        let ch = crate::network::channel(&addr, self.client_tls.as_ref())
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut fwd = Request::new(req.get_ref().clone());
        if let Some(v) = req.metadata().get("authorization") {
            fwd.metadata_mut().insert("authorization", v.clone());
        }
        call(pb::cluster_client::ClusterClient::new(ch), fwd).await
    }
}

#[tonic::async_trait]
impl Cluster for Svc {
    async fn status(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<TResponse<pb::ClusterStatus>, Status> {
        self.0.authorize(&req, Need::Edge)?;
        Ok(TResponse::new(self.0.status()))
    }

    async fn add_node(
        &self,
        req: Request<pb::AddNodeRequest>,
    ) -> Result<TResponse<pb::ClusterStatus>, Status> {
        self.0.authorize(&req, Need::Admin)?;
        if !self.0.is_leader() {
            return self
                .0
                .on_leader(&req, |mut c, r| {
                    Box::pin(async move { c.add_node(r).await })
                })
                .await;
        }
        let r = req.into_inner();
        if r.id == 0 || r.addr.is_empty() {
            return Err(Status::invalid_argument(
                "node id (1 or more) and address are required",
            ));
        }
        tokio::time::timeout(Duration::from_secs(120), self.0.add_node(r.id, r.addr.clone(), r.learner_only))
            .await
            .map_err(|_| Status::deadline_exceeded(format!("node {} at {} did not catch up within 120 s; check it is running with the same cluster secret", r.id, r.addr)))?
            .map_err(|e| Status::failed_precondition(format!("cannot add node {}: {e}", r.id)))?;
        Ok(TResponse::new(self.0.status()))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<TResponse<pb::ClusterStatus>, Status> {
        self.0.authorize(&req, Need::Admin)?;
        if !self.0.is_leader() {
            return self
                .0
                .on_leader(&req, |mut c, r| {
                    Box::pin(async move { c.remove_node(r).await })
                })
                .await;
        }
        self.0
            .remove_node(req.get_ref().id)
            .await
            .map_err(Status::failed_precondition)?;
        Ok(TResponse::new(self.0.status()))
    }

    async fn init(
        &self,
        req: Request<pb::InitRequest>,
    ) -> Result<TResponse<pb::ClusterStatus>, Status> {
        self.0.authorize(&req, Need::Admin)?;
        let mut nodes = BTreeMap::new();
        nodes.insert(
            self.0.id,
            openraft::BasicNode::new(self.0.advertise.clone()),
        );
        if let Err(e) = self.0.raft.initialize(nodes).await {
            tracing::debug!(error = %e, "init: already initialized");
        }
        Ok(TResponse::new(self.0.status()))
    }
}

// ===== Raft transport ========================================================================

fn decode<T: serde::de::DeserializeOwned>(p: &pb::RaftPayload) -> Result<T, Status> {
    bincode::deserialize(&p.data)
        .map_err(|e| Status::invalid_argument(format!("undecodable raft payload: {e}")))
}

/// Run a replication request to the end even when the leader stops waiting. The leader's
/// deadline (grpc-timeout) drops this handler's future; dropped halfway, a snapshot chunk is
/// half-written and the transfer must restart, and a large append is decoded again on every
/// retry. Detached, the work the leader already paid for lands, and its retry finds it done.
async fn to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(work)
        .await
        .map_err(|e| Status::internal(format!("raft request task failed: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<TResponse<pb::RaftPayload>, Status> {
    bincode::serialize(v)
        .map(|data| {
            TResponse::new(pb::RaftPayload {
                data,
                chunk: Vec::new(),
            })
        })
        .map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl raft_server::Raft for Svc {
    async fn append_entries(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<TResponse<pb::RaftPayload>, Status> {
        self.0.authorize(&req, Need::Cluster)?;
        let r: AppendEntriesRequest<TypeConfig> = decode(req.get_ref())?;
        let raft = self.0.raft.clone();
        encode(&to_completion(async move { raft.append_entries(r).await }).await?)
    }

    async fn install_snapshot(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<TResponse<pb::RaftPayload>, Status> {
        self.0.authorize(&req, Need::Cluster)?;
        let mut r: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref())?;
        if r.data.is_empty() {
            r.data = req.into_inner().chunk;
        }
        let raft = self.0.raft.clone();
        encode(&to_completion(async move { raft.install_snapshot(r).await }).await?)
    }

    async fn vote(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<TResponse<pb::RaftPayload>, Status> {
        self.0.authorize(&req, Need::Cluster)?;
        let r: VoteRequest<u64> = decode(req.get_ref())?;
        encode(&self.0.raft.vote(r).await)
    }

    async fn forward(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<TResponse<pb::RaftPayload>, Status> {
        self.0.authorize(&req, Need::Cluster)?;
        let cmd: Command = decode(req.get_ref())?;
        let result: Result<Response, String> = self
            .0
            .raft
            .client_write(cmd)
            .await
            .map(|r| r.data)
            .map_err(|e| e.to_string());
        encode(&result)
    }
}
