//! Prometheus metrics of `custos dev` (control plane and edge on one page) move with real work.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::edge::{EdgeEnv, EnvOpts};

fn scrape(port: u16) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_count_sessions_commands_and_show_raft_and_the_audit_head() -> Result<()> {
    let port = common::free_port();
    let env = EdgeEnv::start(EnvOpts {
        extra_dev_args: vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")],
        ..Default::default()
    })?;
    let (code, _, err) = env.psql(
        &env.agent_token,
        "agent:reporter",
        "SELECT count(*) FROM canary",
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = env.psql(&env.agent_token, "agent:reporter", "DROP TABLE canary");
    assert_ne!(code, 0);
    let t0 = Instant::now();
    loop {
        let page = scrape(port);
        let allowed = value(
            &page,
            "custos_edge_commands_total{protocol=\"postgres\",verdict=\"allow\"}",
        );
        let denied = value(
            &page,
            "custos_edge_commands_total{protocol=\"postgres\",verdict=\"deny\"}",
        );
        let sessions = value(&page, "custos_edge_sessions_total{protocol=\"postgres\"}");
        let head = value(&page, "custos_audit_head_seq{node=\"1\"}");
        let leader = value(&page, "custos_raft_is_leader{node=\"1\"}");
        let appended = value(&page, "custos_ingest_events_total{result=\"appended\"}");
        if allowed >= Some(1.0)
            && denied >= Some(1.0)
            && sessions >= Some(2.0)
            && head > Some(5.0)
            && leader == Some(1.0)
            && appended >= Some(4.0)
        {
            assert!(
                page.contains("# TYPE custos_edge_bus_publish_seconds histogram"),
                "{page}"
            );
            assert!(
                page.contains("custos_raft_role{node=\"1\",role=\"leader\"} 1"),
                "{page}"
            );
            assert!(page.contains("custos_edge_config_synced 1"), "{page}");
            assert!(
                value(&page, "custos_ingest_bus_messages_total") >= Some(1.0),
                "{page}"
            );
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("metrics did not move:\n{page}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Anything but GET /metrics is a 404.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}/other"))
        .output()?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    Ok(())
}
