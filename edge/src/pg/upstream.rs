//! The upstream leg: connect to the real PostgreSQL with the connection's own credentials
//! (SCRAM-SHA-256, md5, cleartext or trust; TLS when configured). The client never sees them,
//! and no error built here contains them.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use custos_core::proto::v1::Connection;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::wire::{self, put_cstr, Body, Reader, WireError, Writer};

/// A byte stream (plain TCP or TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}
pub type BoxIo = Box<dyn Io>;

/// Why the upstream could not be used. Client-safe: never includes credentials.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection {conn}: cannot reach {addr}: {reason}")]
    Unreachable {
        conn: String,
        addr: String,
        reason: String,
    },
    #[error("connection {conn}: the server at {addr} refused custos's login: {message} (check the credentials stored with `custos connection put {conn} --secret username=… --secret password=…`)")]
    Login {
        conn: String,
        addr: String,
        message: String,
    },
    #[error("connection {conn}: {message}")]
    Config { conn: String, message: String },
    #[error("connection {conn}: protocol error from {addr}: {message}")]
    Protocol {
        conn: String,
        addr: String,
        message: String,
    },
}

impl UpstreamError {
    /// What a client is told: the server's own login error text names the injected user, so
    /// only its SQLSTATE goes to the client; the edge's log has the whole message.
    pub fn client_message(&self) -> String {
        match self {
            UpstreamError::Login { conn, message, .. } => {
                let code = message
                    .rsplit_once('(')
                    .map(|(_, c)| c.trim_end_matches(')'))
                    .unwrap_or("unknown");
                format!(
                    "connection {conn}: the target refused custos's stored credentials (SQLSTATE {code}); an operator can see why in the edge log"
                )
            }
            other => other.to_string(),
        }
    }
}

/// How to reach and log in to one upstream.
#[derive(Clone)]
pub struct Target {
    pub conn: String,
    pub addr: String,
    pub database: String,
    pub user: String,
    password: Option<String>,
    pub tls: TlsMode,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("conn", &self.conn)
            .field("addr", &self.addr)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Clone)]
pub enum TlsMode {
    Disable,
    /// Encrypt; verify the certificate against these roots (verify-full) or not at all (require).
    Require(Option<Arc<rustls::RootCertStore>>),
}

impl Target {
    pub fn from_connection(c: &Connection) -> Result<Target, UpstreamError> {
        let cfg = |message: String| UpstreamError::Config {
            conn: c.name.clone(),
            message,
        };
        if c.kind != "postgres" {
            return Err(cfg(format!("is a {} connection, not postgres", c.kind)));
        }
        let user = c
            .secrets
            .get("username")
            .or_else(|| c.secrets.get("user"))
            .or_else(|| c.options.get("username"))
            .cloned()
            .ok_or_else(|| {
                cfg("has no username (custos connection put … --secret username=NAME)".into())
            })?;
        let tls = match c.options.get("sslmode").map(String::as_str) {
            None | Some("disable") => TlsMode::Disable,
            Some("require") => TlsMode::Require(None),
            Some("verify-full") => {
                let path = c.options.get("sslrootcert").ok_or_else(|| {
                    cfg("sslmode=verify-full needs the option sslrootcert=<CA file>".into())
                })?;
                use rustls::pki_types::pem::PemObject;
                let pem = std::fs::read(path)
                    .map_err(|e| cfg(format!("cannot read sslrootcert {path}: {e}")))?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                    let cert =
                        cert.map_err(|e| cfg(format!("bad certificate in {path}: {e:?}")))?;
                    roots
                        .add(cert)
                        .map_err(|e| cfg(format!("bad certificate in {path}: {e}")))?;
                }
                TlsMode::Require(Some(Arc::new(roots)))
            }
            Some(other) => {
                return Err(cfg(format!(
                    "sslmode={other:?} is not supported; use disable, require or verify-full"
                )))
            }
        };
        Ok(Target {
            conn: c.name.clone(),
            addr: c.address.clone(),
            database: c
                .options
                .get("database")
                .cloned()
                .unwrap_or_else(|| c.name.clone()),
            user,
            password: c.secrets.get("password").cloned(),
            tls,
        })
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> UpstreamError {
        UpstreamError::Unreachable {
            conn: self.conn.clone(),
            addr: self.addr.clone(),
            reason: reason.to_string(),
        }
    }

    fn protocol(&self, message: impl std::fmt::Display) -> UpstreamError {
        UpstreamError::Protocol {
            conn: self.conn.clone(),
            addr: self.addr.clone(),
            message: message.to_string(),
        }
    }
}

/// A logged-in upstream session, ready for queries.
pub struct Upstream {
    pub reader: Reader<ReadHalf<BoxIo>>,
    pub writer: Writer<WriteHalf<BoxIo>>,
    /// `ParameterStatus` bodies to replay to the client, in order.
    pub parameters: Vec<Bytes>,
    /// Notices sent during login.
    pub notices: Vec<Bytes>,
    /// The server's cancel key (pid, secret).
    pub key: (i32, i32),
    /// Transaction status of the first ReadyForQuery.
    pub status: u8,
}

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn open(t: &Target) -> Result<BoxIo, UpstreamError> {
    let mut tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&t.addr))
        .await
        .map_err(|_| t.unreachable("timed out after 10 s"))?
        .map_err(|e| t.unreachable(e))?;
    let _ = tcp.set_nodelay(true);
    let TlsMode::Require(roots) = &t.tls else {
        return Ok(Box::new(tcp));
    };
    let mut req = BytesMut::new();
    req.put_i32(8);
    req.put_i32(wire::SSL_REQUEST);
    tcp.write_all(&req).await.map_err(|e| t.unreachable(e))?;
    let mut answer = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut answer)
        .await
        .map_err(|e| t.unreachable(e))?;
    if answer[0] != b'S' {
        return Err(UpstreamError::Config {
            conn: t.conn.clone(),
            message: format!(
                "sslmode requires TLS but the server at {} does not offer it",
                t.addr
            ),
        });
    }
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| t.unreachable(e))?;
    let config = match roots {
        Some(roots) => builder
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth(),
    };
    let host = t.addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(&t.addr);
    let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        .map_err(|e| t.unreachable(format!("bad server name {host}: {e}")))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| t.unreachable(format!("TLS handshake failed: {e}")))?;
    Ok(Box::new(tls))
}

fn password_message(w: &mut Writer<WriteHalf<BoxIo>>, body: &[u8]) {
    w.msg(b'p', body);
}

/// Connect and log in. `extra` are start-up parameters passed through from the client
/// (application_name, client_encoding, DateStyle …).
pub async fn connect(t: &Target, extra: &[(String, String)]) -> Result<Upstream, UpstreamError> {
    let io = open(t).await?;
    let (r, w) = tokio::io::split(io);
    let mut reader = Reader::new(r);
    let mut writer = Writer::new(w);
    let mut params = vec![
        ("user".to_string(), t.user.clone()),
        ("database".to_string(), t.database.clone()),
    ];
    params.extend(extra.iter().cloned());
    writer.raw(&wire::startup_packet(&params));
    writer.flush().await.map_err(|e| t.unreachable(e))?;
    let need_password = || {
        t.password.clone().ok_or_else(|| UpstreamError::Login {
            conn: t.conn.clone(),
            addr: t.addr.clone(),
            message: "the server asks for a password and the connection has none stored".into(),
        })
    };
    let mut scram: Option<ScramSha256> = None;
    let mut parameters = Vec::new();
    let mut notices = Vec::new();
    let mut key = (0, 0);
    loop {
        let h = reader.header().await.map_err(|e| t.protocol(e))?;
        if h.len > 1 << 20 {
            return Err(t.protocol(format!("login message of {} bytes", h.len)));
        }
        let body = reader.body(h.len).await.map_err(|e| t.protocol(e))?;
        let mut b = Body::new(&body);
        match h.tag {
            b'R' => {
                let code = b.i32().map_err(|e| t.protocol(e))?;
                match code {
                    0 => {}
                    3 => {
                        let mut m = BytesMut::new();
                        put_cstr(&mut m, &need_password()?);
                        password_message(&mut writer, &m);
                    }
                    5 => {
                        let salt: [u8; 4] = b
                            .bytes(4)
                            .map_err(|e| t.protocol(e))?
                            .try_into()
                            .map_err(|_| t.protocol("bad md5 salt"))?;
                        let hashed = postgres_protocol::authentication::md5_hash(
                            t.user.as_bytes(),
                            need_password()?.as_bytes(),
                            salt,
                        );
                        let mut m = BytesMut::new();
                        put_cstr(&mut m, &hashed);
                        password_message(&mut writer, &m);
                    }
                    10 => {
                        let mut mechs = Vec::new();
                        loop {
                            let m = b.cstr().map_err(|e| t.protocol(e))?;
                            if m.is_empty() {
                                break;
                            }
                            mechs.push(m);
                        }
                        if !mechs.iter().any(|m| m == SCRAM_SHA_256) {
                            return Err(t.protocol(format!(
                                "server offers SASL mechanisms {mechs:?}; custos supports {SCRAM_SHA_256}"
                            )));
                        }
                        let s = ScramSha256::new(
                            need_password()?.as_bytes(),
                            ChannelBinding::unsupported(),
                        );
                        let mut m = BytesMut::new();
                        put_cstr(&mut m, SCRAM_SHA_256);
                        m.put_i32(s.message().len() as i32);
                        m.put_slice(s.message());
                        password_message(&mut writer, &m);
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| t.protocol("SASLContinue before SASL"))?;
                        s.update(&body[4..]).map_err(|e| t.protocol(format!("SCRAM: {e}")))?;
                        let msg = s.message().to_vec();
                        password_message(&mut writer, &msg);
                    }
                    12 => {
                        let mut s = scram
                            .take()
                            .ok_or_else(|| t.protocol("SASLFinal before SASL"))?;
                        s.finish(&body[4..]).map_err(|e| {
                            t.protocol(format!("SCRAM server signature check failed: {e}"))
                        })?;
                    }
                    other => {
                        return Err(t.protocol(format!(
                            "unsupported authentication method {other} (custos supports SCRAM-SHA-256, md5, password and trust)"
                        )))
                    }
                }
                writer.flush().await.map_err(|e| t.unreachable(e))?;
            }
            b'S' => parameters.push(body),
            b'K' => {
                key = (
                    b.i32().map_err(|e| t.protocol(e))?,
                    b.i32().map_err(|e| t.protocol(e))?,
                );
            }
            b'N' => notices.push(body),
            b'Z' => {
                let status = b.u8().map_err(|e| t.protocol(e))?;
                return Ok(Upstream {
                    reader,
                    writer,
                    parameters,
                    notices,
                    key,
                    status,
                });
            }
            b'E' => {
                let e = wire::parse_error(&body);
                return Err(UpstreamError::Login {
                    conn: t.conn.clone(),
                    addr: t.addr.clone(),
                    message: format!("{} ({})", e.message, e.code),
                });
            }
            b'v' => {} // NegotiateProtocolVersion: we asked for plain 3.0
            other => {
                return Err(t.protocol(format!(
                    "unexpected message '{}' during login",
                    other as char
                )))
            }
        }
    }
}

/// Send a cancel request for `key` to the upstream.
pub async fn cancel(t: &Target, key: (i32, i32)) -> Result<(), UpstreamError> {
    let mut tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&t.addr))
        .await
        .map_err(|_| t.unreachable("timed out"))?
        .map_err(|e| t.unreachable(e))?;
    let mut m = BytesMut::new();
    m.put_i32(16);
    m.put_i32(wire::CANCEL_REQUEST);
    m.put_i32(key.0);
    m.put_i32(key.1);
    tcp.write_all(&m).await.map_err(|e| t.unreachable(e))?;
    let _ = tcp.shutdown().await;
    Ok(())
}

impl From<WireError> for UpstreamError {
    fn from(e: WireError) -> Self {
        UpstreamError::Protocol {
            conn: String::new(),
            addr: String::new(),
            message: e.to_string(),
        }
    }
}
