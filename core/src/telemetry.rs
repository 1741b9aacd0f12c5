//! `[telemetry]`: where a process sends its tracing spans over OTLP/gRPC (docs/operations.md,
//! Traces). This is only the configuration, shared by the control plane and the edge; the
//! exporter lives in the binary, which installs the tracing subscriber.
//!
//! Tracing is diagnostics for operators. Audit events go to the event bus and never through
//! here; span attributes carry no tokens, secrets or statement text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// The standard variables, used when the file leaves a field unset.
pub const ENV_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const ENV_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
pub const ENV_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";

/// What the process's span export has done, for `/metrics` (one exporter per process).
#[derive(Debug, Default)]
pub struct ExportCounters {
    /// Set when an exporter runs; the metrics appear only then.
    pub enabled: AtomicBool,
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans dropped because the export queue was full.
    pub dropped: AtomicU64,
    /// Spans lost because their export failed.
    pub failed: AtomicU64,
}

pub static EXPORT: ExportCounters = ExportCounters {
    enabled: AtomicBool::new(false),
    exported: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
    failed: AtomicU64::new(0),
};

/// Append the export counters to a Prometheus page (nothing when no exporter runs).
pub fn append_metrics(out: &mut String) {
    if !EXPORT.enabled.load(Ordering::Relaxed) {
        return;
    }
    for (name, help, v) in [
        (
            "custos_otlp_spans_exported_total",
            "spans the OTLP collector accepted",
            &EXPORT.exported,
        ),
        (
            "custos_otlp_spans_dropped_total",
            "spans dropped because the export queue was full",
            &EXPORT.dropped,
        ),
        (
            "custos_otlp_spans_failed_total",
            "spans lost because their export failed",
            &EXPORT.failed,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317` (plaintext: a collector on the host or a
    /// sidecar). Unset: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// or `OTEL_EXPORTER_OTLP_ENDPOINT`; none of them: no exporter at all.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the spans. Unset: `OTEL_SERVICE_NAME`, else `custos-<role>`.
    pub service_name: Option<String>,
    /// Share of new traces kept, 0.0 to 1.0 (a trace started upstream keeps its parent's choice).
    pub sample_ratio: f64,
    /// Finished spans waiting for the exporter; beyond this they are dropped and counted, so a
    /// slow or absent collector never holds up a request.
    pub queue_size: usize,
    /// Most spans in one export request.
    pub batch_size: usize,
    /// Longest wait before a partly filled batch is sent.
    pub flush_interval_ms: u64,
    /// One export attempt gives up after this.
    pub export_timeout_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: None,
            sample_ratio: 1.0,
            queue_size: 4096,
            batch_size: 512,
            flush_interval_ms: 2000,
            export_timeout_ms: 5000,
        }
    }
}

/// The settings a process exports with, after the environment filled the gaps.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub endpoint: String,
    pub service_name: String,
    pub config: TelemetryConfig,
}

impl TelemetryConfig {
    /// Check the fields, naming the bad one (`[telemetry] <field>`).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(e) = &self.otlp_endpoint {
            check_endpoint(e).map_err(|m| format!("[telemetry] otlp_endpoint {m}"))?;
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(format!(
                "[telemetry] sample_ratio must be between 0.0 and 1.0, not {}",
                self.sample_ratio
            ));
        }
        if self.queue_size == 0 || self.batch_size == 0 {
            return Err("[telemetry] queue_size and batch_size must be 1 or more".into());
        }
        if self.flush_interval_ms == 0 || self.export_timeout_ms == 0 {
            return Err(
                "[telemetry] flush_interval_ms and export_timeout_ms must be 1 or more".into(),
            );
        }
        Ok(())
    }

    /// The endpoint and service name, from the file first and the standard variables second;
    /// `None` when no endpoint is configured anywhere (then nothing is exported).
    pub fn resolve(
        &self,
        default_service: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Resolved>, String> {
        let set = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        let endpoint = match set(self.otlp_endpoint.clone())
            .or_else(|| set(env(ENV_TRACES_ENDPOINT)))
            .or_else(|| set(env(ENV_ENDPOINT)))
        {
            Some(e) => e.trim().to_string(),
            None => return Ok(None),
        };
        check_endpoint(&endpoint).map_err(|m| format!("OTLP endpoint {m}"))?;
        let service_name = set(self.service_name.clone())
            .or_else(|| set(env(ENV_SERVICE_NAME)))
            .unwrap_or_else(|| default_service.to_string());
        Ok(Some(Resolved {
            endpoint,
            service_name,
            config: self.clone(),
        }))
    }
}

fn check_endpoint(e: &str) -> Result<(), String> {
    if e.starts_with("https://") {
        return Err(format!(
            "{e:?}: TLS to the collector is not supported yet; run the collector on the host or \
             as a sidecar and use http:// (e.g. http://127.0.0.1:4317)"
        ));
    }
    let rest = e
        .strip_prefix("http://")
        .ok_or_else(|| format!("{e:?} must start with http:// (e.g. http://127.0.0.1:4317)"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{e:?} names no host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn nothing_configured_exports_nothing() {
        let c = TelemetryConfig::default();
        assert_eq!(c.resolve("custos-edge", env(&[])).unwrap(), None);
        assert_eq!(
            c.resolve("custos-edge", env(&[(ENV_ENDPOINT, " ")]))
                .unwrap(),
            None
        );
    }

    #[test]
    fn the_file_wins_over_the_environment() {
        let c = TelemetryConfig {
            otlp_endpoint: Some("http://collector:4317".into()),
            ..Default::default()
        };
        let r = c
            .resolve(
                "custos-edge",
                env(&[
                    (ENV_ENDPOINT, "http://other:4317"),
                    (ENV_SERVICE_NAME, "edge-eu"),
                ]),
            )
            .unwrap()
            .unwrap();
        assert_eq!(r.endpoint, "http://collector:4317");
        assert_eq!(r.service_name, "edge-eu");
    }

    #[test]
    fn the_environment_fills_the_gaps() {
        let c = TelemetryConfig::default();
        let r = c
            .resolve(
                "custos-controlplane",
                env(&[
                    (ENV_ENDPOINT, "http://a:4317"),
                    (ENV_TRACES_ENDPOINT, "http://b:4317"),
                ]),
            )
            .unwrap()
            .unwrap();
        assert_eq!(r.endpoint, "http://b:4317");
        assert_eq!(r.service_name, "custos-controlplane");
        assert!(c
            .resolve("x", env(&[(ENV_ENDPOINT, "collector:4317")]))
            .unwrap_err()
            .contains("http://"));
    }

    #[test]
    fn export_counters_show_only_with_an_exporter() {
        let mut page = String::new();
        append_metrics(&mut page);
        assert!(page.is_empty());
        EXPORT.enabled.store(true, Ordering::Relaxed);
        append_metrics(&mut page);
        EXPORT.enabled.store(false, Ordering::Relaxed);
        assert!(page.contains(
            "# TYPE custos_otlp_spans_dropped_total counter\ncustos_otlp_spans_dropped_total 0\n"
        ));
    }

    #[test]
    fn bad_fields_are_named() {
        let bad = TelemetryConfig {
            sample_ratio: 1.5,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("sample_ratio"));
        let bad = TelemetryConfig {
            otlp_endpoint: Some("127.0.0.1:4317".into()),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("otlp_endpoint"));
        let bad = TelemetryConfig {
            otlp_endpoint: Some("https://collector:4317".into()),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("TLS"));
        assert!(TelemetryConfig::default().validate().is_ok());
    }
}
