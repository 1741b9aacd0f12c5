//! `custos edge --config FILE`, and the edge `custos dev` embeds.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use custos_core::bus::{EventBus, NatsBus};
use custos_edge::config::EdgeFileConfig;
use custos_edge::pg::{server_tls, PgOptions};
use custos_edge::watch::WatchOptions;
use custos_edge::{Edge, EdgeSetup};

/// Build the edge's setup from its configuration file and a bus.
pub fn setup(cfg: &EdgeFileConfig, bus: Arc<dyn EventBus>) -> Result<EdgeSetup> {
    let postgres = if cfg.postgres.enabled {
        let tls = match (&cfg.postgres.tls_cert, &cfg.postgres.tls_key) {
            (Some(c), Some(k)) => Some(server_tls(c, k).map_err(anyhow::Error::msg)?),
            _ => None,
        };
        Some((
            cfg.postgres.listen.clone(),
            PgOptions {
                tls,
                allow_insecure_password: cfg.postgres.allow_insecure_password,
            },
        ))
    } else {
        None
    };
    let http = if cfg.http.enabled {
        Some((cfg.http.listen.clone(), cfg.http.options()?))
    } else {
        None
    };
    Ok(EdgeSetup {
        id: cfg.edge.id.clone(),
        watch: WatchOptions {
            edge_id: cfg.edge.id.clone(),
            servers: cfg.controlplane.servers.clone(),
            token: cfg.token()?,
            max_backoff: Duration::from_millis(cfg.controlplane.max_backoff_ms.max(100)),
            tls: cfg.controlplane_tls()?,
        },
        bus,
        postgres,
        http,
        metrics: cfg.metrics.listen.clone().filter(|l| !l.is_empty()),
        masking: cfg.masking.clone(),
        oidc: cfg.oidc.clone(),
        approvals: None,
    })
}

pub async fn run(path: &Path) -> Result<()> {
    let cfg = EdgeFileConfig::load(path)?;
    let bus = NatsBus::connect(cfg.bus.nats.clone())
        .await
        .context("the edge publishes audit events to NATS ([bus.nats] url)")?;
    let edge = Edge::start(setup(&cfg, Arc::new(bus))?).await?;
    if let Some(a) = edge.postgres_addr {
        eprintln!("custos edge {} listening for postgres on {a}", cfg.edge.id);
    }
    if !edge.wait_synced(Duration::from_secs(10)).await {
        eprintln!(
            "custos edge {}: no configuration from the control plane yet ({}); clients are refused until it arrives",
            cfg.edge.id,
            cfg.controlplane.servers.join(", ")
        );
    }
    crate::dev::wait_for_signal().await;
    let left = edge.stop(Duration::from_secs(10)).await;
    if left > 0 {
        eprintln!("custos edge stopped with {left} audit events not published (the bus did not take them)");
    }
    Ok(())
}

/// A self-signed certificate for `custos dev` (localhost and 127.0.0.1), created once.
pub fn dev_certificate(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let cert = dir.join("edge.crt");
    let key = dir.join("edge.key");
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .context("cannot generate the dev TLS certificate")?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(&cert, ck.cert.pem())?;
    custos_core::secrets::write_private(&key, ck.key_pair.serialize_pem().as_bytes())
        .with_context(|| format!("cannot write {}", key.display()))?;
    Ok((cert, key))
}
