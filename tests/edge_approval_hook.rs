//! The "hold for approval" step of the pipeline: an edge started in-process with its own
//! `ApprovalHook` holds a command a policy marks `@approval`, and forwards or refuses it by the
//! hook's decision. (The approvals service plugs in here.)

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use custos_controlplane::{ControlPlane, ControlPlaneConfig, EventInput};
use custos_core::bus::InProcBus;
use custos_edge::pipeline::{ApprovalHook, ApprovalOutcome, ApprovalRequest, Held, HoldStart};
use custos_edge::{pg::PgOptions, watch::WatchOptions, Edge, EdgeSetup};
use futures::future::BoxFuture;

/// Approves commands whose text contains "approve-me", refuses the rest; remembers requests.
struct Approver {
    seen: AtomicUsize,
    last: Mutex<Option<ApprovalRequest>>,
}

impl ApprovalHook for Approver {
    fn start<'a>(&'a self, req: &'a ApprovalRequest) -> BoxFuture<'a, HoldStart> {
        Box::pin(async move {
            self.seen.fetch_add(1, Ordering::SeqCst);
            *self.last.lock().unwrap() = Some(req.clone());
            let id = if req.text.contains("approve-me") {
                "apv-1"
            } else {
                "apv-2"
            };
            HoldStart::Held(Held {
                approval_id: id.into(),
                approver_group: req.requirement.group.clone(),
                quorum: req.requirement.quorum,
                expires_unix_nano: custos_core::events::now_unix_nano() + 60_000_000_000,
            })
        })
    }

    fn wait<'a>(&'a self, held: &'a Held) -> BoxFuture<'a, ApprovalOutcome> {
        Box::pin(async move {
            // Held: nothing reaches the server while the hook deliberates.
            tokio::time::sleep(Duration::from_millis(300)).await;
            if held.approval_id == "apv-1" {
                ApprovalOutcome::Approved {
                    approval_id: "apv-1".into(),
                    approver: "lead@example.com".into(),
                }
            } else {
                ApprovalOutcome::Refused {
                    approval_id: "apv-2".into(),
                    reason: "refused by lead@example.com: not during the freeze".into(),
                }
            }
        })
    }

    fn cancel<'a>(&'a self, _: &'a Held, _: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_approval_hook_holds_then_forwards_or_refuses() -> Result<()> {
    let pg = common::pg::PgServer::start(&[])?;
    let app_pw = common::edge::app_database(&pg)?;
    let dir = tempfile::tempdir()?;
    let port = common::free_port();
    let mut cfg = ControlPlaneConfig::default();
    cfg.node.id = 1;
    cfg.node.listen = format!("127.0.0.1:{port}");
    cfg.node.data_dir = dir.path().join("cp");
    cfg.bus.kind = custos_controlplane::config::BusKind::Inproc;
    cfg.siem.enabled = false;
    cfg.cluster
        .initial_members
        .insert("1".into(), cfg.node.listen.clone());
    let (bus, source) = InProcBus::new(1024);
    let node = ControlPlane::start(cfg.clone(), EventInput::InProc(source)).await?;
    let server = format!("http://127.0.0.1:{port}");
    let admin = std::fs::read_to_string(dir.path().join("cp/admin.token"))?
        .trim()
        .to_string();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::custos_bin())
            .args(args)
            .env("CUSTOS_SERVER", &server)
            .env("CUSTOS_TOKEN", &admin)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for _ in 0..100 {
        let out = std::process::Command::new(common::custos_bin())
            .args(["cluster", "status"])
            .env("CUSTOS_SERVER", &server)
            .env("CUSTOS_TOKEN", &admin)
            .output()?;
        if String::from_utf8_lossy(&out.stdout).contains("leader 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let policy = dir.path().join("p.cedar");
    std::fs::write(&policy, common::edge::POLICY)?;
    run(&["policy", "apply", policy.to_str().unwrap()]);
    let secret = format!("password={app_pw}");
    run(&[
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
    ]);
    let token = run(&["token", "issue", "agent:reporter", "--group", "agents"])
        .trim()
        .to_string();
    let hook = Arc::new(Approver {
        seen: AtomicUsize::new(0),
        last: Default::default(),
    });
    let edge = Edge::start(EdgeSetup {
        id: "hook-test".into(),
        watch: WatchOptions {
            edge_id: "hook-test".into(),
            servers: vec![server.clone()],
            token: admin.clone(),
            max_backoff: Duration::from_millis(500),
            tls: None,
        },
        bus: Arc::new(bus),
        postgres: Some((
            "127.0.0.1:0".into(),
            PgOptions {
                tls: None,
                allow_insecure_password: true,
            },
        )),
        http: None,
        metrics: None,
        masking: Default::default(),
        oidc: None,
        approvals: Some(hook.clone()),
    })
    .await?;
    assert!(edge.wait_synced(Duration::from_secs(10)).await);
    let addr = edge.postgres_addr.unwrap();
    // The token reaches the edge through the watch stream.
    let mut client = None;
    for _ in 0..50 {
        if let Ok((c, conn)) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} dbname=app user=agent:reporter password={token}",
                addr.port()
            ),
            tokio_postgres::NoTls,
        )
        .await
        {
            tokio::spawn(conn);
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = client.expect("edge never let the agent in");
    // Approved: held, then run.
    c.batch_execute("GRANT SELECT ON canary TO PUBLIC /* approve-me */")
        .await?;
    let granted = pg.psql_super("app", "SELECT count(*) FROM information_schema.role_table_grants WHERE table_name = 'canary' AND grantee = 'PUBLIC'")?;
    assert_eq!(granted.trim(), "1");
    // Refused: the client sees the approver's reason, and nothing ran.
    let e = c
        .batch_execute("GRANT INSERT ON canary TO PUBLIC")
        .await
        .unwrap_err();
    let msg = format!("{e:?}");
    assert!(
        msg.contains("not during the freeze") && msg.contains("apv-2"),
        "{msg}"
    );
    let granted = pg.psql_super("app", "SELECT count(*) FROM information_schema.role_table_grants WHERE table_name = 'canary' AND grantee = 'PUBLIC' AND privilege_type = 'INSERT'")?;
    assert_eq!(granted.trim(), "0");
    assert_eq!(hook.seen.load(Ordering::SeqCst), 2);
    let last = hook.last.lock().unwrap().clone().unwrap();
    assert_eq!(last.action, "sql:grant");
    assert_eq!(last.requirement.group, "dba-leads");
    assert_eq!(last.policies, vec!["approval-for-grants".to_string()]);
    // Allowed statements never reach the hook.
    c.batch_execute("SELECT 1").await?;
    assert_eq!(hook.seen.load(Ordering::SeqCst), 2);
    // The audit log marks the approved command with its approval id.
    let out = run(&["audit", "search", "--verdict", "approved", "--json"]);
    assert!(out.contains("apv-1"), "{out}");
    // A graceful stop publishes what is still queued.
    assert_eq!(edge.stop(Duration::from_secs(10)).await, 0);
    node.shutdown().await;
    Ok(())
}
