//! The Approvals gRPC service and the leader's expiry sweeper.
//!
//! Edges (`edge` role) create and cancel requests and consume one-shot grants; approvers
//! (`approver` or `admin` role) list, watch and decide. Every write goes through Raft, and every
//! transition lands in the audit log ([`crate::approvals`] holds the rules).

use std::sync::Arc;
use std::time::Duration;

use custos_core::events::{new_id, now_unix_nano};
use custos_proto::v1::{self as pb, approvals_server::Approvals, Approval, Grant};
use prost::Message;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response as TResponse, Status};

use crate::approvals::{self as rules, CANCELLED, EXPIRED, PENDING};
use crate::grpc::{Need, Svc};
use crate::node::Inner;
use crate::store::{StateChange, Store};
use crate::types::{Command, Response};

/// How long a decided request stays in the edges' snapshot, so an edge that reconnects still
/// hears the outcome of a command it holds.
const RECENT: i64 = 10 * 60 * 1_000_000_000;

/// Pending approvals and those decided in the last few minutes (for EdgeSync snapshots).
pub(crate) fn recent_approvals(store: &Store) -> Vec<Approval> {
    let now = now_unix_nano();
    let mut out: Vec<Approval> = store.approvals(Some(PENDING), usize::MAX);
    out.extend(
        store
            .approvals(None, 1000)
            .into_iter()
            .filter(|a| a.state != PENDING && a.decided_unix_nano > now - RECENT),
    );
    out
}

/// Grants still in force.
pub(crate) fn active_grants(store: &Store) -> Vec<Grant> {
    let now = now_unix_nano();
    store
        .grants()
        .into_iter()
        .filter(|g| rules::grant_active(g, now))
        .collect()
}

fn approval_reply(r: Response) -> Result<TResponse<Approval>, Status> {
    match r {
        Response::Approval(b) => Approval::decode(&*b)
            .map(TResponse::new)
            .map_err(|e| Status::internal(format!("undecodable approval: {e}"))),
        Response::Refused(why) => Err(Status::failed_precondition(why)),
        other => Err(Status::internal(format!("unexpected reply {other:?}"))),
    }
}

fn grant_reply(r: Response) -> Result<TResponse<Grant>, Status> {
    match r {
        Response::Grant(b) => Grant::decode(&*b)
            .map(TResponse::new)
            .map_err(|e| Status::internal(format!("undecodable grant: {e}"))),
        Response::Refused(why) => Err(Status::failed_precondition(why)),
        other => Err(Status::internal(format!("unexpected reply {other:?}"))),
    }
}

fn bad(msg: &str) -> Status {
    Status::invalid_argument(msg.to_string())
}

impl Svc {
    async fn decide(
        &self,
        req: Request<pb::DecideRequest>,
        approve: bool,
    ) -> Result<TResponse<Approval>, Status> {
        let caller = self.0.authorize(&req, Need::Approver)?;
        let r = req.into_inner();
        if r.grant_seconds > rules::MAX_GRANT_SECONDS {
            return Err(bad("a grant lasts at most 7 days (--for 168h)"));
        }
        if !approve && r.grant_seconds > 0 {
            return Err(bad("--for applies to approvals only"));
        }
        if r.comment.len() > 4096 {
            return Err(bad("the comment is longer than 4096 bytes"));
        }
        let resp = self
            .0
            .commit(Command::DecideApproval {
                id: r.id,
                approver: caller.subject,
                approver_groups: caller.groups,
                approve,
                comment: r.comment,
                grant_seconds: r.grant_seconds,
                now_unix_nano: now_unix_nano(),
                event_id: new_id(),
                grant_id: new_id(),
            })
            .await?;
        approval_reply(resp)
    }
}

type ApprovalStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Approval, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Approvals for Svc {
    async fn create(
        &self,
        req: Request<pb::CreateApprovalRequest>,
    ) -> Result<TResponse<Approval>, Status> {
        self.0.authorize(&req, Need::Edge)?;
        let r = req.into_inner();
        if r.identity.is_empty() || r.connection.is_empty() || r.action.is_empty() {
            return Err(bad("identity, connection and action are required"));
        }
        if r.approver_group.is_empty() {
            return Err(bad("approver_group is required"));
        }
        if r.quorum == 0 || r.quorum > 10 {
            return Err(bad("quorum must be between 1 and 10"));
        }
        if r.timeout_seconds == 0 || r.timeout_seconds > 24 * 3600 {
            return Err(bad("timeout_seconds must be between 1 and 86400"));
        }
        if r.text.len() > 1 << 20 {
            return Err(bad("the command text is longer than 1 MiB"));
        }
        let now = now_unix_nano();
        let a = Approval {
            id: new_id(),
            state: PENDING.into(),
            identity: r.identity,
            groups: r.groups,
            connection: r.connection,
            action: r.action,
            text: r.text,
            classifications: r.classifications,
            policy_id: r.policy_id,
            reason: r.reason,
            approver_group: r.approver_group,
            quorum: r.quorum,
            created_unix_nano: now,
            expires_unix_nano: now.saturating_add(r.timeout_seconds as i64 * 1_000_000_000),
            decisions: vec![],
            edge_id: r.edge_id,
            session_id: r.session_id,
            command_id: r.command_id,
            held: r.held,
            grant_id: String::new(),
            decided_unix_nano: 0,
            comment: String::new(),
        };
        let resp = self
            .0
            .commit(Command::CreateApproval {
                approval: a.encode_to_vec(),
                event_id: new_id(),
            })
            .await?;
        approval_reply(resp)
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelApprovalRequest>,
    ) -> Result<TResponse<Approval>, Status> {
        self.0.authorize(&req, Need::Edge)?;
        let r = req.into_inner();
        let resp = self
            .0
            .commit(Command::CloseApproval {
                id: r.id,
                state: CANCELLED.into(),
                reason: if r.reason.is_empty() {
                    "cancelled".into()
                } else {
                    r.reason
                },
                now_unix_nano: now_unix_nano(),
                event_id: new_id(),
            })
            .await?;
        approval_reply(resp)
    }

    async fn use_grant(
        &self,
        req: Request<pb::UseGrantRequest>,
    ) -> Result<TResponse<Grant>, Status> {
        self.0.authorize(&req, Need::Edge)?;
        let r = req.into_inner();
        // The edge may have heard of the grant from a node ahead of this one.
        let store = &self.0.store;
        self.0
            .wait_until(|| store.grant(&r.grant_id).is_some())
            .await;
        let Some(g) = store.grant(&r.grant_id) else {
            return Err(Status::not_found(format!(
                "no grant with id {}",
                r.grant_id
            )));
        };
        let resp = self
            .0
            .commit(Command::UseGrant {
                grant_id: r.grant_id,
                identity: g.identity,
                connection: g.connection,
                text_sha256: rules::text_sha256(&r.text),
                command_id: r.command_id,
                now_unix_nano: now_unix_nano(),
                event_id: new_id(),
                edge_id: r.edge_id,
                session_id: r.session_id,
            })
            .await?;
        grant_reply(resp)
    }

    async fn list(
        &self,
        req: Request<pb::ListApprovalsRequest>,
    ) -> Result<TResponse<pb::ApprovalList>, Status> {
        self.0.authorize(&req, Need::Approver)?;
        let r = req.into_inner();
        let limit = if r.limit == 0 { 100 } else { r.limit as usize };
        let state = (!r.state.is_empty()).then_some(r.state.as_str());
        Ok(TResponse::new(pb::ApprovalList {
            approvals: self.0.store.approvals(state, limit),
        }))
    }

    async fn get(&self, req: Request<pb::ApprovalId>) -> Result<TResponse<Approval>, Status> {
        if self.0.authorize(&req, Need::Approver).is_err() {
            self.0.authorize(&req, Need::Edge)?;
        }
        let id = req.into_inner().id;
        self.0
            .store
            .approval(&id)
            .map(TResponse::new)
            .ok_or_else(|| Status::not_found(format!("no approval request with id {id}")))
    }

    type WatchStream = ApprovalStream;

    async fn watch(
        &self,
        req: Request<pb::WatchApprovalsRequest>,
    ) -> Result<TResponse<Self::WatchStream>, Status> {
        self.0.authorize(&req, Need::Approver)?;
        let all = req.into_inner().include_decided;
        let inner = self.0.clone();
        // Subscribe before reading the current ones, so nothing falls in between.
        let mut changes = inner.store.changes_tx.subscribe();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut current = inner.store.approvals(Some(PENDING), 1000);
            current.reverse();
            for a in current {
                if tx.send(Ok(a)).await.is_err() {
                    return;
                }
            }
            loop {
                let change =
                    match tokio::time::timeout(Duration::from_secs(30), changes.recv()).await {
                        Err(_) if tx.is_closed() => return,
                        Err(_) => continue,
                        Ok(Ok((_, c))) => c,
                        Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                            tracing::warn!(missed = n, "approvals watcher fell behind");
                            continue;
                        }
                        Ok(Err(broadcast::error::RecvError::Closed)) => return,
                    };
                let StateChange::Approval(a) = change else {
                    continue;
                };
                let new = a.state == PENDING && a.decisions.is_empty();
                if (all || new) && tx.send(Ok(a)).await.is_err() {
                    return;
                }
            }
        });
        Ok(TResponse::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn approve(
        &self,
        req: Request<pb::DecideRequest>,
    ) -> Result<TResponse<Approval>, Status> {
        self.decide(req, true).await
    }

    async fn deny(&self, req: Request<pb::DecideRequest>) -> Result<TResponse<Approval>, Status> {
        self.decide(req, false).await
    }

    async fn list_grants(
        &self,
        req: Request<pb::ListGrantsRequest>,
    ) -> Result<TResponse<pb::GrantList>, Status> {
        self.0.authorize(&req, Need::Approver)?;
        let grants = if req.into_inner().include_inactive {
            self.0.store.grants()
        } else {
            active_grants(&self.0.store)
        };
        Ok(TResponse::new(pb::GrantList { grants }))
    }

    async fn revoke_grant(&self, req: Request<pb::GrantId>) -> Result<TResponse<Grant>, Status> {
        let caller = self.0.authorize(&req, Need::Approver)?;
        let resp = self
            .0
            .commit(Command::RevokeGrant {
                grant_id: req.into_inner().id,
                by: caller.subject,
                now_unix_nano: now_unix_nano(),
                event_id: new_id(),
            })
            .await?;
        grant_reply(resp)
    }
}

/// On the leader: close pending requests whose deadline passed. Followers do nothing; a new
/// leader picks up where the old one stopped, since the deadlines are in the replicated state.
pub(crate) async fn sweep(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        if !inner.is_leader() {
            continue;
        }
        let now = now_unix_nano();
        for (id, expires) in inner.store.open_approvals() {
            if expires > now {
                continue;
            }
            let cmd = Command::CloseApproval {
                id: id.clone(),
                state: EXPIRED.into(),
                reason: "no decision before the deadline".into(),
                now_unix_nano: now,
                event_id: new_id(),
            };
            if let Err(e) = inner.write(cmd).await {
                tracing::warn!(approval = %id, error = %e, "could not expire an approval request; retrying");
                break;
            }
        }
    }
}
