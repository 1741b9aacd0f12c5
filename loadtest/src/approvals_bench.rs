//! `custos-loadtest approvals`: how long a held statement takes to start upstream once an approver
//! decides.
//!
//! Each round: a client (tokio-postgres, through the edge) runs an `INSERT … RETURNING
//! clock_timestamp()` that its policy holds for approval; the runner sees the request on
//! `Approvals.Watch`, calls `Approvals.Approve`, and reads the server-side time at which the
//! statement ran. The decision is committed in Raft between the call being sent and its reply,
//! so the runner reports both bounds:
//!
//! - reply → start: from the Approve reply (decision committed and applied) to the statement
//!   starting in PostgreSQL — the edge's reaction time;
//! - sent → start: from sending Approve to the statement starting — includes the Raft commit.
//!
//! All clocks are the same machine's wall clock.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use custos_proto::v1::{approvals_client::ApprovalsClient, DecideRequest, WatchApprovalsRequest};
use tonic::transport::Channel;

#[derive(clap::Args, Clone, Debug)]
pub struct Opts {
    /// Control-plane gRPC address (http://host:port).
    #[arg(long)]
    pub server: String,
    /// An approver's token (role approver, in the policy's group).
    #[arg(long)]
    pub approver_token: String,
    /// libpq connection string to the edge for the requesting identity.
    #[arg(long)]
    pub conninfo: String,
    /// Approvals to time.
    #[arg(long, default_value_t = 200)]
    pub rounds: usize,
}

fn now_us() -> i64 {
    custos_core::events::now_unix_nano() / 1000
}

fn pct(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub async fn run(o: &Opts) -> Result<String> {
    let (client, conn) = tokio_postgres::connect(&o.conninfo, tokio_postgres::NoTls)
        .await
        .context("connect to the edge")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let client = std::sync::Arc::new(client);
    let ch = Channel::from_shared(o.server.clone())?.connect().await?;
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", o.approver_token).parse()?;
    let auth = move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    };
    let mut api = ApprovalsClient::with_interceptor(ch, auth);
    let mut watch = api
        .watch(WatchApprovalsRequest {
            include_decided: false,
        })
        .await?
        .into_inner();
    let (mut after_reply, mut after_sent, mut rpc) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..o.rounds {
        let c = client.clone();
        let held = tokio::spawn(async move {
            c.query_one(
                "INSERT INTO bench_approvals (n) VALUES ($1) RETURNING (extract(epoch from clock_timestamp()) * 1000000)::bigint",
                &[&(i as i32)],
            )
            .await
        });
        let req = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .context("no approval request within 10 s")??
            .context("the watch stream ended")?;
        let sent = now_us();
        let reply = api
            .approve(DecideRequest {
                id: req.id.clone(),
                comment: String::new(),
                grant_seconds: 0,
            })
            .await?
            .into_inner();
        let replied = now_us();
        if reply.state != "approved" {
            bail!("approval {} is {}", reply.id, reply.state);
        }
        let row = tokio::time::timeout(Duration::from_secs(10), held)
            .await
            .context("the held statement did not finish within 10 s")???;
        let started: i64 = row.get(0);
        after_reply.push(started - replied);
        after_sent.push(started - sent);
        rpc.push(replied - sent);
    }
    after_reply.sort_unstable();
    after_sent.sort_unstable();
    rpc.sort_unstable();
    let ms = |us: i64| format!("{:.1}", us as f64 / 1000.0);
    let mut out = format!(
        "| measure ({} approvals) | p50 ms | p99 ms | max ms |\n| --- | ---: | ---: | ---: |\n",
        o.rounds
    );
    for (name, v) in [
        ("Approve reply → statement starts upstream", &after_reply),
        ("Approve sent → statement starts upstream", &after_sent),
        ("Approve round trip (Raft commit)", &rpc),
    ] {
        out.push_str(&format!(
            "| {name} | {} | {} | {} |\n",
            ms(pct(v, 0.5)),
            ms(pct(v, 0.99)),
            ms(*v.last().unwrap_or(&0))
        ));
    }
    Ok(out)
}
