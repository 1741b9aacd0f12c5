//! Optional (mutual) TLS for the control plane's gRPC server and its clients.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// `[tls]` in a control-plane or edge config. With `ca` set, the server requires client
/// certificates signed by it (mutual TLS) and clients verify the server against it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of this process.
    pub cert: Option<PathBuf>,
    /// PEM private key of this process.
    pub key: Option<PathBuf>,
    /// PEM CA bundle that signs peers' certificates.
    pub ca: Option<PathBuf>,
    /// Name to expect in the server certificate (default: the host of the address).
    pub server_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read TLS file {path} ([tls] {field}): {source}")]
pub struct TlsError {
    pub field: &'static str,
    pub path: String,
    pub source: std::io::Error,
}

fn read(field: &'static str, p: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(p).map_err(|source| TlsError {
        field,
        path: p.display().to_string(),
        source,
    })
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some() && self.key.is_some()
    }

    pub fn server(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Ok(None);
        };
        let mut cfg = ServerTlsConfig::new()
            .identity(Identity::from_pem(read("cert", cert)?, read("key", key)?));
        if let Some(ca) = &self.ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(read("ca", ca)?));
        }
        Ok(Some(cfg))
    }

    pub fn client(&self) -> Result<Option<ClientTls>, TlsError> {
        let Some(ca) = &self.ca else { return Ok(None) };
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("ca", ca)?));
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            cfg = cfg.identity(Identity::from_pem(read("cert", cert)?, read("key", key)?));
        }
        if let Some(name) = &self.server_name {
            cfg = cfg.domain_name(name.clone());
        }
        Ok(Some(ClientTls(cfg)))
    }
}

/// A ready client TLS configuration.
#[derive(Clone, Debug)]
pub struct ClientTls(ClientTlsConfig);

impl ClientTls {
    pub fn config(&self) -> ClientTlsConfig {
        self.0.clone()
    }
}
