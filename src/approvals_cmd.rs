//! `custos approvals …` and `custos grants …`: how approvers see and decide held commands.

use anyhow::{Context, Result};
use clap::Subcommand;
use custos_proto::v1::{self as pb, approvals_client::ApprovalsClient};
use tonic::transport::Channel;

use crate::client::Client;
use crate::render;

#[derive(Subcommand, Debug)]
pub enum ApprovalsCmd {
    /// Print pending requests as they arrive (the open ones first); Ctrl-C to stop.
    Watch {
        /// Also print every state change (votes, approvals, denials, expiry).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// List requests, newest first.
    List {
        /// pending, approved, denied, expired or cancelled.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Show one request with its command, classification and votes.
    Get {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Approve. With --for, the same identity may run the same action on the same connection
    /// without asking again for that long (a time-boxed grant).
    Approve {
        id: String,
        /// Grant length, e.g. 30m or 2h (at most 7 days).
        #[arg(long = "for")]
        for_: Option<String>,
        #[arg(long, short, default_value = "")]
        comment: String,
    },
    /// Deny; the client sees the comment.
    Deny {
        id: String,
        #[arg(long, short)]
        comment: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum GrantsCmd {
    /// Grants in force (--all: also expired, used and revoked ones).
    List {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// End a grant at once.
    Revoke { id: String },
}

fn client(c: &Client) -> ApprovalsClient<Channel> {
    ApprovalsClient::new(c.channel())
}

pub fn approval_line(a: &pb::Approval) -> String {
    let votes = a.decisions.iter().filter(|d| d.approve).count();
    let mut text = a.text.replace('\n', " ");
    if text.len() > 80 {
        let mut cut = 77;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    format!(
        "{}  {:<9} {:<20} {:<12} {:<12} {}/{} {:<10} until {}  {:?}",
        a.id,
        a.state,
        a.identity,
        a.connection,
        a.action,
        votes,
        a.quorum,
        a.approver_group,
        render::time(a.expires_unix_nano),
        text
    )
}

fn approval_detail(a: &pb::Approval) -> String {
    let mut out = format!(
        "approval {}\n  state       {}\n  requester   {} (groups: {})\n  connection  {}\n  action      {}\n  policy      {}\n  approvers   {} approval(s) from group {}\n  created     {}\n  deadline    {}\n  edge        {} session {} command {}\n",
        a.id,
        a.state,
        a.identity,
        a.groups.join(", "),
        a.connection,
        a.action,
        a.policy_id,
        a.quorum,
        a.approver_group,
        render::time(a.created_unix_nano),
        render::time(a.expires_unix_nano),
        a.edge_id,
        a.session_id,
        a.command_id,
    );
    if !a.reason.is_empty() {
        out.push_str(&format!("  reason      {}\n", a.reason));
    }
    for c in &a.classifications {
        out.push_str(&format!(
            "  statement   {}: {} tables [{}] functions [{}]{}\n",
            c.statement_index + 1,
            c.action,
            c.resources.join(", "),
            c.functions.join(", "),
            if c.action.contains("update") || c.action.contains("delete") {
                if c.has_where {
                    " with WHERE"
                } else {
                    " WITHOUT WHERE"
                }
            } else {
                ""
            }
        ));
    }
    for d in &a.decisions {
        out.push_str(&format!(
            "  vote        {} {} at {}{}{}\n",
            d.approver,
            if d.approve { "approved" } else { "denied" },
            render::time(d.time_unix_nano),
            if d.grant_seconds > 0 {
                format!(" (grant for {} s)", d.grant_seconds)
            } else {
                String::new()
            },
            if d.comment.is_empty() {
                String::new()
            } else {
                format!(": {}", d.comment)
            }
        ));
    }
    if !a.grant_id.is_empty() {
        out.push_str(&format!("  grant       {}\n", a.grant_id));
    }
    if a.state != "pending" && !a.comment.is_empty() {
        out.push_str(&format!("  comment     {}\n", a.comment));
    }
    out.push_str(&format!(
        "  command\n    {}\n",
        a.text.replace('\n', "\n    ")
    ));
    out
}

fn grant_line(g: &pb::Grant, now: i64) -> String {
    let state = if g.revoked {
        "revoked"
    } else if g.kind == "one_shot" && g.used {
        "used"
    } else if now >= g.expires_unix_nano {
        "expired"
    } else {
        "active"
    };
    format!(
        "{}  {:<10} {:<8} {:<20} {:<12} {:<20} until {}  approval {} by {}",
        g.id,
        g.kind,
        state,
        g.identity,
        g.connection,
        g.actions.join(","),
        render::time(g.expires_unix_nano),
        g.approval_id,
        g.granted_by.join(", ")
    )
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

pub async fn approvals(c: &Client, cmd: ApprovalsCmd) -> Result<i32> {
    let mut api = client(c);
    match cmd {
        ApprovalsCmd::Watch { all, json: as_json } => {
            let mut s = api
                .watch(c.req(pb::WatchApprovalsRequest {
                    include_decided: all,
                }))
                .await
                .map_err(|s| c.err(s))?
                .into_inner();
            eprintln!("watching approval requests (Ctrl-C to stop)");
            while let Some(a) = s.message().await.map_err(|s| c.err(s))? {
                if as_json {
                    println!("{}", json(&a));
                } else {
                    println!("{}", approval_line(&a));
                    if a.state == "pending" && a.decisions.is_empty() {
                        println!("    approve: custos approvals approve {}   deny: custos approvals deny {} --comment WHY", a.id, a.id);
                    }
                }
            }
            eprintln!("the control plane closed the stream");
            Ok(1)
        }
        ApprovalsCmd::List {
            state,
            limit,
            json: as_json,
        } => {
            let list = api
                .list(c.req(pb::ListApprovalsRequest {
                    state: state.unwrap_or_default(),
                    limit,
                }))
                .await
                .map_err(|s| c.err(s))?
                .into_inner()
                .approvals;
            for a in &list {
                println!("{}", if as_json { json(a) } else { approval_line(a) });
            }
            if !as_json {
                eprintln!("{} requests", list.len());
            }
            Ok(0)
        }
        ApprovalsCmd::Get { id, json: as_json } => {
            let a = api
                .get(c.req(pb::ApprovalId { id }))
                .await
                .map_err(|s| c.err(s))?
                .into_inner();
            if as_json {
                println!("{}", json(&a));
            } else {
                print!("{}", approval_detail(&a));
            }
            Ok(0)
        }
        ApprovalsCmd::Approve { id, for_, comment } => {
            let grant_seconds = match for_ {
                None => 0,
                Some(d) => humantime::parse_duration(&d)
                    .with_context(|| format!("--for {d:?}: use e.g. 30m, 2h"))?
                    .as_secs(),
            };
            let a = api
                .approve(c.req(pb::DecideRequest {
                    id,
                    comment,
                    grant_seconds,
                }))
                .await
                .map_err(|s| c.err(s))?
                .into_inner();
            let votes = a.decisions.iter().filter(|d| d.approve).count();
            match a.state.as_str() {
                "approved" if a.grant_id.is_empty() => {
                    println!("approved {}: the command runs now", a.id)
                }
                "approved" => println!(
                    "approved {}: the command runs now; grant {} lets it run again without asking",
                    a.id, a.grant_id
                ),
                _ => println!(
                    "recorded your approval of {}: {votes} of {} so far",
                    a.id, a.quorum
                ),
            }
            Ok(0)
        }
        ApprovalsCmd::Deny { id, comment } => {
            let a = api
                .deny(c.req(pb::DecideRequest {
                    id,
                    comment,
                    grant_seconds: 0,
                }))
                .await
                .map_err(|s| c.err(s))?
                .into_inner();
            println!("denied {}: the client sees your comment", a.id);
            Ok(0)
        }
    }
}

pub async fn grants(c: &Client, cmd: GrantsCmd) -> Result<i32> {
    let mut api = client(c);
    match cmd {
        GrantsCmd::List { all, json: as_json } => {
            let list = api
                .list_grants(c.req(pb::ListGrantsRequest {
                    include_inactive: all,
                }))
                .await
                .map_err(|s| c.err(s))?
                .into_inner()
                .grants;
            let now = custos_core::events::now_unix_nano();
            for g in &list {
                println!("{}", if as_json { json(g) } else { grant_line(g, now) });
            }
            if !as_json {
                eprintln!("{} grants", list.len());
            }
            Ok(0)
        }
        GrantsCmd::Revoke { id } => {
            let g = api
                .revoke_grant(c.req(pb::GrantId { id }))
                .await
                .map_err(|s| c.err(s))?
                .into_inner();
            println!("revoked grant {} (approval {})", g.id, g.approval_id);
            Ok(0)
        }
    }
}
