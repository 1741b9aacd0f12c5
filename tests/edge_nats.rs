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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_over_nats_keep_serving_without_the_control_plane_and_refuse_without_the_bus(
) -> Result<()> {
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
    for i in 0..2 {
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
