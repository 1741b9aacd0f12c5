//! The "hold for approval" step backed by the control plane's Approvals service.
//!
//! ```text
//!  command needs approval ─▶ grant in force? ──yes──▶ run (time-boxed: record the use;
//!        │                                               one-shot: consume it through Raft)
//!        no
//!        ▼
//!  Approvals.Create ──fails──▶ refuse (fail closed)
//!        │
//!  wait for the request to change state on the EdgeSync stream (no polling), until the deadline
//!        ▼
//!  approved ─▶ run · denied / expired / cancelled / no word by the deadline ─▶ refuse
//! ```

use std::sync::Arc;
use std::time::Duration;

use custos_proto::v1::{
    approvals_client::ApprovalsClient, Approval, CancelApprovalRequest, CreateApprovalRequest,
    UseGrantRequest,
};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use sha2::Digest;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::pipeline::{ApprovalHook, ApprovalOutcome, ApprovalRequest, Held, HoldStart};
use crate::watch::{EdgeConfig, WatchOptions};

/// Slack after the deadline for the control plane's expiry to reach the edge.
const DEADLINE_SLACK: Duration = Duration::from_secs(3);
/// How long one call to the control plane may take before the next server is tried.
const CALL_TIMEOUT: Duration = Duration::from_secs(12);

/// Approvals through the control plane.
pub struct ControlPlaneApprovals {
    opts: WatchOptions,
    config: watch::Receiver<Arc<EdgeConfig>>,
    /// One lazily connected channel per server, and the one that answered last.
    channels: Mutex<(Vec<Option<Channel>>, usize)>,
}

impl ControlPlaneApprovals {
    pub fn new(opts: WatchOptions, config: watch::Receiver<Arc<EdgeConfig>>) -> Self {
        let n = opts.servers.len();
        ControlPlaneApprovals {
            opts,
            config,
            channels: Mutex::new((vec![None; n], 0)),
        }
    }

    fn channel(&self, i: usize) -> Result<Channel, String> {
        let mut ch = self.channels.lock();
        if let Some(c) = &ch.0[i] {
            return Ok(c.clone());
        }
        let url = crate::watch::server_url(&self.opts.servers[i], self.opts.tls.is_some());
        let c = crate::watch::endpoint(&url, self.opts.tls.as_ref())?.connect_lazy();
        ch.0[i] = Some(c.clone());
        Ok(c)
    }

    /// Call the Approvals service, trying each control-plane server in turn.
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, String>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = self.opts.servers.len();
        if n == 0 {
            return Err("no control-plane servers are configured".into());
        }
        let first = self.channels.lock().1;
        let mut last = String::new();
        for k in 0..n {
            let i = (first + k) % n;
            let ch = match self.channel(i) {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let bearer = format!("Bearer {}", self.opts.token)
                .parse()
                .map_err(|_| "the edge token is not valid header text".to_string())?;
            let client = ApprovalsClient::with_interceptor(ch, Bearer(bearer));
            let res = tokio::time::timeout(CALL_TIMEOUT, f(client)).await;
            match res {
                Ok(Ok(r)) => {
                    self.channels.lock().1 = i;
                    return Ok(r.into_inner());
                }
                Ok(Err(s))
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) =>
                {
                    last = format!("{}: {}", self.opts.servers[i], s.message());
                }
                Ok(Err(s)) => return Err(format!("{what}: {}", s.message())),
                Err(_) => {
                    last = format!(
                        "{}: no answer within {CALL_TIMEOUT:?}",
                        self.opts.servers[i]
                    )
                }
            }
        }
        Err(format!("{what}: no control-plane server answered ({last})"))
    }

    /// Wait until the request leaves `pending` in the synced state, or `until`.
    async fn outcome(&self, id: &str, until: tokio::time::Instant) -> Option<Approval> {
        let mut rx = self.config.clone();
        let found = tokio::time::timeout_at(
            until,
            rx.wait_for(|c| c.approvals.get(id).is_some_and(|a| a.state != "pending")),
        )
        .await;
        match found {
            Ok(Ok(c)) => c.approvals.get(id).cloned(),
            _ => None,
        }
    }
}

/// Adds the edge's bearer token to every call.
#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

type Client = ApprovalsClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

fn sha256_hex(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

impl ApprovalHook for ControlPlaneApprovals {
    fn start<'a>(&'a self, req: &'a ApprovalRequest) -> BoxFuture<'a, HoldStart> {
        Box::pin(async move {
            let now = custos_core::events::now_unix_nano();
            let cfg = self.config.borrow().clone();
            let who = &req.origin.identity;
            let conn = &req.origin.connection;
            // A time-boxed grant for this identity, connection and action.
            if let Some(g) = cfg.grants.values().find(|g| {
                g.kind == "time_boxed"
                    && !g.revoked
                    && now < g.expires_unix_nano
                    && &g.identity == who
                    && &g.connection == conn
                    && g.actions.contains(&req.action)
            }) {
                return HoldStart::Done(ApprovalOutcome::Granted {
                    grant_id: g.id.clone(),
                    approval_id: g.approval_id.clone(),
                    kind: g.kind.clone(),
                    record: true,
                });
            }
            // A one-shot grant for exactly this command: consume it through the control plane,
            // so two edges cannot both run it.
            let sha = sha256_hex(&req.text);
            let one_shot: Vec<_> = cfg
                .grants
                .values()
                .filter(|g| {
                    g.kind == "one_shot"
                        && !g.used
                        && !g.revoked
                        && now < g.expires_unix_nano
                        && &g.identity == who
                        && &g.connection == conn
                        && g.text_sha256 == sha
                })
                .cloned()
                .collect();
            for g in one_shot {
                let r = self
                    .call("use grant", |mut c| {
                        let req = UseGrantRequest {
                            grant_id: g.id.clone(),
                            edge_id: req.origin.edge_id.clone(),
                            session_id: req.origin.session_id.clone(),
                            command_id: req.command_id.clone(),
                            text: req.text.clone(),
                        };
                        async move { c.use_grant(req).await }
                    })
                    .await;
                match r {
                    Ok(g) => {
                        return HoldStart::Done(ApprovalOutcome::Granted {
                            grant_id: g.id,
                            approval_id: g.approval_id,
                            kind: g.kind,
                            record: false,
                        })
                    }
                    Err(e) => {
                        tracing::info!(grant = %g.id, error = %e, "one-shot grant not usable")
                    }
                }
            }
            if req.requirement.reason_required && req.reason.is_empty() {
                return HoldStart::Done(ApprovalOutcome::Refused {
                    approval_id: String::new(),
                    reason: format!(
                        "{} needs approval by group {} with a reason (policy {}); give one in a comment, e.g. /* reason: ticket OPS-123 */ DELETE …",
                        req.action,
                        req.requirement.group,
                        req.policies.join(", ")
                    ),
                });
            }
            let create = CreateApprovalRequest {
                edge_id: req.origin.edge_id.clone(),
                session_id: req.origin.session_id.clone(),
                command_id: req.command_id.clone(),
                identity: who.clone(),
                groups: req.groups.clone(),
                connection: conn.clone(),
                action: req.action.clone(),
                text: req.text.clone(),
                classifications: req.classifications.clone(),
                policy_id: req.policies.join(","),
                reason: req.reason.clone(),
                approver_group: req.requirement.group.clone(),
                quorum: req.requirement.quorum,
                timeout_seconds: req.requirement.timeout.as_secs().max(1),
                held: !req.refuse_now,
            };
            match self
                .call("request approval", |mut c| {
                    let r = create.clone();
                    async move { c.create(r).await }
                })
                .await
            {
                Ok(a) => HoldStart::Held(Held {
                    approval_id: a.id,
                    approver_group: a.approver_group,
                    quorum: a.quorum,
                    expires_unix_nano: a.expires_unix_nano,
                }),
                Err(e) => HoldStart::Done(ApprovalOutcome::Refused {
                    approval_id: String::new(),
                    reason: format!(
                        "{} needs approval by group {}, and the approval service cannot be reached ({e}); the command was not run — retry when the control plane is back",
                        req.action, req.requirement.group
                    ),
                }),
            }
        })
    }

    fn wait<'a>(&'a self, held: &'a Held) -> BoxFuture<'a, ApprovalOutcome> {
        Box::pin(async move {
            let left = held.expires_unix_nano - custos_core::events::now_unix_nano();
            let until = tokio::time::Instant::now()
                + Duration::from_nanos(left.max(0) as u64)
                + DEADLINE_SLACK;
            let id = held.approval_id.clone();
            let Some(a) = self.outcome(&id, until).await else {
                return ApprovalOutcome::Refused {
                    approval_id: id.clone(),
                    reason: format!(
                        "approval {id}: no decision reached this edge before the deadline; the command was not run"
                    ),
                };
            };
            let last = a.decisions.last();
            match a.state.as_str() {
                "approved" => ApprovalOutcome::Approved {
                    approval_id: id,
                    approver: a
                        .decisions
                        .iter()
                        .filter(|d| d.approve)
                        .map(|d| d.approver.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                },
                "denied" => ApprovalOutcome::Refused {
                    reason: format!(
                        "approval {id} was denied by {}: {}",
                        last.map(|d| d.approver.as_str()).unwrap_or("an approver"),
                        if a.comment.is_empty() {
                            "(no comment)"
                        } else {
                            &a.comment
                        }
                    ),
                    approval_id: id,
                },
                "expired" => ApprovalOutcome::Refused {
                    reason: format!(
                        "approval {id} expired: group {} did not decide in time; run the command again to ask again",
                        a.approver_group
                    ),
                    approval_id: id,
                },
                other => ApprovalOutcome::Refused {
                    reason: format!("approval {id} was {other}: {}", a.comment),
                    approval_id: id,
                },
            }
        })
    }

    fn cancel<'a>(&'a self, held: &'a Held, reason: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let r = self
                .call("cancel approval", |mut c| {
                    let req = CancelApprovalRequest {
                        id: held.approval_id.clone(),
                        reason: reason.to_string(),
                    };
                    async move { c.cancel(req).await }
                })
                .await;
            if let Err(e) = r {
                // It expires at its deadline instead; nothing is left open for ever.
                tracing::warn!(approval = %held.approval_id, error = %e, "could not cancel an approval request");
            }
        })
    }
}
