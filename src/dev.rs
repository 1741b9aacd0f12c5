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
    /// The edge's Postgres listen address; "off" runs no edge.
    #[arg(long, default_value = "127.0.0.1:15432")]
    pub postgres_listen: String,
    /// The edge's HTTP/LLM/MCP listen address; "off" turns it off.
    #[arg(long, default_value = "127.0.0.1:18080")]
    pub http_listen: String,
    /// Serve Prometheus metrics of the control plane and the edge at GET http://ADDR/metrics;
    /// "off" serves none.
    #[arg(long, default_value = "off")]
    pub metrics_listen: String,
    /// Masking rules for the edge (a TOML file with a [masking] table; see docs/masking.md).
    #[arg(long)]
    pub masking: Option<PathBuf>,
    /// Accept OIDC JWTs as passwords: a TOML file with an [oidc] table (issuer, audience,
    /// jwks_file or jwks_url; see deploy/examples/edge/edge.toml).
    #[arg(long)]
    pub oidc: Option<PathBuf>,
    /// Accept tokens over Postgres connections without TLS (the dev edge has a certificate;
    /// this is for clients that cannot do TLS).
    #[arg(long)]
    pub allow_insecure_password: bool,
    /// Export tracing spans over OTLP/gRPC to this collector, e.g. http://127.0.0.1:4317
    /// (default: OTEL_EXPORTER_OTLP_ENDPOINT; unset, nothing is exported).
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces exported, 0.0 to 1.0.
    #[arg(long, default_value_t = 1.0)]
    pub otlp_sample_ratio: f64,
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

pub(crate) async fn wait_for_signal() {
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
    let edge = if args.postgres_listen != "off" || args.http_listen != "off" {
        Some(
            start_edge(
                &args,
                &cfg,
                node.addr().to_string(),
                &token_file,
                bus.clone(),
            )
            .await?,
        )
    } else {
        None
    };
    let (_metrics_stop, metrics_rx) = tokio::sync::watch::channel(false);
    if args.metrics_listen != "off" {
        let l = tokio::net::TcpListener::bind(&args.metrics_listen)
            .await
            .with_context(|| format!("--metrics-listen {}", args.metrics_listen))?;
        let cp = node.metrics_renderer();
        let ed = edge.as_ref().map(|e| e.metrics_renderer("dev"));
        let render: std::sync::Arc<dyn Fn() -> String + Send + Sync> =
            std::sync::Arc::new(move || {
                let mut s = cp();
                if let Some(e) = &ed {
                    s.push_str(&e());
                }
                s
            });
        tokio::spawn(custos_core::metrics::serve(l, render, metrics_rx));
        println!("  metrics        http://{}/metrics", args.metrics_listen);
    }
    println!("custos dev is running (one node, in-process event bus)");
    println!("  control plane  http://{}", node.addr());
    if let Some(a) = edge.as_ref().and_then(|e| e.postgres_addr) {
        println!(
            "  postgres edge  {a} (TLS with {}/edge.crt)",
            cfg.node.data_dir.display()
        );
    }
    if let Some(a) = edge.as_ref().and_then(|e| e.http_addr) {
        println!("  http edge      http://{a}/<connection>/… (HTTP APIs, LLMs, MCP)");
    }
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
    println!("  custos connection put app --kind postgres --address 127.0.0.1:5432 -o database=app -s username=app -s password=env:APP_PW");
    if let Some(a) = edge.as_ref().and_then(|e| e.postgres_addr) {
        println!(
            "  psql \"host={} port={} sslmode=require user=agent:reporter dbname=app password=<token>\"",
            a.ip(),
            a.port()
        );
    }
    println!("  custos audit tail --follow");
    wait_for_signal().await;
    eprintln!("shutting down");
    if let Some(e) = edge {
        e.stop(std::time::Duration::from_secs(10)).await;
    }
    node.shutdown().await;
    Ok(())
}

async fn start_edge(
    args: &DevArgs,
    cfg: &ControlPlaneConfig,
    server: String,
    token_file: &std::path::Path,
    bus: InProcBus,
) -> Result<custos_edge::Edge> {
    let (cert, key) = crate::edge_cmd::dev_certificate(&cfg.node.data_dir)?;
    let mut ecfg = custos_edge::config::EdgeFileConfig::default();
    ecfg.edge.id = "dev".into();
    ecfg.controlplane.servers = vec![server];
    ecfg.controlplane.token_file = Some(token_file.to_path_buf());
    ecfg.postgres.enabled = args.postgres_listen != "off";
    ecfg.postgres.listen = args.postgres_listen.clone();
    ecfg.http.enabled = args.http_listen != "off";
    ecfg.http.listen = args.http_listen.clone();
    ecfg.postgres.tls_cert = Some(cert);
    ecfg.postgres.tls_key = Some(key);
    ecfg.postgres.allow_insecure_password = args.allow_insecure_password;
    if let Some(path) = &args.masking {
        ecfg.masking = crate::mask_cmd::load_config(path)?;
    }
    if let Some(path) = &args.oidc {
        #[derive(serde::Deserialize)]
        struct File {
            oidc: custos_core::oidc::OidcConfig,
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let f: File = toml::from_str(&text)
            .with_context(|| format!("{} needs an [oidc] table", path.display()))?;
        ecfg.oidc = Some(f.oidc);
    }
    ecfg.validate()?;
    let setup = crate::edge_cmd::setup(&ecfg, std::sync::Arc::new(bus))?;
    let edge = custos_edge::Edge::start(setup).await.context(
        "the dev edge cannot start (choose other addresses with --postgres-listen ADDR and \
         --http-listen ADDR, or turn them off with \"off\")",
    )?;
    edge.wait_synced(std::time::Duration::from_secs(10)).await;
    Ok(edge)
}

/// Connect to NATS, retrying transient failures (a server still starting, a JetStream cluster
/// still electing its leaders) for up to a minute; a configuration error fails at once.
async fn connect_bus(cfg: &ControlPlaneConfig) -> Result<NatsBus, custos_core::bus::BusError> {
    let t0 = std::time::Instant::now();
    let mut wait = std::time::Duration::from_millis(250);
    loop {
        match NatsBus::connect(cfg.bus.nats.clone()).await {
            Ok(b) => return Ok(b),
            Err(e) if e.is_transient() && t0.elapsed() < std::time::Duration::from_secs(60) => {
                tracing::warn!(error = %e, "event bus not ready; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

pub async fn run_node(cfg: ControlPlaneConfig) -> Result<()> {
    let input = match cfg.bus.kind {
        BusKind::Nats => {
            EventInput::Nats(Box::new(connect_bus(&cfg).await.context(
                "the control plane ingests events from NATS ([bus] kind = \"nats\")",
            )?))
        }
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
