//! Production shape: a control-plane node ingesting from NATS, two `custos edge` processes
//! publishing to NATS and serving the same connection, a real PostgreSQL.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Result;
use common::edge::{app_database, POLICY};
use common::pg::PgServer;
use common::{cli, cluster, free_port, wait_port, ClusterOpts, Nats, ADMIN_TOKEN};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn psql(port: u16, token: &str, sql: &str) -> (i32, String, String) {
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .arg(format!(
            "host=127.0.0.1 port={port} dbname=app user=agent:reporter sslmode=disable"
        ))
        .env("PGPASSWORD", token)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A control-plane node ingesting from `nats`, a real PostgreSQL with connection `app`, and
/// `n_edges` edges publishing to `nats` (strict audit, the default).
struct Env {
    root: tempfile::TempDir,
    nodes: Vec<common::NodeProc>,
    _pg: PgServer,
    agent: String,
    ports: Vec<u16>,
    _edges: Vec<Proc>,
}

async fn start(nats: &Nats, n_edges: usize) -> Result<Env> {
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
    let server = nodes[0].server();
    let mut led = false;
    for _ in 0..100 {
        if cli(&server, &["cluster", "status"]).1.contains("leader 1") {
            led = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(led, "{}", nodes[0].log());
    let pg = PgServer::start(&[])?;
    let app_pw = app_database(&pg)?;
    let policy = root.path().join("p.cedar");
    std::fs::write(&policy, POLICY)?;
    assert_eq!(
        cli(&server, &["policy", "apply", policy.to_str().unwrap()]).0,
        0
    );
    let secret = format!("password={app_pw}");
    let (code, _, err) = cli(
        &server,
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
    );
    assert_eq!(code, 0, "{err}");
    let agent = cli(
        &server,
        &["token", "issue", "agent:reporter", "--group", "agents"],
    )
    .1
    .trim()
    .to_string();
    let edge_token = cli(
        &server,
        &["token", "issue", "edge", "--role", "edge", "--ttl", "24h"],
    )
    .1
    .trim()
    .to_string();
    let _ = ADMIN_TOKEN;
    // Two edges.
    let mut edges = Vec::new();
    let mut ports = Vec::new();
    for i in 0..n_edges {
        let port = free_port();
        let cfg = root.path().join(format!("edge{i}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[edge]\nid = \"edge-{i}\"\n[controlplane]\nservers = [\"{}\"]\ntoken = \"{edge_token}\"\nmax_backoff_ms = 300\n[bus.nats]\nurl = \"{}\"\npublish_timeout_ms = 1500\n[postgres]\nlisten = \"127.0.0.1:{port}\"\nallow_insecure_password = true\n",
                nodes[0].addr(),
                nats.url()
            ),
        )?;
        let log = std::fs::File::create(root.path().join(format!("edge{i}.log")))?;
        edges.push(Proc(
            Command::new(common::custos_bin())
                .args(["edge", "--config"])
                .arg(&cfg)
                .env("CUSTOS_LOG", "info")
                .stderr(Stdio::from(log))
                .spawn()?,
        ));
        wait_port(port, Duration::from_secs(20))?;
        ports.push(port);
    }
    Ok(Env {
        root,
        nodes,
        _pg: pg,
        agent,
        ports,
        _edges: edges,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_over_nats_keep_serving_without_the_control_plane_and_refuse_without_the_bus(
) -> Result<()> {
    let nats = Nats::start()?;
    let Env {
        root: _root,
        mut nodes,
        _pg,
        agent,
        ports,
        _edges,
    } = start(&nats, 2).await?;
    let server = nodes[0].server();
    for &port in &ports {
        let mut ok = false;
        for _ in 0..100 {
            let (code, out, _) = psql(port, &agent, "SELECT count(*) FROM canary");
            if code == 0 && out.trim() == "3" {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "edge on {port} never served");
    }
    // Both edges' commands reach the canonical log through NATS.
    let mut seen = false;
    for _ in 0..100 {
        let (_, out, _) = cli(
            &server,
            &[
                "audit",
                "search",
                "--kind",
                "command_received",
                "--json",
                "--limit",
                "1000",
            ],
        );
        if out.contains("\"edge-0\"") && out.contains("\"edge-1\"") {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "commands of both edges not in the audit log");
    // The control plane goes away: the edges keep serving with the last configuration.
    nodes[0].kill();
    let (code, out, err) = psql(ports[0], &agent, "SELECT count(*) FROM canary");
    assert_eq!((code, out.trim()), (0, "3"), "{err}");
    // The bus goes away: strict audit refuses new sessions and new statements, saying why.
    let (client, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} dbname=app user=agent:reporter password={agent}",
            ports[1]
        ),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    client.batch_execute("SELECT 1").await?;
    drop(nats);
    let e = client.batch_execute("SELECT 2").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("57P03"), "{e:?}");
    assert!(
        format!("{e:?}").contains("audit bus is unavailable"),
        "{e:?}"
    );
    let (code, _, err) = psql(ports[0], &agent, "SELECT 1");
    assert_ne!(code, 0);
    assert!(err.contains("audit bus is unavailable"), "{err}");
    Ok(())
}

/// The bus fills up (JetStream storage capped at 2 MiB): strict statements are refused with
/// 57P03 naming the bus and the broker's answer, none runs unrecorded, and every statement that
/// succeeded has exactly one record. When the operator frees the stream, statements run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_bus_refuses_strict_statements_and_drops_no_record() -> Result<()> {
    let nats = Nats::start_with_store_limit(2 * 1024 * 1024)?;
    let env = start(&nats, 1).await?;
    let server = env.nodes[0].server();
    let (client, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} dbname=app user=agent:reporter password={}",
            env.ports[0], env.agent
        ),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    // Each statement's record carries ~16 KB of text; 2 MiB is full after ~130 of them.
    let pad = "x".repeat(16 * 1024);
    let mut acked = Vec::new();
    let mut refusal = None;
    for i in 0..1000 {
        let marker = format!("mk_full_{i}");
        match client
            .batch_execute(&format!("SELECT 1 /* {marker} {pad} */"))
            .await
        {
            Ok(()) => acked.push(marker),
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let e = refusal.expect("2 MiB of bus storage never filled up");
    assert!(acked.len() > 20, "only {} statements ran", acked.len());
    assert_eq!(e.code().map(|c| c.code()), Some("57P03"), "{e:?}");
    let msg = format!("{e:?}");
    eprintln!(
        "the bus filled up after {} statements; the next was refused: {msg}",
        acked.len()
    );
    assert!(
        msg.contains("the statement was not run")
            && msg.contains("JetStream storage is full")
            && msg.contains("max_file_store"),
        "{msg}"
    );
    // Still refused, and the session stays usable for the answer.
    let again = client.batch_execute("SELECT 2 /* mk_full_refused */").await;
    assert_eq!(again.unwrap_err().code().map(|c| c.code()), Some("57P03"));
    // Every acknowledged statement has exactly one record; the refused ones have none.
    let count = |server: String| async move {
        let (_, out, _) = cli(
            &server,
            &[
                "audit",
                "search",
                "--kind",
                "command_received",
                "--json",
                "--limit",
                "5000",
            ],
        );
        out
    };
    let mut out = String::new();
    for _ in 0..100 {
        out = count(server.clone()).await;
        if acked.iter().all(|m| out.contains(&format!("{m} "))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for m in &acked {
        assert_eq!(
            out.matches(&format!("{m} ")).count(),
            1,
            "{m}: acknowledged, so exactly one record"
        );
    }
    assert!(!out.contains("mk_full_refused"));
    let refused_marker = format!("mk_full_{} ", acked.len());
    assert!(
        !out.contains(&refused_marker),
        "a refused statement was recorded"
    );
    let (code, v, _) = cli(&server, &["audit", "verify"]);
    assert_eq!(code, 0, "{v}");
    // The operator frees the stream (everything in it is already in the log): statements run.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    js.get_stream("CUSTOS_EVENTS").await?.purge().await?;
    let mut ok = false;
    for _ in 0..50 {
        if client
            .batch_execute("SELECT 3 /* mk_full_after_purge */")
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "statements never ran again after the stream was purged");
    let mut recorded = false;
    for _ in 0..100 {
        if count(server.clone()).await.contains("mk_full_after_purge") {
            recorded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recorded, "the statement after the purge has no record");
    let (code, v, _) = cli(&server, &["audit", "verify"]);
    assert_eq!(
        code, 0,
        "a purge of already-ingested events loses nothing: {v}"
    );
    Ok(())
}
