//! Just-in-time approvals: the rules of a request's life, kept pure so that the state machine
//! applies them the same way on every node and tests can drive them directly.
//!
//! ```text
//!   pending ──votes reach quorum──▶ approved ──▶ grant (time-boxed, or one-shot when not held)
//!      │ ──a vote says no────────▶ denied
//!      │ ──deadline passes───────▶ expired   (the leader's sweeper proposes it)
//!      └ ──client went away──────▶ cancelled (the edge asks)
//! ```
//!
//! Rules checked for every vote, at decision time: the request is pending and not past its
//! deadline; the approver is not the requester; the approver is in the approver group; each
//! approver counts once.

use custos_proto::v1::{self as pb, event::Payload, Approval, ApprovalDecision, Event, Grant};

pub const PENDING: &str = "pending";
pub const APPROVED: &str = "approved";
pub const DENIED: &str = "denied";
pub const EXPIRED: &str = "expired";
pub const CANCELLED: &str = "cancelled";

pub const ONE_SHOT: &str = "one_shot";
pub const TIME_BOXED: &str = "time_boxed";

/// The longest time-boxed grant an approver may give.
pub const MAX_GRANT_SECONDS: u64 = 7 * 24 * 3600;

/// Why a vote or a grant use did not count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no approval request with id {0}")]
    Unknown(String),
    #[error("approval {id} is already {state}; nothing to decide")]
    NotPending { id: String, state: String },
    #[error(
        "approval {id} expired before this decision; the requester must run the command again"
    )]
    Expired { id: String },
    #[error(
        "{who} asked for approval {id} and cannot approve it: another member of group {group} must"
    )]
    SelfApproval {
        who: String,
        id: String,
        group: String,
    },
    #[error("{who} is not in group {group}, which decides approval {id}; issue them an approver token with --group {group}")]
    NotInGroup {
        who: String,
        id: String,
        group: String,
    },
    #[error("{who} already voted on approval {id}; another member of group {group} must add the next approval")]
    AlreadyVoted {
        who: String,
        id: String,
        group: String,
    },
    #[error("grant {0} cannot be used: {1}")]
    GrantUnusable(String, String),
}

/// One approver's vote.
#[derive(Debug, Clone)]
pub struct Vote<'a> {
    pub approver: &'a str,
    pub groups: &'a [String],
    pub approve: bool,
    pub comment: &'a str,
    pub grant_seconds: u64,
    pub now: i64,
}

/// What a counted vote did.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// An approval short of the quorum.
    Counted {
        approvals: u32,
    },
    /// The quorum is reached; `grant` is the grant it created, if any.
    Approved {
        grant: Option<Box<Grant>>,
    },
    Denied,
}

/// Approvals counted so far.
pub fn approvals(a: &Approval) -> u32 {
    a.decisions.iter().filter(|d| d.approve).count() as u32
}

/// Apply one vote to a pending request.
pub fn vote(a: &mut Approval, v: &Vote<'_>, grant_id: &str) -> Result<Transition, Refusal> {
    if a.state != PENDING {
        return Err(Refusal::NotPending {
            id: a.id.clone(),
            state: a.state.clone(),
        });
    }
    if v.now >= a.expires_unix_nano {
        return Err(Refusal::Expired { id: a.id.clone() });
    }
    if v.approver == a.identity {
        return Err(Refusal::SelfApproval {
            who: v.approver.into(),
            id: a.id.clone(),
            group: a.approver_group.clone(),
        });
    }
    if !v.groups.contains(&a.approver_group) {
        return Err(Refusal::NotInGroup {
            who: v.approver.into(),
            id: a.id.clone(),
            group: a.approver_group.clone(),
        });
    }
    if a.decisions.iter().any(|d| d.approver == v.approver) {
        return Err(Refusal::AlreadyVoted {
            who: v.approver.into(),
            id: a.id.clone(),
            group: a.approver_group.clone(),
        });
    }
    a.decisions.push(ApprovalDecision {
        approver: v.approver.into(),
        approve: v.approve,
        comment: v.comment.into(),
        time_unix_nano: v.now,
        grant_seconds: v.grant_seconds.min(MAX_GRANT_SECONDS),
    });
    a.comment = v.comment.into();
    if !v.approve {
        a.state = DENIED.into();
        a.decided_unix_nano = v.now;
        return Ok(Transition::Denied);
    }
    let n = approvals(a);
    if n < a.quorum.max(1) {
        return Ok(Transition::Counted { approvals: n });
    }
    a.state = APPROVED.into();
    a.decided_unix_nano = v.now;
    let grant = grant_for(a, grant_id, v.now).map(Box::new);
    if let Some(g) = &grant {
        a.grant_id = g.id.clone();
    }
    Ok(Transition::Approved { grant })
}

/// The grant an approved request creates. Time-boxed only when every approver asked for one
/// (for the shortest length asked); otherwise one-shot for a request whose command is not held
/// open, so the client's retry runs once; none when the held command itself is the one use.
fn grant_for(a: &Approval, id: &str, now: i64) -> Option<Grant> {
    let approving: Vec<&ApprovalDecision> = a.decisions.iter().filter(|d| d.approve).collect();
    let secs = approving.iter().map(|d| d.grant_seconds).min().unwrap_or(0);
    let granted_by = approving.iter().map(|d| d.approver.clone()).collect();
    let base = Grant {
        id: id.to_string(),
        approval_id: a.id.clone(),
        identity: a.identity.clone(),
        connection: a.connection.clone(),
        actions: vec![a.action.clone()],
        created_unix_nano: now,
        granted_by,
        ..Default::default()
    };
    if secs > 0 {
        return Some(Grant {
            kind: TIME_BOXED.into(),
            expires_unix_nano: now.saturating_add(secs as i64 * 1_000_000_000),
            ..base
        });
    }
    if a.held {
        return None;
    }
    // The retry must come within as long again as the request was allowed to wait.
    let window = (a.expires_unix_nano - a.created_unix_nano).max(60_000_000_000);
    Some(Grant {
        kind: ONE_SHOT.into(),
        text_sha256: text_sha256(&a.text),
        expires_unix_nano: now.saturating_add(window),
        ..base
    })
}

/// Close a pending request as expired or cancelled. False when it is no longer pending.
pub fn close(a: &mut Approval, state: &str, reason: &str, now: i64) -> bool {
    if a.state != PENDING {
        return false;
    }
    a.state = state.into();
    a.comment = reason.into();
    a.decided_unix_nano = now;
    true
}

/// Whether a grant is in force at `now`.
pub fn grant_active(g: &Grant, now: i64) -> bool {
    let used_up = g.kind == ONE_SHOT && g.used;
    !(g.revoked || used_up) && now < g.expires_unix_nano
}

/// Consume a one-shot grant for exactly the command it was given for.
pub fn use_one_shot(
    g: &mut Grant,
    identity: &str,
    connection: &str,
    text_sha: &str,
    now: i64,
) -> Result<(), Refusal> {
    let refuse = |why: &str| Err(Refusal::GrantUnusable(g.id.clone(), why.to_string()));
    if g.kind != ONE_SHOT {
        return refuse("it is not a one-shot grant");
    }
    if g.revoked {
        return refuse("it was revoked");
    }
    if g.used {
        return refuse("it was already used");
    }
    if now >= g.expires_unix_nano {
        return refuse("it expired");
    }
    if g.identity != identity || g.connection != connection || g.text_sha256 != text_sha {
        return refuse("it was given for another identity, connection or command");
    }
    g.used = true;
    Ok(())
}

pub fn text_sha256(text: &str) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()))
}

/// The `edge_id` of events the control plane itself writes. It names no node: every node applies
/// the same command and must produce the same bytes, or the replicas' hash chains would differ.
pub const SOURCE: &str = "controlplane";

/// An audit event the control plane writes for an approval transition. `source` is the edge that
/// asked (for requests and cancellations) or [`SOURCE`].
pub fn event(
    id: &str,
    now: i64,
    source: &str,
    a: &Approval,
    actor: &str,
    payload: Payload,
) -> Event {
    Event {
        id: id.to_string(),
        time_unix_nano: now,
        edge_id: source.to_string(),
        session_id: a.session_id.clone(),
        identity: actor.to_string(),
        connection: a.connection.clone(),
        payload: Some(payload),
    }
}

pub fn requested_payload(a: &Approval) -> Payload {
    Payload::ApprovalRequested(pb::ApprovalRequested {
        approval_id: a.id.clone(),
        command_id: a.command_id.clone(),
        text: a.text.clone(),
        action: a.action.clone(),
        approver_group: a.approver_group.clone(),
        quorum: a.quorum,
        expires_unix_nano: a.expires_unix_nano,
        policy_id: a.policy_id.clone(),
        reason: a.reason.clone(),
    })
}

pub fn decided_payload(a: &Approval, approver: &str, grant: Option<&Grant>) -> Payload {
    Payload::ApprovalDecided(pb::ApprovalDecided {
        approval_id: a.id.clone(),
        state: a.state.clone(),
        approver: approver.to_string(),
        comment: a.comment.clone(),
        grant_seconds: grant
            .filter(|g| g.kind == TIME_BOXED)
            .map(|g| ((g.expires_unix_nano - g.created_unix_nano) / 1_000_000_000) as u64)
            .unwrap_or(0),
        approvals: approvals(a),
        grant_id: grant.map(|g| g.id.clone()).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(quorum: u32, held: bool) -> Approval {
        Approval {
            id: "a1".into(),
            state: PENDING.into(),
            identity: "agent:writer".into(),
            connection: "prod".into(),
            action: "sql:delete".into(),
            text: "DELETE FROM t WHERE id = 1".into(),
            approver_group: "dba".into(),
            quorum,
            created_unix_nano: 0,
            expires_unix_nano: 1_000_000_000_000,
            held,
            ..Default::default()
        }
    }

    fn v<'a>(who: &'a str, groups: &'a [String], approve: bool, secs: u64) -> Vote<'a> {
        Vote {
            approver: who,
            groups,
            approve,
            comment: "ok",
            grant_seconds: secs,
            now: 10,
        }
    }

    #[test]
    fn the_rules_of_a_vote() {
        let dba = vec!["dba".to_string()];
        let other = vec!["dev".to_string()];
        let mut a = request(2, true);
        // The requester cannot approve, even when in the group.
        assert!(matches!(
            vote(&mut a, &v("agent:writer", &dba, true, 0), "g"),
            Err(Refusal::SelfApproval { .. })
        ));
        assert!(matches!(
            vote(&mut a, &v("bob", &other, true, 0), "g"),
            Err(Refusal::NotInGroup { .. })
        ));
        assert_eq!(
            vote(&mut a, &v("carol", &dba, true, 0), "g"),
            Ok(Transition::Counted { approvals: 1 })
        );
        assert!(matches!(
            vote(&mut a, &v("carol", &dba, true, 0), "g"),
            Err(Refusal::AlreadyVoted { .. })
        ));
        assert_eq!(a.state, PENDING);
        assert_eq!(
            vote(&mut a, &v("dave", &dba, true, 0), "g"),
            Ok(Transition::Approved { grant: None })
        );
        assert_eq!(a.state, APPROVED);
        assert!(matches!(
            vote(&mut a, &v("erin", &dba, false, 0), "g"),
            Err(Refusal::NotPending { .. })
        ));
    }

    #[test]
    fn a_no_denies_at_once_and_late_votes_do_not_count() {
        let dba = vec!["dba".to_string()];
        let mut a = request(2, true);
        assert_eq!(
            vote(&mut a, &v("carol", &dba, false, 0), "g"),
            Ok(Transition::Denied)
        );
        assert_eq!(a.state, DENIED);
        let mut late = request(1, true);
        let mut vl = v("carol", &dba, true, 0);
        vl.now = late.expires_unix_nano;
        assert!(matches!(
            vote(&mut late, &vl, "g"),
            Err(Refusal::Expired { .. })
        ));
        assert!(close(&mut late, EXPIRED, "deadline passed", vl.now));
        assert!(!close(&mut late, CANCELLED, "again", vl.now));
    }

    #[test]
    fn grants_time_boxed_only_when_every_approver_asked() {
        let dba = vec!["dba".to_string()];
        let mut a = request(2, true);
        vote(&mut a, &v("carol", &dba, true, 1800), "g").unwrap();
        let Ok(Transition::Approved { grant: Some(g) }) =
            vote(&mut a, &v("dave", &dba, true, 600), "g")
        else {
            panic!("expected a grant")
        };
        assert_eq!(g.kind, TIME_BOXED);
        assert_eq!(g.expires_unix_nano, 10 + 600 * 1_000_000_000);
        assert_eq!(g.granted_by, vec!["carol", "dave"]);
        let mut b = request(2, true);
        vote(&mut b, &v("carol", &dba, true, 1800), "g").unwrap();
        assert_eq!(
            vote(&mut b, &v("dave", &dba, true, 0), "g"),
            Ok(Transition::Approved { grant: None })
        );
        // Not held: the approval becomes a one-shot grant for the exact text.
        let mut c = request(1, false);
        let Ok(Transition::Approved { grant: Some(mut g) }) =
            vote(&mut c, &v("carol", &dba, true, 0), "g1")
        else {
            panic!("expected a one-shot grant")
        };
        assert_eq!(g.kind, ONE_SHOT);
        let sha = text_sha256(&c.text);
        assert!(use_one_shot(&mut g, "agent:writer", "prod", "other", 11).is_err());
        assert!(use_one_shot(&mut g, "agent:writer", "prod", &sha, 11).is_ok());
        assert!(use_one_shot(&mut g, "agent:writer", "prod", &sha, 12).is_err());
        assert!(!grant_active(&g, 12));
    }

    proptest! {
        /// Whatever the votes, a request is approved only with `quorum` distinct approvers from
        /// the group, none of them the requester, and no denial among them.
        #[test]
        fn approval_needs_a_real_quorum(
            quorum in 1u32..4,
            votes in proptest::collection::vec((0usize..5, any::<bool>(), any::<bool>()), 0..12)
        ) {
            let people = ["agent:writer", "carol", "dave", "erin", "frank"];
            let mut a = request(quorum, true);
            for (who, in_group, approve) in votes {
                let groups = if in_group { vec!["dba".to_string()] } else { vec![] };
                let _ = vote(&mut a, &v(people[who], &groups, approve, 0), "g");
            }
            if a.state == APPROVED {
                let ok: Vec<_> = a.decisions.iter().filter(|d| d.approve).collect();
                prop_assert!(ok.len() as u32 >= quorum);
                prop_assert!(ok.iter().all(|d| d.approver != "agent:writer"));
                let mut names: Vec<_> = ok.iter().map(|d| d.approver.clone()).collect();
                names.sort();
                names.dedup();
                prop_assert_eq!(names.len(), ok.len());
                prop_assert!(a.decisions.iter().all(|d| d.approve));
            }
            prop_assert!(a.decisions.iter().all(|d| d.approver != "agent:writer"));
        }
    }
}
