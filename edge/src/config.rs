//! `custos edge --config FILE`: the edge's TOML configuration.
//!
//! ```toml
//! [edge]
//! id = "edge-eu-1"
//!
//! [controlplane]
//! servers = ["10.0.0.1:7400", "10.0.0.2:7400", "10.0.0.3:7400"]
//! token_file = "/etc/custos/edge.token"   # a token issued with --role edge
//! ca = "/etc/custos/ca.pem"                # TLS toward the control plane (optional);
//! cert = "/etc/custos/edge.pem"            # with a client certificate for mutual TLS
//! key = "/etc/custos/edge-client.key"
//!
//! [bus.nats]
//! url = "nats://127.0.0.1:4222"
//!
//! [postgres]
//! listen = "0.0.0.0:15432"
//! tls_cert = "/etc/custos/edge.crt"
//! tls_key = "/etc/custos/edge.key"
//!
//! [oidc]                                   # optional: accept OIDC JWTs as passwords
//! issuer = "https://idp.example.com"
//! audience = "custos"
//! jwks_url = "http://idp.example.com/jwks.json"
//!
//! [masking]                                # see docs/masking.md
//! columns = [ { pattern = "*ssn*", strategy = "null" } ]
//!
//! [telemetry]                              # optional: spans over OTLP/gRPC
//! otlp_endpoint = "http://127.0.0.1:4317"
//! ```

use std::path::{Path, PathBuf};

use custos_core::bus::NatsConfig;
use custos_core::mask::MaskConfig;
use custos_core::oidc::OidcConfig;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeFileConfig {
    pub edge: EdgeSection,
    pub controlplane: ControlPlaneSection,
    pub bus: BusSection,
    pub postgres: PostgresSection,
    pub http: HttpSection,
    pub metrics: MetricsSection,
    pub oidc: Option<OidcConfig>,
    pub masking: MaskConfig,
    /// Tracing spans over OTLP/gRPC (docs/operations.md, Traces); off unless an endpoint is set.
    pub telemetry: custos_core::telemetry::TelemetryConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeSection {
    /// Names this edge in events and in the control plane's logs.
    pub id: String,
}

impl Default for EdgeSection {
    fn default() -> Self {
        EdgeSection {
            id: "edge-1".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlPlaneSection {
    /// Control-plane nodes; any of them serves the configuration stream.
    pub servers: Vec<String>,
    /// A file holding a token issued with `--role edge`.
    pub token_file: Option<PathBuf>,
    /// The token itself (prefer `token_file`).
    pub token: Option<String>,
    /// Longest wait between reconnection attempts.
    pub max_backoff_ms: u64,
    /// CA bundle that signed the control plane's certificate (turns on TLS).
    pub ca: Option<PathBuf>,
    /// Client certificate and key, for a control plane that requires mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Default for ControlPlaneSection {
    fn default() -> Self {
        ControlPlaneSection {
            servers: vec!["127.0.0.1:7400".into()],
            token_file: None,
            token: None,
            max_backoff_ms: 5000,
            ca: None,
            cert: None,
            key: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct BusSection {
    pub nats: NatsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSection {
    pub enabled: bool,
    pub listen: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Accept tokens over connections without TLS. Local development only.
    pub allow_insecure_password: bool,
}

impl Default for PostgresSection {
    fn default() -> Self {
        PostgresSection {
            enabled: true,
            listen: "127.0.0.1:15432".into(),
            tls_cert: None,
            tls_key: None,
            allow_insecure_password: false,
        }
    }
}

/// `[metrics]`: Prometheus metrics at `GET http://<listen>/metrics` (docs/operations.md).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    pub listen: Option<String>,
}

/// `[http]`: the HTTP, LLM and MCP listener (docs/http-llm-mcp.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    pub enabled: bool,
    pub listen: String,
    /// PEM certificate and key: clients connect with https.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Largest request body (413 beyond).
    pub max_body_bytes: usize,
    /// Request headers must arrive within this (slow clients get 408 and are closed).
    pub header_timeout_ms: u64,
    /// The request body must arrive within this.
    pub body_timeout_ms: u64,
    /// The upstream must send its response headers within this.
    pub upstream_timeout_ms: u64,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            enabled: false,
            listen: "127.0.0.1:18080".into(),
            tls_cert: None,
            tls_key: None,
            max_body_bytes: 10 << 20,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            upstream_timeout_ms: 300_000,
        }
    }
}

impl HttpSection {
    pub fn options(&self) -> Result<crate::http::HttpOptions, ConfigError> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => {
                Some(crate::pg::server_tls(c, k).map_err(|e| ConfigError(format!("[http] {e}")))?)
            }
            _ => None,
        };
        Ok(crate::http::HttpOptions {
            tls,
            max_body: self.max_body_bytes,
            header_timeout: std::time::Duration::from_millis(self.header_timeout_ms.max(100)),
            body_timeout: std::time::Duration::from_millis(self.body_timeout_ms.max(100)),
            upstream_timeout: std::time::Duration::from_millis(self.upstream_timeout_ms.max(100)),
        })
    }
}

/// A configuration problem, naming the file and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl EdgeFileConfig {
    pub fn load(path: &Path) -> Result<EdgeFileConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        let mut cfg: EdgeFileConfig =
            toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        cfg.bus.nats.apply_env();
        cfg.validate()
            .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.edge.id.trim().is_empty() {
            return Err(ConfigError("[edge] id must not be empty".into()));
        }
        if self.controlplane.servers.is_empty() {
            return Err(ConfigError(
                "[controlplane] servers is empty: name at least one control-plane node".into(),
            ));
        }
        if self.controlplane.token.is_none() && self.controlplane.token_file.is_none() {
            return Err(ConfigError(
                "[controlplane] needs token_file (a token issued with `custos token issue EDGE --role edge`)".into(),
            ));
        }
        if self.controlplane.cert.is_some() != self.controlplane.key.is_some() {
            return Err(ConfigError(
                "[controlplane] cert and key go together".into(),
            ));
        }
        if self.controlplane.cert.is_some() && self.controlplane.ca.is_none() {
            return Err(ConfigError(
                "[controlplane] cert/key need ca (the CA that signed the control plane's certificate)".into(),
            ));
        }
        if self.postgres.tls_cert.is_some() != self.postgres.tls_key.is_some() {
            return Err(ConfigError(
                "[postgres] tls_cert and tls_key go together".into(),
            ));
        }
        if self.postgres.enabled
            && self.postgres.tls_cert.is_none()
            && !self.postgres.allow_insecure_password
        {
            return Err(ConfigError(
                "[postgres] has no tls_cert/tls_key: clients could not send tokens safely (set them, or allow_insecure_password = true for local development)".into(),
            ));
        }
        if self.http.tls_cert.is_some() != self.http.tls_key.is_some() {
            return Err(ConfigError(
                "[http] tls_cert and tls_key go together".into(),
            ));
        }
        if self.http.max_body_bytes == 0 {
            return Err(ConfigError(
                "[http] max_body_bytes must be 1 or more".into(),
            ));
        }
        custos_core::mask::Masker::new(&self.masking)
            .map_err(|e| ConfigError(format!("[masking] {e}")))?;
        self.telemetry.validate().map_err(ConfigError)?;
        Ok(())
    }

    /// TLS toward the control plane, when `[controlplane] ca` is set.
    pub fn controlplane_tls(
        &self,
    ) -> Result<Option<tonic::transport::ClientTlsConfig>, ConfigError> {
        let Some(ca) = &self.controlplane.ca else {
            return Ok(None);
        };
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| ConfigError(format!("cannot read {}: {e}", p.display())))
        };
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&self.controlplane.cert, &self.controlplane.key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        Ok(Some(tls))
    }

    /// The control-plane token (from `token` or `token_file`).
    pub fn token(&self) -> Result<String, ConfigError> {
        if let Some(t) = &self.controlplane.token {
            return Ok(t.trim().to_string());
        }
        let path = self.controlplane.token_file.as_ref().expect("validated");
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|e| ConfigError(format!("cannot read token_file {}: {e}", path.display())))
    }
}
