//! Prometheus metrics: counters and histograms kept in memory, rendered in the text exposition
//! format (version 0.0.4), and a small HTTP server for `GET /metrics`.
//!
//! Metrics are diagnostics, like `tracing`; the audit log is the product and never depends on them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use parking_lot::Mutex;

/// Upper bounds (seconds) of the latency histograms.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// A gauge computed at scrape time: name, labels, value.
pub type Gauge<'a> = (&'static str, Vec<(&'a str, String)>, f64);

/// One process's metrics.
#[derive(Default)]
pub struct Metrics {
    help: Mutex<BTreeMap<&'static str, (&'static str, &'static str)>>,
    counters: Mutex<BTreeMap<(&'static str, String), u64>>,
    histograms: Mutex<BTreeMap<(&'static str, String), Histogram>>,
}

fn labels(l: &[(&str, &str)]) -> String {
    if l.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = l
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// Describe a metric (shown as `# HELP` and `# TYPE`).
    pub fn describe(&self, name: &'static str, kind: &'static str, help: &'static str) {
        self.help.lock().insert(name, (kind, help));
    }

    pub fn inc(&self, name: &'static str, l: &[(&str, &str)]) {
        self.add(name, l, 1)
    }

    pub fn add(&self, name: &'static str, l: &[(&str, &str)], by: u64) {
        *self.counters.lock().entry((name, labels(l))).or_default() += by;
    }

    /// Record one observation (seconds) in a histogram.
    pub fn observe(&self, name: &'static str, l: &[(&str, &str)], seconds: f64) {
        let mut h = self.histograms.lock();
        let e = h.entry((name, labels(l))).or_insert_with(|| Histogram {
            counts: vec![0; BUCKETS.len()],
            ..Default::default()
        });
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                e.counts[i] += 1;
            }
        }
        e.sum += seconds;
        e.count += 1;
    }

    /// The current value of a counter (tests and gauges derived from counters).
    pub fn counter(&self, name: &'static str, l: &[(&str, &str)]) -> u64 {
        self.counters
            .lock()
            .get(&(name, labels(l)))
            .copied()
            .unwrap_or(0)
    }

    /// Render everything, plus `gauges` computed by the caller at scrape time
    /// (`(name, labels, value)`).
    pub fn render(&self, gauges: &[Gauge<'_>]) -> String {
        let help = self.help.lock().clone();
        let mut out = String::new();
        let mut described = std::collections::BTreeSet::new();
        let mut head = |out: &mut String, name: &'static str, default_kind: &str| {
            if described.insert(name) {
                let (kind, text) = help.get(name).copied().unwrap_or((default_kind, ""));
                if !text.is_empty() {
                    let _ = writeln!(out, "# HELP {name} {text}");
                }
                let _ = writeln!(out, "# TYPE {name} {kind}");
            }
        };
        for ((name, l), v) in self.counters.lock().iter() {
            head(&mut out, name, "counter");
            let _ = writeln!(out, "{name}{l} {v}");
        }
        for ((name, l), h) in self.histograms.lock().iter() {
            head(&mut out, name, "histogram");
            let base = l.trim_start_matches('{').trim_end_matches('}');
            let sep = if base.is_empty() { "" } else { "," };
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{name}_bucket{{{base}{sep}le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(out, "{name}_bucket{{{base}{sep}le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum{l} {}", h.sum);
            let _ = writeln!(out, "{name}_count{l} {}", h.count);
        }
        for (name, l, v) in gauges {
            head(&mut out, name, "gauge");
            let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let _ = writeln!(out, "{name}{} {v}", labels(&l));
        }
        out
    }
}

/// Serve `GET /metrics` on `listener` until `shutdown` turns true. `render` builds the page.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let (mut s, _) = tokio::select! {
            _ = shutdown.changed() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (bounded: 4 KiB, 5 s).
            let read = async {
                while n < buf.len() {
                    let m = s.read(&mut buf[n..]).await.ok()?;
                    if m == 0 {
                        return None;
                    }
                    n += m;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        return Some(());
                    }
                }
                None
            };
            if tokio::time::timeout(std::time::Duration::from_secs(5), read)
                .await
                .ok()
                .flatten()
                .is_none()
            {
                return;
            }
            let line = String::from_utf8_lossy(&buf[..n]);
            let ok = line.starts_with("GET /metrics ") || line.starts_with("GET /metrics?");
            let (status, ctype, body) = if ok {
                let mut page = render();
                crate::telemetry::append_metrics(&mut page);
                ("200 OK", "text/plain; version=0.0.4", page)
            } else {
                (
                    "404 Not Found",
                    "text/plain",
                    "metrics are served at GET /metrics\n".to_string(),
                )
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::new();
        m.describe("custos_x_total", "counter", "things");
        m.inc("custos_x_total", &[("verdict", "allow")]);
        m.add("custos_x_total", &[("verdict", "allow")], 2);
        m.observe("custos_lat_seconds", &[], 0.003);
        let text = m.render(&[("custos_g", vec![("role", "leader".to_string())], 1.0)]);
        assert!(text.contains("# HELP custos_x_total things"));
        assert!(
            text.contains("custos_x_total{verdict=\"allow\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("custos_lat_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("custos_lat_seconds_bucket{le=\"0.001\"} 0"),
            "{text}"
        );
        assert!(text.contains("custos_lat_seconds_count 1"), "{text}");
        assert!(text.contains("custos_g{role=\"leader\"} 1"), "{text}");
        assert_eq!(m.counter("custos_x_total", &[("verdict", "allow")]), 3);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(labels(&[("a", "x\"y\\z\n")]), "{a=\"x\\\"y\\\\z\\n\"}");
    }
}
