//! Human-readable output of records, connections and cluster status.

use custos_proto::v1::{self as pb, event::Payload, Event};
use prost::Message;

pub fn time(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns)
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

fn summary(e: &Event) -> String {
    match &e.payload {
        Some(Payload::SessionStarted(s)) => {
            format!("{} session from {}", s.protocol, s.client_addr)
        }
        Some(Payload::SessionEnded(s)) => format!(
            "ended: {} after {} ms, {} commands",
            s.reason, s.duration_ms, s.commands
        ),
        Some(Payload::CommandReceived(c)) => {
            let verdict = custos_core::audit::event_verdict(e).unwrap_or("");
            let action = c
                .classifications
                .first()
                .map(|k| k.action.as_str())
                .unwrap_or("");
            format!("{verdict} {action} {:?}", c.text)
        }
        Some(Payload::CommandCompleted(c)) => {
            format!(
                "done in {} us, {} rows, {} masked{}",
                c.duration_us,
                c.rows,
                c.masked_values,
                if c.error.is_empty() {
                    String::new()
                } else {
                    format!(", error {}", c.error)
                }
            )
        }
        Some(Payload::ApprovalRequested(a)) => {
            format!("approval {} requested for {:?}", a.approval_id, a.text)
        }
        Some(Payload::ApprovalDecided(a)) => {
            if a.state == "pending" {
                format!(
                    "approval {}: {} approved ({} so far)",
                    a.approval_id, a.approver, a.approvals
                )
            } else if a.approver.is_empty() {
                format!("approval {} {}", a.approval_id, a.state)
            } else {
                format!("approval {} {} by {}", a.approval_id, a.state, a.approver)
            }
        }
        Some(Payload::PolicyApplied(p)) => format!(
            "policy version {} applied ({} policies)",
            p.version, p.policies
        ),
        Some(Payload::ConnectionChanged(c)) => {
            format!("connection {} ({} {})", c.change, c.kind, c.address)
        }
        Some(Payload::TokenIssued(t)) => format!("token {} issued to {}", t.token_id, t.subject),
        Some(Payload::GrantUsed(g)) => format!(
            "{} grant {} (approval {}) let command {} run",
            g.kind, g.grant_id, g.approval_id, g.command_id
        ),
        Some(Payload::GrantRevoked(g)) => {
            format!("grant {} revoked by {}", g.grant_id, g.revoked_by)
        }
        None => "(no payload)".into(),
    }
}

pub fn record(r: &pb::AuditRecord) -> String {
    let e = Event::decode(&*r.event).unwrap_or_default();
    format!(
        "{:>8} {} {:<18} {:<16} {:<12} {}",
        r.seq,
        time(e.time_unix_nano),
        custos_proto::payload_kind(e.payload.as_ref()),
        e.identity,
        e.connection,
        summary(&e)
    )
}

pub fn json(r: &pb::AuditRecord) -> String {
    let e = Event::decode(&*r.event).unwrap_or_default();
    custos_core::audit::ocsf_json(r, &e).to_string()
}

pub fn connection(c: &pb::Connection) -> String {
    let mut opts: Vec<_> = c.options.iter().map(|(k, v)| format!("{k}={v}")).collect();
    opts.sort();
    format!(
        "{}\t{}\t{}\trev {}\t{}",
        c.name,
        c.kind,
        c.address,
        c.revision,
        opts.join(" ")
    )
}

pub fn status(s: &pb::ClusterStatus) -> String {
    let mut out = format!(
        "node {} is {} (term {}), leader {} {}\nlog index {}, applied {}, snapshot {}, audit head seq {}\nmembers:",
        s.node_id,
        s.state,
        s.term,
        if s.leader_id == 0 { "none".to_string() } else { s.leader_id.to_string() },
        s.leader_addr,
        s.last_log_index,
        s.last_applied,
        s.snapshot_index,
        s.audit_head_seq
    );
    for n in &s.nodes {
        out.push_str(&format!("\n  {} {} ({})", n.id, n.addr, n.role));
    }
    out
}
