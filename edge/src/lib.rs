//! custos-edge: the stateless data-path process.
//!
//! ```text
//!  control plane ──EdgeSync──▶ watch (EdgeConfig in memory, swapped atomically)
//!                                   │
//!  client ──▶ pg listener ──▶ pipeline: authenticate → classify → authorize → hold → forward → mask → record
//!                                                                                               │
//!                                                                    bus (NATS / in-process) ◀──┘
//! ```
//!
//! - [`watch`]: follows the control plane; keeps the last good configuration when it is away.
//! - [`pipeline`]: the protocol-independent steps every listener shares.
//! - [`approvals`]: the hold-for-approval step, through the control plane.
//! - [`pg`]: the PostgreSQL listener and relay.
//! - [`http`]: the HTTP, LLM and MCP listener.
//! - [`config`]: `custos edge --config FILE`.

pub mod approvals;
pub mod config;
pub mod http;
pub mod pg;
pub mod pipeline;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use custos_core::bus::EventBus;
use custos_core::mask::{MaskConfig, Masker};
use custos_core::oidc::{OidcConfig, OidcVerifier};
use tokio::sync::watch as tokio_watch;

use pipeline::{ApprovalHook, Authenticator, Policies, Recorder, Services};

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("{0}")]
    Config(String),
}

/// Everything an edge needs to start.
pub struct EdgeSetup {
    pub id: String,
    pub watch: watch::WatchOptions,
    pub bus: Arc<dyn EventBus>,
    /// Postgres listen address and options; `None` disables the listener.
    pub postgres: Option<(String, pg::PgOptions)>,
    /// HTTP/LLM/MCP listen address and options; `None` disables the listener.
    pub http: Option<(String, http::HttpOptions)>,
    /// Serve Prometheus metrics (`GET /metrics`) here; `None` serves none.
    pub metrics: Option<String>,
    pub masking: MaskConfig,
    pub oidc: Option<OidcConfig>,
    /// The hold-for-approval step; `None` uses the control plane's Approvals service.
    pub approvals: Option<Arc<dyn ApprovalHook>>,
}

/// A running edge.
pub struct Edge {
    pub postgres_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub config: tokio_watch::Receiver<Arc<watch::EdgeConfig>>,
    recorder: Recorder,
    shutdown: tokio_watch::Sender<bool>,
}

impl Edge {
    pub async fn start(setup: EdgeSetup) -> Result<Edge, EdgeError> {
        let masker = Arc::new(
            Masker::new(&setup.masking).map_err(|e| EdgeError::Config(format!("[masking] {e}")))?,
        );
        if masker.demo_key_in_use() {
            tracing::warn!("[masking] hash_key is not set: hashed values can be recomputed by anyone; set it in production");
        }
        let oidc = match setup.oidc {
            Some(c) => Some(Arc::new(
                OidcVerifier::new(c)
                    .await
                    .map_err(|e| EdgeError::Config(format!("[oidc] {e}")))?,
            )),
            None => None,
        };
        let (shutdown, shutdown_rx) = tokio_watch::channel(false);
        let (cfg_tx, cfg_rx) = tokio_watch::channel(Arc::new(watch::EdgeConfig::default()));
        let approvals = setup.approvals.unwrap_or_else(|| {
            Arc::new(approvals::ControlPlaneApprovals::new(
                setup.watch.clone(),
                cfg_rx.clone(),
            ))
        });
        tokio::spawn(watch::run(setup.watch, cfg_tx, shutdown_rx.clone()));
        tokio::spawn(cancel_orphans(
            setup.id.clone(),
            custos_core::events::now_unix_nano(),
            cfg_rx.clone(),
            approvals.clone(),
        ));
        let services = Services {
            edge_id: setup.id.clone(),
            config: cfg_rx.clone(),
            policies: Arc::new(Policies::default()),
            auth: Authenticator { oidc },
            approvals,
            recorder: Recorder::new(setup.bus, shutdown_rx.clone()),
            masker,
        };
        let recorder = services.recorder.clone();
        let mut postgres_addr = None;
        if let Some((addr, opts)) = setup.postgres {
            let listener =
                tokio::net::TcpListener::bind(&addr)
                    .await
                    .map_err(|e| EdgeError::Listen {
                        addr: addr.clone(),
                        reason: e.to_string(),
                    })?;
            postgres_addr = listener.local_addr().ok();
            let edge = pg::PgEdge::new(services.clone(), opts);
            tokio::spawn(edge.serve(listener, shutdown_rx.clone()));
        }
        let mut http_addr = None;
        if let Some((addr, opts)) = setup.http {
            let listener =
                tokio::net::TcpListener::bind(&addr)
                    .await
                    .map_err(|e| EdgeError::Listen {
                        addr: addr.clone(),
                        reason: e.to_string(),
                    })?;
            http_addr = listener.local_addr().ok();
            let edge = http::HttpEdge::new(services.clone(), opts).map_err(EdgeError::Config)?;
            tokio::spawn(edge.serve(listener, shutdown_rx.clone()));
        }
        let mut metrics_addr = None;
        if let Some(addr) = setup.metrics {
            let listener =
                tokio::net::TcpListener::bind(&addr)
                    .await
                    .map_err(|e| EdgeError::Listen {
                        addr: addr.clone(),
                        reason: e.to_string(),
                    })?;
            metrics_addr = listener.local_addr().ok();
            let (rec, cfg, id) = (recorder.clone(), cfg_rx.clone(), setup.id.clone());
            let render: Arc<dyn Fn() -> String + Send + Sync> =
                Arc::new(move || render_metrics(&id, &rec, &cfg));
            tokio::spawn(custos_core::metrics::serve(
                listener,
                render,
                shutdown_rx.clone(),
            ));
        }
        Ok(Edge {
            postgres_addr,
            http_addr,
            metrics_addr,
            config: cfg_rx,
            recorder,
            shutdown,
        })
    }

    /// A renderer of this edge's metrics page (for a process that serves several).
    pub fn metrics_renderer(&self, edge_id: &str) -> Arc<dyn Fn() -> String + Send + Sync> {
        let (rec, cfg, id) = (
            self.recorder.clone(),
            self.config.clone(),
            edge_id.to_string(),
        );
        Arc::new(move || render_metrics(&id, &rec, &cfg))
    }

    /// Wait until the first configuration arrived (or `within` passed); true when synced.
    pub async fn wait_synced(&self, within: Duration) -> bool {
        let mut rx = self.config.clone();
        tokio::time::timeout(within, rx.wait_for(|c| c.synced))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stop accepting clients.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Stop accepting clients, then wait up to `within` for queued audit events to reach the bus.
    /// Returns how many did not (they are lost; the log says so).
    pub async fn stop(&self, within: Duration) -> usize {
        let _ = self.shutdown.send(true);
        let left = self.recorder.drain(within).await;
        if left > 0 {
            tracing::error!(
                unpublished = left,
                "edge stopped with audit events the bus never took"
            );
        }
        left
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Requests this edge opened before it (re)started wait for commands that no longer exist:
/// cancel them once the first configuration arrives, instead of letting them run to expiry.
/// (Edge ids must be unique among running edges.)
async fn cancel_orphans(
    edge_id: String,
    started: i64,
    mut cfg: tokio_watch::Receiver<Arc<watch::EdgeConfig>>,
    approvals: Arc<dyn ApprovalHook>,
) {
    let Ok(c) = cfg.wait_for(|c| c.synced).await.map(|c| c.clone()) else {
        return;
    };
    for a in c.approvals.values() {
        if a.state == "pending" && a.edge_id == edge_id && a.created_unix_nano < started {
            let held = pipeline::Held {
                approval_id: a.id.clone(),
                approver_group: a.approver_group.clone(),
                quorum: a.quorum,
                expires_unix_nano: a.expires_unix_nano,
            };
            tracing::info!(approval = %a.id, "cancelling a request left by this edge's previous run");
            approvals
                .cancel(&held, "the edge restarted; the command was not run")
                .await;
        }
    }
}

/// The edge's metrics page: counters plus gauges read at scrape time.
pub fn render_metrics(
    edge_id: &str,
    recorder: &Recorder,
    cfg: &tokio_watch::Receiver<Arc<watch::EdgeConfig>>,
) -> String {
    let c = cfg.borrow().clone();
    let pending = c
        .approvals
        .values()
        .filter(|a| a.state == "pending" && a.edge_id == edge_id)
        .count();
    recorder.metrics.render(&[
        (
            "custos_edge_config_synced",
            vec![],
            if c.synced { 1.0 } else { 0.0 },
        ),
        ("custos_edge_config_revision", vec![], c.revision as f64),
        (
            "custos_edge_config_stream_up",
            vec![],
            if c.stream_up { 1.0 } else { 0.0 },
        ),
        (
            "custos_edge_audit_queue",
            vec![],
            recorder.outstanding() as f64,
        ),
        ("custos_edge_approvals_pending", vec![], pending as f64),
    ])
}
