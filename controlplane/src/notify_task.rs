//! The leader tells people about approval requests (Slack, signed webhooks) and takes Slack's
//! button clicks back as decisions.
//!
//! ```text
//!  Raft apply ─▶ StateChange::Approval ─▶ (leader only) notifier.pending / notifier.decided
//!  Slack click ─▶ /slack/interactions (signature, replay, user map) ─▶ ControlPlaneSink
//!                                                      ─▶ Command::DecideApproval through Raft
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use custos_core::events::{new_id, now_unix_nano};
use custos_proto::v1::Approval;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::approvals::PENDING;
use crate::node::Inner;
use crate::notify::{ApprovalNotice, Notifier, NotifyError, WebhookNotifier};
use crate::slack::DecisionSink;
use crate::store::StateChange;
use crate::types::{Command, Response};

/// `[[webhooks]]` in the control-plane config: a generic signed outgoing webhook.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where to POST (`https://…`; plain http for loopback receivers).
    pub url: String,
    /// File holding the HMAC secret.
    pub secret_file: Option<PathBuf>,
    /// Or the environment variable holding it.
    pub secret_env: Option<String>,
}

impl WebhookConfig {
    pub fn notifier(&self) -> Result<WebhookNotifier, NotifyError> {
        let secret = match (&self.secret_file, &self.secret_env) {
            (Some(p), None) => std::fs::read_to_string(p)
                .map_err(|e| {
                    NotifyError::Config(format!(
                        "cannot read the webhook secret from {}: {e}",
                        p.display()
                    ))
                })?
                .trim()
                .to_string(),
            (None, Some(v)) => std::env::var(v).map_err(|_| {
                NotifyError::Config(format!(
                    "the webhook secret variable {v} is not set in the environment"
                ))
            })?,
            _ => {
                return Err(NotifyError::Config(
                    "[[webhooks]] needs exactly one of secret_file and secret_env".into(),
                ))
            }
        };
        if secret.is_empty() {
            return Err(NotifyError::Config("the webhook secret is empty".into()));
        }
        WebhookNotifier::new(&self.url, secret)
    }
}

pub fn notice(a: &Approval) -> ApprovalNotice {
    ApprovalNotice {
        id: a.id.clone(),
        identity: a.identity.clone(),
        connection: a.connection.clone(),
        action: a.action.clone(),
        text: a.text.clone(),
        approver_group: a.approver_group.clone(),
        quorum: a.quorum,
        approvals: a
            .decisions
            .iter()
            .filter(|d| d.approve)
            .map(|d| d.approver.clone())
            .collect(),
        expires_unix_nano: a.expires_unix_nano,
        policy_id: a.policy_id.clone(),
        reason: a.reason.clone(),
        state: a.state.clone(),
        decided_by: a
            .decisions
            .last()
            .filter(|_| a.state == "approved" || a.state == "denied")
            .map(|d| d.approver.clone())
            .unwrap_or_default(),
        comment: a.comment.clone(),
    }
}

/// On the leader: announce new requests and their outcomes.
pub(crate) async fn run(
    inner: Arc<Inner>,
    notifiers: Vec<Arc<dyn Notifier>>,
    mut shutdown: watch::Receiver<bool>,
) {
    if notifiers.is_empty() {
        return;
    }
    let mut changes = inner.store.changes_tx.subscribe();
    // Message references per approval (Slack: channel/ts), so the outcome updates the post.
    let mut refs: HashMap<String, Vec<Option<String>>> = HashMap::new();
    loop {
        let change = tokio::select! {
            _ = shutdown.changed() => return,
            c = changes.recv() => c,
        };
        let a = match change {
            Ok((_, StateChange::Approval(a))) => a,
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "approval notifier fell behind; some changes were not announced"
                );
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if !inner.is_leader() {
            continue;
        }
        let n = notice(&a);
        if a.state == PENDING {
            if !a.decisions.is_empty() {
                continue;
            }
            let mut got = Vec::new();
            for x in &notifiers {
                got.push(match x.pending(&n).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(notifier = x.name(), approval = %a.id, error = %e, "could not announce an approval request");
                        None
                    }
                });
            }
            refs.insert(a.id.clone(), got);
        } else {
            let got = refs.remove(&a.id).unwrap_or_default();
            for (i, x) in notifiers.iter().enumerate() {
                let r = got.get(i).cloned().flatten();
                if let Err(e) = x.decided(&n, r.as_deref()).await {
                    tracing::warn!(notifier = x.name(), approval = %a.id, error = %e, "could not announce an approval outcome");
                }
            }
        }
    }
}

/// Decisions from Slack: the clicking user's identity votes with the groups of its approver
/// tokens (valid, unrevoked, with the `approver` or `admin` role).
pub(crate) struct ControlPlaneSink(pub Arc<Inner>);

impl DecisionSink for ControlPlaneSink {
    fn decide<'a>(
        &'a self,
        identity: &'a str,
        approval_id: &'a str,
        approve: bool,
        comment: &'a str,
    ) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let now = now_unix_nano();
            let mut groups: Vec<String> = self
                .0
                .store
                .tokens()
                .into_iter()
                .filter(|t| {
                    t.subject == identity
                        && !t.revoked
                        && t.expires_unix_nano > now
                        && t.roles.iter().any(|r| r == "approver" || r == "admin")
                })
                .flat_map(|t| t.groups)
                .collect();
            groups.sort();
            groups.dedup();
            if groups.is_empty() {
                return Err(format!(
                    "{identity} holds no valid approver token; issue one with `custos token issue {identity} --group GROUP --role approver`"
                ));
            }
            let cmd = Command::DecideApproval {
                id: approval_id.to_string(),
                approver: identity.to_string(),
                approver_groups: groups,
                approve,
                comment: comment.to_string(),
                grant_seconds: 0,
                now_unix_nano: now,
                event_id: new_id(),
                grant_id: new_id(),
            };
            let resp = tokio::time::timeout(Duration::from_secs(15), self.0.write(cmd))
                .await
                .map_err(|_| {
                    "the control plane did not commit the decision in time; try again".to_string()
                })?
                .map_err(|e| e.to_string())?;
            match resp {
                Response::Approval(b) => {
                    let a = <Approval as prost::Message>::decode(&*b).map_err(|e| e.to_string())?;
                    let votes = a.decisions.iter().filter(|d| d.approve).count();
                    Ok(match a.state.as_str() {
                        "approved" => format!("approved {}: the command runs now", a.id),
                        "denied" => format!("denied {}", a.id),
                        _ => format!(
                            "recorded your approval of {}: {votes} of {}",
                            a.id, a.quorum
                        ),
                    })
                }
                Response::Refused(why) => Err(why),
                other => Err(format!("unexpected reply {other:?}")),
            }
        })
    }
}
