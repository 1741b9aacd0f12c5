//! `custos controlplane --config FILE`: typed configuration with defaults and validation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use custos_core::bus::NatsConfig;
use serde::{Deserialize, Serialize};

use crate::tls::TlsConfig;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ControlPlaneConfig {
    pub node: NodeConfig,
    pub cluster: ClusterConfig,
    pub bus: BusConfig,
    pub siem: SiemConfig,
    pub tls: TlsConfig,
    /// Post approval requests to Slack and take decisions from its buttons (docs/approvals.md).
    pub slack: Option<crate::slack::SlackConfig>,
    /// Generic signed outgoing webhooks for approval requests.
    pub webhooks: Vec<crate::notify_task::WebhookConfig>,
    /// Prometheus metrics at `GET http://<listen>/metrics` (docs/operations.md).
    pub metrics: MetricsConfig,
    /// Tracing spans over OTLP/gRPC (docs/operations.md, Traces); off unless an endpoint is set.
    pub telemetry: custos_core::telemetry::TelemetryConfig,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Raft node id; unique in the cluster, never reused.
    pub id: u64,
    /// gRPC listen address (port 0 picks a free port).
    pub listen: String,
    /// Address other nodes and clients use to reach this node (default: the bound listen address).
    pub advertise: Option<String>,
    /// RocksDB and key files live here.
    pub data_dir: PathBuf,
    /// 32-byte hex key sealing connection credentials (default `<data_dir>/secret.key`, created if
    /// missing). Every node of a cluster needs the same key.
    pub secret_key_file: Option<PathBuf>,
    /// Shared secret authenticating node-to-node Raft traffic (default `<data_dir>/cluster.secret`).
    pub cluster_secret_file: Option<PathBuf>,
    /// Bootstrap admin token (default `<data_dir>/admin.token`, created if missing).
    pub admin_token_file: Option<PathBuf>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: 1,
            listen: "127.0.0.1:7400".into(),
            advertise: None,
            data_dir: PathBuf::from("/var/lib/custos"),
            secret_key_file: None,
            cluster_secret_file: None,
            admin_token_file: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Initial voters, id → address. Every node of a new cluster lists the same set; a node
    /// joining an existing cluster lists none and is added with `custos cluster add`.
    pub initial_members: BTreeMap<String, String>,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many log entries.
    pub snapshot_every: u64,
    /// Log entries kept after a snapshot (so slow followers catch up from the log).
    pub keep_logs: u64,
    /// How long the leader waits for a follower to take one snapshot chunk; the last chunk's
    /// answer also waits for the follower to verify and install the whole snapshot. A chunk that
    /// times out restarts the transfer from the beginning, so this must cover the slowest
    /// install, not the typical chunk.
    pub snapshot_chunk_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            initial_members: BTreeMap::new(),
            heartbeat_ms: 250,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            snapshot_every: 5000,
            keep_logs: 1000,
            snapshot_chunk_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// Events come from NATS JetStream (production).
    #[default]
    Nats,
    /// Events come from an in-process queue (`custos dev`).
    Inproc,
    /// No event ingest (a node used only for administration, or tests).
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    pub kind: BusKind,
    pub nats: NatsConfig,
    /// Durable consumer name shared by all control-plane nodes (only the leader pulls).
    pub durable: String,
    /// Seconds before an unacknowledged event is redelivered (e.g. after a leader crash).
    pub ack_wait_secs: u64,
    /// Most events committed in one Raft entry.
    pub batch_max: usize,
    /// Milliseconds the ingest waits for more events after the first of a batch, so a busy bus
    /// is committed in fewer, larger Raft entries (each costs a log write and an fsync). 0 commits
    /// whatever has arrived at once.
    pub batch_linger_ms: u64,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            kind: BusKind::Nats,
            nats: NatsConfig::default(),
            durable: "custos-controlplane".into(),
            ack_wait_secs: 10,
            batch_max: 2000,
            batch_linger_ms: 2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SiemConfig {
    /// Republish committed records as OCSF JSON on `custos.audit.<kind>.<connection>`.
    pub enabled: bool,
    /// JetStream stream holding the republished records.
    pub stream: String,
}

impl Default for SiemConfig {
    fn default() -> Self {
        SiemConfig {
            enabled: true,
            stream: "CUSTOS_AUDIT".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config {path} is not valid TOML for a control plane: {message}")]
    Parse { path: String, message: String },
    #[error("config field {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl ControlPlaneConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut cfg = Self::parse(&text, &path.display().to_string())?;
        cfg.bus.nats.apply_env();
        Ok(cfg)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: ControlPlaneConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check every field a start would trip on, naming it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, message: &str| {
            Err(ConfigError::Invalid {
                field,
                message: message.to_string(),
            })
        };
        if self.node.id == 0 {
            return bad("node.id", "must be 1 or more");
        }
        if self.node.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad("node.listen", "must be ip:port, e.g. 127.0.0.1:7400");
        }
        if self.node.data_dir.as_os_str().is_empty() {
            return bad("node.data_dir", "must be set");
        }
        for (id, addr) in &self.cluster.initial_members {
            if id.parse::<u64>().map(|i| i == 0).unwrap_or(true) {
                return bad(
                    "cluster.initial_members",
                    &format!("key {id:?} must be a node id (1 or more)"),
                );
            }
            if addr.is_empty() {
                return bad(
                    "cluster.initial_members",
                    &format!("node {id} has an empty address"),
                );
            }
        }
        if !self.cluster.initial_members.is_empty()
            && !self
                .cluster
                .initial_members
                .contains_key(&self.node.id.to_string())
        {
            return bad(
                "cluster.initial_members",
                "must include this node's own id (node.id)",
            );
        }
        if self.cluster.election_timeout_min_ms <= self.cluster.heartbeat_ms
            || self.cluster.election_timeout_max_ms <= self.cluster.election_timeout_min_ms
        {
            return bad(
                "cluster.election_timeout_min_ms",
                "need heartbeat_ms < election_timeout_min_ms < election_timeout_max_ms",
            );
        }
        if self.cluster.snapshot_chunk_timeout_ms < 1000 {
            return bad(
                "cluster.snapshot_chunk_timeout_ms",
                "must be at least 1000: a follower installs the whole snapshot before it answers the last chunk",
            );
        }
        if self.bus.batch_max == 0 || self.bus.batch_max > 50_000 {
            return bad("bus.batch_max", "must be between 1 and 50000");
        }
        if self.bus.batch_linger_ms > 1000 {
            return bad("bus.batch_linger_ms", "must be between 0 and 1000");
        }
        if self.bus.ack_wait_secs == 0 {
            return bad("bus.ack_wait_secs", "must be 1 or more");
        }
        if self.bus.kind == BusKind::Nats
            && !self.bus.nats.url.starts_with("nats://")
            && !self.bus.nats.url.starts_with("tls://")
        {
            return bad("bus.nats.url", "must start with nats:// or tls://");
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad("tls.cert", "tls.cert and tls.key must be set together");
        }
        if let Some(s) = &self.slack {
            s.validate().or_else(|m| bad("slack", &m))?;
        }
        for w in &self.webhooks {
            if !w.url.starts_with("https://") && !w.url.starts_with("http://") {
                return bad("webhooks.url", "must be an http(s) URL");
            }
        }
        self.telemetry
            .validate()
            .or_else(|m| bad("telemetry", &m))?;
        Ok(())
    }

    pub fn initial_members(&self) -> BTreeMap<u64, String> {
        self.cluster
            .initial_members
            .iter()
            .filter_map(|(k, v)| Some((k.parse().ok()?, v.clone())))
            .collect()
    }

    pub fn data_file(&self, explicit: &Option<PathBuf>, default_name: &str) -> PathBuf {
        explicit
            .clone()
            .unwrap_or_else(|| self.node.data_dir.join(default_name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_fields_are_named() {
        ControlPlaneConfig::default().validate().unwrap();
        let err = ControlPlaneConfig::parse("[node]\nid = 0\n", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("node.id"), "{err}");
        let err = ControlPlaneConfig::parse("[node]\nlisten = \"nope\"\n", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("node.listen"), "{err}");
        let err = ControlPlaneConfig::parse(
            "[node]\nid = 2\n[cluster.initial_members]\n1 = \"a:1\"\n",
            "x",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("own id"), "{err}");
        let err = ControlPlaneConfig::parse("[nod]\n", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field"), "{err}");
        // openraft's own 200 ms per snapshot chunk is what stalled followers; refuse going back.
        let err = ControlPlaneConfig::parse("[cluster]\nsnapshot_chunk_timeout_ms = 200\n", "x")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cluster.snapshot_chunk_timeout_ms") && err.contains("at least 1000"),
            "{err}"
        );
        let ok = ControlPlaneConfig::parse("[cluster]\nsnapshot_chunk_timeout_ms = 5000\n", "x")
            .unwrap();
        assert_eq!(ok.cluster.snapshot_chunk_timeout_ms, 5000);
        let err = ControlPlaneConfig::parse("[bus]\nbatch_linger_ms = 5000\n", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bus.batch_linger_ms"), "{err}");
        let ok = ControlPlaneConfig::parse("[bus]\nbatch_linger_ms = 0\n", "x").unwrap();
        assert_eq!(ok.bus.batch_linger_ms, 0);
        assert_eq!(ControlPlaneConfig::default().bus.batch_linger_ms, 2);
    }
}
