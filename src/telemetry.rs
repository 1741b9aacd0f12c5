//! Installs tracing for the process: the stderr log always, and span export over OTLP/gRPC when
//! an endpoint is configured (`[telemetry]` in the role's TOML, `custos dev --otlp-endpoint`, or
//! the standard `OTEL_EXPORTER_OTLP_ENDPOINT`). Unconfigured, no exporter exists and the spans
//! of the data path are disabled at their call sites.
//!
//! ```text
//!  span ends ─▶ QueueProcessor::on_end ─try_send─▶ bounded queue ─▶ export task (tokio) ─gRPC─▶ collector
//!                 (full: dropped, counted)                          batches, one warning per outage
//! ```
//!
//! The data path never waits for the collector: a finished span is handed to a bounded queue
//! without blocking, and only the export task talks to the network. Spans are diagnostics for
//! operators; audit events never pass through here.

use std::sync::atomic::Ordering;
use std::time::Duration;

use custos_core::telemetry::{ExportCounters, Resolved, TelemetryConfig, EXPORT};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tokio::sync::{mpsc, oneshot};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

use crate::{Cli, Command};

/// The running exporter; [`Telemetry::shutdown`] sends what is queued.
#[derive(Default)]
pub struct Telemetry {
    inner: Option<Inner>,
}

struct Inner {
    provider: SdkTracerProvider,
    flush: mpsc::Sender<oneshot::Sender<()>>,
    stats: &'static ExportCounters,
    endpoint: String,
    timeout: Duration,
}

/// Which telemetry settings a command runs with: the daemons have them, CLI commands do not.
/// A configuration file that does not load is left for the command itself to report.
pub fn config_for(cli: &Cli) -> Option<(TelemetryConfig, &'static str)> {
    match &cli.command {
        Command::Dev(a) => Some((
            TelemetryConfig {
                otlp_endpoint: a.otlp_endpoint.clone(),
                sample_ratio: a.otlp_sample_ratio,
                ..Default::default()
            },
            "custos-dev",
        )),
        Command::Controlplane { config } => custos_controlplane::ControlPlaneConfig::load(config)
            .ok()
            .map(|c| (c.telemetry, "custos-controlplane")),
        Command::Edge { config } => custos_edge::config::EdgeFileConfig::load(config)
            .ok()
            .map(|c| (c.telemetry, "custos-edge")),
        _ => None,
    }
}

/// Install the global subscriber: the stderr log filtered by `CUSTOS_LOG`, and the OTLP layer
/// when `cfg` resolves to an endpoint. Must run inside the tokio runtime (the export task and
/// the gRPC channel live there).
pub fn install(cfg: Option<(TelemetryConfig, &'static str)>) -> Telemetry {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_env("CUSTOS_LOG")
                .unwrap_or_else(|_| "warn,custos=info".into()),
        );
    let env = |k: &str| std::env::var(k).ok();
    let (resolved, problem) =
        match cfg.map(|(c, role)| c.validate().and_then(|()| c.resolve(role, env))) {
            Some(Ok(r)) => (r, None),
            Some(Err(e)) => (None, Some(e)),
            None => (None, None),
        };
    let mut telemetry = Telemetry::default();
    let otel = match resolved {
        Some(r) => match start(&r) {
            Ok((inner, tracer)) => {
                telemetry.inner = Some(inner);
                Some(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_threads(false)
                        .with_filter(tracing_subscriber::filter::filter_fn(exported)),
                )
            }
            Err(e) => {
                tracing_subscriber::registry().with(fmt).init();
                tracing::warn!(endpoint = %r.endpoint, error = %e, "OTLP trace export is off: the exporter cannot be built");
                return telemetry;
            }
        },
        None => None,
    };
    tracing_subscriber::registry().with(fmt).with(otel).init();
    if let Some(p) = problem {
        tracing::warn!("OTLP trace export is off: {p}");
    }
    if let Some(i) = &telemetry.inner {
        tracing::info!(endpoint = %i.endpoint, "exporting trace spans over OTLP/gRPC");
    }
    telemetry
}

/// What the OTLP layer takes: custos's own spans (they are DEBUG, so the default log filter
/// leaves them off and an unconfigured process pays nothing for them) and its INFO-or-worse
/// events inside them. Nothing from the libraries below (tonic, h2, the exporter itself), so an
/// export can never feed on its own traffic.
fn exported(meta: &tracing::Metadata<'_>) -> bool {
    if !meta.target().starts_with("custos") {
        return false;
    }
    if meta.is_span() {
        *meta.level() <= tracing::Level::DEBUG
    } else {
        *meta.level() <= tracing::Level::INFO
    }
}

fn start(r: &Resolved) -> Result<(Inner, opentelemetry_sdk::trace::Tracer), String> {
    let c = &r.config;
    let timeout = Duration::from_millis(c.export_timeout_ms);
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(r.endpoint.clone())
        .with_timeout(timeout)
        .build()
        .map_err(|e| e.to_string())?;
    let resource = Resource::builder()
        .with_service_name(r.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    exporter.set_resource(&resource);
    let stats = &EXPORT;
    stats.enabled.store(true, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(c.queue_size);
    let (flush, flush_rx) = mpsc::channel(1);
    tokio::spawn(
        Exporter {
            exporter,
            spans: rx,
            flush: flush_rx,
            stats,
            endpoint: r.endpoint.clone(),
            batch: c.batch_size,
            interval: Duration::from_millis(c.flush_interval_ms),
            // The exporter retries within its own timeout; this bounds the whole attempt.
            deadline: timeout * 4,
            failing: false,
            reported_drops: 0,
        }
        .run(),
    );
    let provider = SdkTracerProvider::builder()
        .with_span_processor(QueueProcessor { tx, stats })
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            c.sample_ratio,
        ))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("custos");
    Ok((
        Inner {
            provider,
            flush,
            stats,
            endpoint: r.endpoint.clone(),
            timeout,
        },
        tracer,
    ))
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Send what is queued, then stop the exporter. Waits at most one export timeout: a
    /// collector that does not answer must not eat the shutdown grace period (Kubernetes
    /// gives 30 s by default, and the edge's drain already takes up to 10).
    pub async fn shutdown(self) {
        let Some(i) = self.inner else { return };
        let (done, wait) = oneshot::channel();
        if i.flush.send(done).await.is_ok() {
            let _ = tokio::time::timeout(i.timeout, wait).await;
        }
        let _ = i.provider.shutdown();
        let s = &i.stats;
        let (exported, dropped, failed) = (
            s.exported.load(Ordering::Relaxed),
            s.dropped.load(Ordering::Relaxed),
            s.failed.load(Ordering::Relaxed),
        );
        if dropped + failed > 0 {
            tracing::warn!(
                endpoint = %i.endpoint, exported, dropped, failed,
                "OTLP trace export ended with spans lost"
            );
        } else {
            tracing::debug!(endpoint = %i.endpoint, exported, "OTLP trace export ended");
        }
    }
}

/// Hands each finished span to the export task without ever blocking the caller.
#[derive(Debug)]
struct QueueProcessor {
    tx: mpsc::Sender<SpanData>,
    stats: &'static ExportCounters,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    // Flushing is asynchronous, on the runtime: `Telemetry::shutdown`.
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The export task: batches by size or interval, one request at a time.
struct Exporter {
    exporter: opentelemetry_otlp::SpanExporter,
    spans: mpsc::Receiver<SpanData>,
    flush: mpsc::Receiver<oneshot::Sender<()>>,
    stats: &'static ExportCounters,
    endpoint: String,
    batch: usize,
    interval: Duration,
    deadline: Duration,
    /// In an outage: warned once, quiet until an export succeeds again.
    failing: bool,
    reported_drops: u64,
}

impl Exporter {
    async fn run(mut self) {
        let mut buf: Vec<SpanData> = Vec::with_capacity(self.batch);
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let room = self.batch - buf.len();
            tokio::select! {
                biased;
                done = self.flush.recv() => {
                    while let Ok(s) = self.spans.try_recv() {
                        buf.push(s);
                        if buf.len() >= self.batch {
                            self.send(std::mem::take(&mut buf)).await;
                        }
                    }
                    if !buf.is_empty() {
                        self.send(std::mem::take(&mut buf)).await;
                    }
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                n = self.spans.recv_many(&mut buf, room) => {
                    if n == 0 {
                        if !buf.is_empty() {
                            self.send(std::mem::take(&mut buf)).await;
                        }
                        return;
                    }
                    if buf.len() >= self.batch {
                        self.send(std::mem::take(&mut buf)).await;
                    }
                }
                _ = tick.tick() => {
                    if !buf.is_empty() {
                        self.send(std::mem::take(&mut buf)).await;
                    }
                }
            }
        }
    }

    async fn send(&mut self, batch: Vec<SpanData>) {
        let n = batch.len() as u64;
        let r = match tokio::time::timeout(self.deadline, self.exporter.export(batch)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.deadline)),
        };
        let dropped = self.stats.dropped.load(Ordering::Relaxed);
        match r {
            Ok(()) => {
                self.stats.exported.fetch_add(n, Ordering::Relaxed);
                if self.failing {
                    self.failing = false;
                    tracing::warn!(
                        endpoint = %self.endpoint,
                        lost = self.stats.failed.load(Ordering::Relaxed) + dropped,
                        "OTLP trace export works again"
                    );
                    self.reported_drops = dropped;
                }
            }
            Err(e) => {
                self.stats.failed.fetch_add(n, Ordering::Relaxed);
                if !self.failing {
                    self.failing = true;
                    self.reported_drops = dropped;
                    tracing::warn!(
                        endpoint = %self.endpoint,
                        error = %e,
                        "OTLP trace export failed: spans are dropped (requests are not affected) until the collector answers; \
                         check that an OpenTelemetry collector listens there for OTLP/gRPC, or unset the endpoint \
                         ([telemetry] otlp_endpoint, --otlp-endpoint, OTEL_EXPORTER_OTLP_ENDPOINT) to stop exporting. \
                         Logged once per outage"
                    );
                }
            }
        }
        // A full queue while the collector answers (spans faster than it takes them): once per
        // thousand dropped, not once per span.
        if !self.failing && dropped >= self.reported_drops + 1000 {
            self.reported_drops = dropped;
            tracing::warn!(
                endpoint = %self.endpoint,
                dropped,
                "OTLP span queue full: spans dropped; raise [telemetry] queue_size or lower sample_ratio"
            );
        }
    }
}
