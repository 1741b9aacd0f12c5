//! `custos dev` (one process, embedded bus) and `custos controlplane` (one cluster node).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use custos_controlplane::config::BusKind;
use custos_controlplane::{ControlPlane, ControlPlaneConfig, EventInput};
use custos_core::bus::{InProcBus, NatsBus};

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where the node keeps its RocksDB, keys and admin token.
    #[arg(long, default_value = ".custos-dev")]
    pub data_dir: PathBuf,
    /// Control-plane gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub listen: String,
}

/// The configuration `custos dev` runs with.
pub fn dev_config(args: &DevArgs) -> ControlPlaneConfig {
    let mut cfg = ControlPlaneConfig::default();
    cfg.node.id = 1;
    cfg.node.listen = args.listen.clone();
    cfg.node.data_dir = args.data_dir.clone();
    cfg.bus.kind = BusKind::Inproc;
    cfg.siem.enabled = false;
    cfg.cluster
        .initial_members
        .insert("1".into(), args.listen.clone());
    cfg
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

pub async fn run(args: DevArgs) -> Result<()> {
    let cfg = dev_config(&args);
    cfg.validate()?;
    let (bus, source) = InProcBus::new(4096);
    let node = ControlPlane::start(cfg.clone(), EventInput::InProc(source)).await?;
    let token_file = cfg.node.data_dir.join("admin.token");
    println!("custos dev is running (one node, in-process event bus)");
    println!("  control plane  http://{}", node.addr());
    println!("  data           {}", cfg.node.data_dir.display());
    println!("  admin token    {}", token_file.display());
    println!();
    println!("try:");
    println!(
        "  export CUSTOS_SERVER=http://{} CUSTOS_TOKEN=$(cat {})",
        node.addr(),
        token_file.display()
    );
    println!("  custos policy apply deploy/examples/policies/agents.cedar");
    println!("  custos token issue agent:reporter --group agents --ttl 8h");
    println!("  custos audit tail --follow");
    // The edge (next release) publishes through this bus; keep it alive for the process lifetime.
    let _bus = bus;
    wait_for_signal().await;
    eprintln!("shutting down");
    node.shutdown().await;
    Ok(())
}

pub async fn run_node(cfg: ControlPlaneConfig) -> Result<()> {
    let input = match cfg.bus.kind {
        BusKind::Nats => EventInput::Nats(Box::new(
            NatsBus::connect(cfg.bus.nats.clone())
                .await
                .context("the control plane ingests events from NATS ([bus] kind = \"nats\")")?,
        )),
        BusKind::None => EventInput::None,
        BusKind::Inproc => bail!(
            "[bus] kind = \"inproc\" works only inside `custos dev`; use \"nats\" or \"none\""
        ),
    };
    let node = ControlPlane::start(cfg, input).await?;
    eprintln!(
        "custos control-plane node {} listening on {}",
        node.id(),
        node.addr()
    );
    wait_for_signal().await;
    node.shutdown().await;
    Ok(())
}
