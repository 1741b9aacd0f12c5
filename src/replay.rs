//! `custos replay SESSION_ID`: a session's transcript from the canonical audit log.

use std::collections::HashMap;

use anyhow::{bail, Result};
use custos_proto::v1::{self as pb, event::Payload, Event};
use prost::Message;
use serde_json::{json, Value};

use crate::render::time;
use crate::Client;

/// Every record of one session, in log order.
pub async fn records(c: &mut Client, session: &str) -> Result<Vec<(u64, Event)>> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = c
            .query(pb::AuditQuery {
                session_id: session.to_string(),
                after_seq: after,
                limit: 1000,
                ..Default::default()
            })
            .await?;
        let n = page.records.len();
        for r in page.records {
            after = after.max(r.seq);
            out.push((r.seq, Event::decode(&*r.event)?));
        }
        if n < 1000 {
            break;
        }
    }
    if out.is_empty() {
        bail!("no records for session {session}: check the id (custos audit search --kind session_started lists sessions)");
    }
    Ok(out)
}

fn verdict_name(v: i32) -> &'static str {
    match pb::Verdict::try_from(v).unwrap_or(pb::Verdict::Unspecified) {
        pb::Verdict::Allow => "allow",
        pb::Verdict::Deny => "deny",
        pb::Verdict::PendingApproval => "pending_approval",
        pb::Verdict::Approved => "approved",
        pb::Verdict::Unspecified => "unspecified",
    }
}

/// The transcript as JSON entries, in order: the session start, each command (with its
/// completion joined by command id), approvals, and the end.
pub fn transcript(events: &[(u64, Event)]) -> Vec<Value> {
    let completed: HashMap<&str, &pb::CommandCompleted> = events
        .iter()
        .filter_map(|(_, e)| match &e.payload {
            Some(Payload::CommandCompleted(c)) => Some((c.command_id.as_str(), c)),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for (seq, e) in events {
        let t = time(e.time_unix_nano);
        match &e.payload {
            Some(Payload::SessionStarted(s)) => out.push(json!({
                "type": "session_started", "seq": seq, "time": t, "session": e.session_id,
                "identity": e.identity, "connection": e.connection, "protocol": s.protocol,
                "client_addr": s.client_addr, "groups": s.groups, "auth_method": s.auth_method,
                "tls": s.tls, "client_name": s.client_name,
            })),
            Some(Payload::CommandReceived(c)) => {
                let done = completed.get(c.command_id.as_str());
                out.push(json!({
                    "type": "command", "seq": seq, "time": t, "command_id": c.command_id,
                    "text": c.text, "verdict": verdict_name(c.verdict),
                    "actions": c.classifications.iter().map(|k| k.action.clone()).collect::<Vec<_>>(),
                    "tables": c.classifications.iter().flat_map(|k| k.resources.clone()).collect::<Vec<_>>(),
                    "policies": c.policies, "reason": c.reason, "parameters": c.parameters,
                    "approval_id": c.approval_id,
                    "completed": done.is_some(),
                    "duration_us": done.map(|d| d.duration_us),
                    "rows": done.map(|d| d.rows),
                    "masked_values": done.map(|d| d.masked_values),
                    "error": done.map(|d| d.error.clone()).filter(|e| !e.is_empty()),
                    "result_excerpt": done.map(|d| d.result_excerpt.clone()),
                    "result_truncated": done.map(|d| d.result_truncated),
                }));
            }
            Some(Payload::ApprovalRequested(a)) => out.push(json!({
                "type": "approval_requested", "seq": seq, "time": t, "approval_id": a.approval_id,
                "command_id": a.command_id, "approver_group": a.approver_group, "quorum": a.quorum,
            })),
            Some(Payload::ApprovalDecided(a)) => out.push(json!({
                "type": "approval_decided", "seq": seq, "time": t, "approval_id": a.approval_id,
                "state": a.state, "approver": a.approver, "comment": a.comment,
            })),
            Some(Payload::GrantUsed(g)) => out.push(json!({
                "type": "grant_used", "seq": seq, "time": t, "grant_id": g.grant_id,
                "approval_id": g.approval_id, "kind": g.kind, "command_id": g.command_id,
            })),
            Some(Payload::SessionEnded(s)) => out.push(json!({
                "type": "session_ended", "seq": seq, "time": t, "reason": s.reason,
                "duration_ms": s.duration_ms, "commands": s.commands, "denied": s.denied,
                "error": s.error,
            })),
            _ => {}
        }
    }
    out
}

/// The transcript for people.
pub fn text(entries: &[Value]) -> String {
    let mut out = String::new();
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let mut n = 0;
    for e in entries {
        match e["type"].as_str().unwrap_or("") {
            "session_started" => out.push_str(&format!(
                "session {} — {} on {} ({} from {}, {}{})\nstarted {}\n\n",
                s(e, "session"),
                s(e, "identity"),
                s(e, "connection"),
                s(e, "protocol"),
                s(e, "client_addr"),
                s(e, "auth_method"),
                if e["tls"].as_bool() == Some(true) {
                    ", tls"
                } else {
                    ""
                },
                s(e, "time"),
            )),
            "command" => {
                n += 1;
                let verdict = s(e, "verdict").to_uppercase();
                out.push_str(&format!(
                    "[{}] #{n} {verdict:<8} {}\n",
                    s(e, "time"),
                    s(e, "text")
                ));
                let actions: Vec<&str> = e["actions"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                out.push_str(&format!("      actions {}", actions.join(" ")));
                let params = e["parameters"].as_array().map(Vec::len).unwrap_or(0);
                if params > 0 {
                    out.push_str(&format!("  parameters {}", e["parameters"]));
                }
                out.push('\n');
                if !s(e, "reason").is_empty() {
                    out.push_str(&format!("      reason  {}\n", s(e, "reason")));
                }
                if !s(e, "approval_id").is_empty() {
                    out.push_str(&format!("      approval {}\n", s(e, "approval_id")));
                }
                if e["completed"].as_bool() == Some(true) {
                    out.push_str(&format!(
                        "      → {} rows in {} µs, {} values masked{}\n",
                        e["rows"],
                        e["duration_us"],
                        e["masked_values"],
                        match e["error"].as_str() {
                            Some(err) => format!(", error: {err}"),
                            None => String::new(),
                        }
                    ));
                    let excerpt = s(e, "result_excerpt");
                    for line in excerpt.lines() {
                        out.push_str(&format!("      | {line}\n"));
                    }
                    if e["result_truncated"].as_bool() == Some(true) {
                        out.push_str("      | … (result truncated in the audit record)\n");
                    }
                } else if s(e, "verdict") != "deny" {
                    out.push_str("      → no completion recorded\n");
                }
            }
            "approval_requested" => out.push_str(&format!(
                "[{}] approval {} requested from {} (quorum {})\n",
                s(e, "time"),
                s(e, "approval_id"),
                s(e, "approver_group"),
                e["quorum"]
            )),
            "grant_used" => out.push_str(&format!(
                "[{}] {} grant {} (approval {}) let command {} run without asking\n",
                s(e, "time"),
                s(e, "kind"),
                s(e, "grant_id"),
                s(e, "approval_id"),
                s(e, "command_id")
            )),
            "approval_decided" => out.push_str(&format!(
                "[{}] approval {} {} by {} {}\n",
                s(e, "time"),
                s(e, "approval_id"),
                s(e, "state"),
                s(e, "approver"),
                s(e, "comment")
            )),
            "session_ended" => out.push_str(&format!(
                "\nsession ended {}: {} ({} commands, {} denied, {} ms){}\n",
                s(e, "time"),
                s(e, "reason"),
                e["commands"],
                e["denied"],
                e["duration_ms"],
                if s(e, "error").is_empty() {
                    String::new()
                } else {
                    format!(", error: {}", s(e, "error"))
                }
            )),
            _ => {}
        }
    }
    out
}
