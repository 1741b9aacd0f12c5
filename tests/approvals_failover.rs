//! A pending approval survives the loss of the control-plane leader: a three-node cluster, NATS,
//! a `custos edge` process following all three nodes, a real PostgreSQL and psql. The leader is
//! SIGKILLed while psql waits; the request is approved through another node and the DELETE runs.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::edge::{app_database, Background};
use common::pg::PgServer;
use common::{cli, cluster, free_port, leader, wait_port, ClusterOpts, Nats};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const POLICY: &str = r#"
@id("agents-read")
permit (principal in Custos::Group::"agents", action == Custos::Action::"sql:select", resource);
@id("agent-deletes-need-a-dba")
@approval("group=dba,timeout=120s")
permit (principal in Custos::Group::"agents", action == Custos::Action::"sql:delete", resource);
"#;

fn ok(server: &str, args: &[&str]) -> Result<String> {
    let (code, out, err) = cli(server, args);
    if code != 0 {
        bail!("custos {args:?}: {out}{err}");
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_approval_survives_the_leader_and_is_approved_through_another_node() -> Result<()>
{
    let nats = Nats::start()?;
    let root = tempfile::tempdir()?;
    let mut nodes = cluster(
        root.path(),
        &[1, 2, 3],
        &[1, 2, 3],
        &ClusterOpts {
            nats_url: Some(nats.url()),
            ..Default::default()
        },
    )?;
    for n in nodes.iter_mut() {
        n.spawn()?;
    }
    let t0 = Instant::now();
    while leader(&nodes.iter().collect::<Vec<_>>()).await.is_none() {
        assert!(t0.elapsed() < Duration::from_secs(30), "no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s1 = nodes[0].server();
    let pg = PgServer::start(&[])?;
    let app_pw = app_database(&pg)?;
    let policy = root.path().join("p.cedar");
    std::fs::write(&policy, POLICY)?;
    ok(&s1, &["policy", "apply", policy.to_str().unwrap()])?;
    let secret = format!("password={app_pw}");
    ok(
        &s1,
        &[
            "connection",
            "put",
            "app",
            "--kind",
            "postgres",
            "--address",
            &pg.addr(),
            "-o",
            "database=app",
            "-s",
            "username=app",
            "-s",
            &secret,
        ],
    )?;
    let agent = ok(
        &s1,
        &["token", "issue", "agent:reporter", "--group", "agents"],
    )?
    .trim()
    .to_string();
    let carol = ok(
        &s1,
        &[
            "token", "issue", "carol", "--group", "dba", "--role", "approver",
        ],
    )?
    .trim()
    .to_string();
    let edge_token = ok(
        &s1,
        &["token", "issue", "edge", "--role", "edge", "--ttl", "24h"],
    )?
    .trim()
    .to_string();
    let port = free_port();
    let servers: Vec<String> = nodes.iter().map(|n| format!("\"{}\"", n.addr())).collect();
    let cfg = root.path().join("edge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[edge]\nid = \"edge-a\"\n[controlplane]\nservers = [{}]\ntoken = \"{edge_token}\"\nmax_backoff_ms = 300\n[bus.nats]\nurl = \"{}\"\n[postgres]\nlisten = \"127.0.0.1:{port}\"\nallow_insecure_password = true\n",
            servers.join(", "),
            nats.url()
        ),
    )?;
    let log = std::fs::File::create(root.path().join("edge.log"))?;
    let _edge = Proc(
        Command::new(common::custos_bin())
            .args(["edge", "--config"])
            .arg(&cfg)
            .env("CUSTOS_LOG", "info")
            .stderr(Stdio::from(log))
            .spawn()?,
    );
    wait_port(port, Duration::from_secs(20))?;
    let conninfo =
        format!("host=127.0.0.1 port={port} dbname=app user=agent:reporter sslmode=disable");
    let psql = |sql: &str| {
        Background::spawn(
            Command::new("psql")
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
                .arg(&conninfo)
                .env("PGPASSWORD", &agent)
                .env("PGCONNECT_TIMEOUT", "10")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
    };
    let t0 = Instant::now();
    loop {
        let (code, _, _) = psql("SELECT count(*) FROM canary").finish(Duration::from_secs(15))?;
        if code == 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "edge never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut held = psql("DELETE FROM canary WHERE id = 1");
    let as_carol = |server: &str, args: &[&str]| {
        let o = Command::new(common::custos_bin())
            .args(args)
            .env("CUSTOS_SERVER", server)
            .env("CUSTOS_TOKEN", &carol)
            .output()
            .unwrap();
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let t0 = Instant::now();
    let id = loop {
        let (_, out) = as_carol(&s1, &["approvals", "list", "--state", "pending", "--json"]);
        if let Some(line) = out.lines().find(|l| l.starts_with('{')) {
            let v: serde_json::Value = serde_json::from_str(line)?;
            break v["id"].as_str().unwrap().to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no pending request: {out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Kill the leader while the request is pending.
    let old = leader(&nodes.iter().collect::<Vec<_>>()).await.unwrap();
    nodes.iter_mut().find(|n| n.id == old).unwrap().kill();
    let survivors: Vec<&common::NodeProc> = nodes.iter().filter(|n| n.id != old).collect();
    let t0 = Instant::now();
    loop {
        if let Some(l) = leader(&survivors).await {
            if l != old {
                break;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no new leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(held.running(), "psql must still wait");
    let other = survivors[0].server();
    let (_, got) = as_carol(&other, &["approvals", "get", &id]);
    assert!(got.contains("pending"), "{got}");
    let t0 = Instant::now();
    loop {
        let (approved, out) = as_carol(&other, &["approvals", "approve", &id]);
        if approved {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "approve failed: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, _, stderr) = held.finish(Duration::from_secs(20)).map_err(|e| {
        anyhow::anyhow!(
            "{e}: the DELETE did not run after the approval; edge log:\n{}",
            std::fs::read_to_string(root.path().join("edge.log")).unwrap_or_default()
        )
    })?;
    assert_eq!(code, 0, "{stderr}");
    let rows = pg.psql_super(
        "app",
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM canary",
    )?;
    assert_eq!(rows.trim(), "2,3");
    // The decision is in the log of the surviving nodes.
    for n in &survivors {
        let t0 = Instant::now();
        loop {
            let out = ok(
                &n.server(),
                &["audit", "search", "--kind", "approval_decided", "--json"],
            )?;
            if out.contains(&id) && out.contains("\"approved\"") {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "node {}: {out}",
                n.id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // With no control plane at all, the edge still serves reads from its last configuration,
    // and refuses (never runs) a command that needs approval.
    for n in nodes.iter_mut() {
        n.kill();
    }
    let (code, out, err) = psql("SELECT count(*) FROM canary").finish(Duration::from_secs(15))?;
    assert_eq!((code, out.trim()), (0, "2"), "{err}");
    let started = Instant::now();
    let (code, _, err) = psql("DELETE FROM canary WHERE id = 2").finish(Duration::from_secs(60))?;
    assert_ne!(code, 0);
    assert!(err.contains("cannot be reached"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "{:?}",
        started.elapsed()
    );
    let rows = pg.psql_super(
        "app",
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM canary",
    )?;
    assert_eq!(rows.trim(), "2,3");
    Ok(())
}

/// An edge that dies while a command is held cancels the request when it comes back, instead of
/// leaving it open until its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_edge_cancels_the_requests_it_left() -> Result<()> {
    let nats = Nats::start()?;
    let root = tempfile::tempdir()?;
    let mut nodes = cluster(
        root.path(),
        &[1],
        &[1],
        &ClusterOpts {
            nats_url: Some(nats.url()),
            ..Default::default()
        },
    )?;
    nodes[0].spawn()?;
    let s1 = nodes[0].server();
    let t0 = Instant::now();
    while !cli(&s1, &["cluster", "status"]).1.contains("leader 1") {
        assert!(t0.elapsed() < Duration::from_secs(20), "no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pg = PgServer::start(&[])?;
    let app_pw = app_database(&pg)?;
    let policy = root.path().join("p.cedar");
    std::fs::write(&policy, POLICY)?;
    ok(&s1, &["policy", "apply", policy.to_str().unwrap()])?;
    let secret = format!("password={app_pw}");
    ok(
        &s1,
        &[
            "connection",
            "put",
            "app",
            "--kind",
            "postgres",
            "--address",
            &pg.addr(),
            "-o",
            "database=app",
            "-s",
            "username=app",
            "-s",
            &secret,
        ],
    )?;
    let agent = ok(
        &s1,
        &["token", "issue", "agent:reporter", "--group", "agents"],
    )?
    .trim()
    .to_string();
    let edge_token = ok(
        &s1,
        &["token", "issue", "edge", "--role", "edge", "--ttl", "24h"],
    )?
    .trim()
    .to_string();
    let port = free_port();
    let cfg = root.path().join("edge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[edge]\nid = \"edge-r\"\n[controlplane]\nservers = [\"{}\"]\ntoken = \"{edge_token}\"\nmax_backoff_ms = 300\n[bus.nats]\nurl = \"{}\"\n[postgres]\nlisten = \"127.0.0.1:{port}\"\nallow_insecure_password = true\n",
            nodes[0].addr(),
            nats.url()
        ),
    )?;
    let start_edge = || -> Result<Proc> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.path().join("edge.log"))?;
        let p = Proc(
            Command::new(common::custos_bin())
                .args(["edge", "--config"])
                .arg(&cfg)
                .env("CUSTOS_LOG", "info")
                .stderr(Stdio::from(log))
                .spawn()?,
        );
        wait_port(port, Duration::from_secs(20))?;
        Ok(p)
    };
    let edge = start_edge()?;
    let conninfo =
        format!("host=127.0.0.1 port={port} dbname=app user=agent:reporter sslmode=disable");
    let psql = |sql: &str| {
        Background::spawn(
            Command::new("psql")
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
                .arg(&conninfo)
                .env("PGPASSWORD", &agent)
                .env("PGCONNECT_TIMEOUT", "10")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
    };
    let t0 = Instant::now();
    while psql("SELECT 1").finish(Duration::from_secs(15))?.0 != 0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "edge never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = psql("DELETE FROM canary WHERE id = 1");
    let t0 = Instant::now();
    let id = loop {
        let (_, out, _) = cli(&s1, &["approvals", "list", "--state", "pending", "--json"]);
        if let Some(line) = out.lines().find(|l| l.starts_with('{')) {
            let v: serde_json::Value = serde_json::from_str(line)?;
            break v["id"].as_str().unwrap().to_string();
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "no pending request");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // SIGKILL the edge: its client loses the connection; the request is still pending.
    drop(edge);
    let (code, _, _) = held.finish(Duration::from_secs(10))?;
    assert_ne!(code, 0, "the client must see an error");
    let get = |id: &str| -> serde_json::Value {
        let (_, out, _) = cli(&s1, &["approvals", "get", id, "--json"]);
        serde_json::from_str(&out).unwrap_or(serde_json::Value::Null)
    };
    assert_eq!(get(&id)["state"], "pending");
    // The edge comes back and cancels what its previous run left.
    let _edge = start_edge()?;
    let t0 = Instant::now();
    loop {
        let a = get(&id);
        if a["state"] == "cancelled" {
            assert!(
                a["comment"].as_str().unwrap_or("").contains("restarted"),
                "{a}"
            );
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "not cancelled: {a}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = pg.psql_super("app", "SELECT count(*) FROM canary")?;
    assert_eq!(rows.trim(), "3");
    Ok(())
}
