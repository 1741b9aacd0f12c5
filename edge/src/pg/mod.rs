//! The PostgreSQL listener: SSLRequest and TLS, token authentication, the upstream login with
//! injected credentials, cancel mapping, then the relay ([`relay`]).
//!
//! Clients connect as `user=<identity> dbname=<connection> password=<token>`.

pub mod catalog;
mod relay;
pub mod upstream;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use custos_core::events::{new_id, Origin};
use custos_core::proto::v1::{event::Payload, SessionEnded, SessionStarted};
use parking_lot::Mutex;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::field::Empty;
use tracing::Instrument as _;

use crate::pipeline::{AuditMode, Services};
use upstream::{BoxIo, Target};
use wire::{Body, Reader, WireError, Writer};

/// Listener options.
#[derive(Clone, Default)]
pub struct PgOptions {
    /// TLS for clients (answers SSLRequest with `S`); `None` answers `N`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Accept a token over a connection without TLS (local development only).
    pub allow_insecure_password: bool,
}

struct CancelTarget {
    target: Target,
    key: (i32, i32),
}

/// The PostgreSQL edge: one per process, shared by all its sessions.
pub struct PgEdge {
    services: Services,
    opts: PgOptions,
    cancels: Mutex<HashMap<(i32, i32), CancelTarget>>,
    catalog: catalog::Catalog,
}

/// Start-up parameters passed through to the upstream; everything else is dropped (for
/// example `options`, which could set server parameters behind the classifier's back).
const PASS_THROUGH: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "extra_float_digits",
    "intervalstyle",
    "search_path",
];

type ClientReader = Reader<ReadHalf<BoxIo>>;
type ClientWriter = Writer<WriteHalf<BoxIo>>;

impl PgEdge {
    pub fn new(services: Services, opts: PgOptions) -> Arc<PgEdge> {
        Arc::new(PgEdge {
            services,
            opts,
            cancels: Mutex::new(HashMap::new()),
            catalog: catalog::Catalog::default(),
        })
    }

    /// Accept clients until `shutdown` turns true.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let edge = self.clone();
            // The session's span: every statement of the session is a child (docs/operations.md).
            let span = tracing::debug_span!(
                "pg.session",
                otel.kind = "server",
                protocol = "postgres",
                client.address = %peer,
                tls = Empty,
                identity = Empty,
                connection = Empty,
                session_id = Empty,
                outcome = Empty,
                commands = Empty,
                denied = Empty,
                otel.status_code = Empty,
            );
            tokio::spawn(
                async move {
                    if let Err(e) = edge.handle(tcp, peer).await {
                        let span = tracing::Span::current();
                        span.record("outcome", "error");
                        span.record("otel.status_code", "ERROR");
                        tracing::debug!(peer = %peer, error = %e, "session ended with an error");
                    }
                }
                .instrument(span),
            );
        }
    }

    async fn handle(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) -> Result<(), WireError> {
        let io: BoxIo = Box::new(tcp);
        let (r, w) = tokio::io::split(io);
        let mut reader = Reader::new(r);
        let mut writer = Writer::new(w);
        let mut tls = false;
        let (params, negotiate_minor) = loop {
            let pkt = reader.startup().await?;
            let mut b = Body::new(&pkt);
            let code = b.i32()?;
            match code {
                wire::SSL_REQUEST => match (&self.opts.tls, tls) {
                    (Some(cfg), false) => {
                        writer.raw(b"S");
                        writer.flush().await?;
                        let r = reader.into_inner()?;
                        let io = r.unsplit(writer.into_inner());
                        let stream = tokio_rustls::TlsAcceptor::from(cfg.clone())
                            .accept(io)
                            .await?;
                        let io: BoxIo = Box::new(stream);
                        let (r, w) = tokio::io::split(io);
                        reader = Reader::new(r);
                        writer = Writer::new(w);
                        tls = true;
                    }
                    _ => {
                        writer.raw(b"N");
                        writer.flush().await?;
                    }
                },
                wire::GSSENC_REQUEST => {
                    writer.raw(b"N");
                    writer.flush().await?;
                }
                wire::CANCEL_REQUEST => {
                    let key = (b.i32()?, b.i32()?);
                    self.cancel(key).await;
                    return Ok(());
                }
                v if v >> 16 == 3 => {
                    break (wire::parse_startup_params(&pkt[4..])?, v & 0xffff != 0);
                }
                v => {
                    fatal(
                        &mut writer,
                        "08P01",
                        &format!(
                            "unsupported frontend protocol {}.{}: custos speaks 3.0",
                            v >> 16,
                            v & 0xffff
                        ),
                        None,
                    )
                    .await;
                    return Ok(());
                }
            }
        };
        if negotiate_minor {
            // We speak 3.0; tell a newer client so (and which _pq_ options we ignore).
            let unknown: Vec<&String> = params
                .iter()
                .map(|(k, _)| k)
                .filter(|k| k.starts_with("_pq_."))
                .collect();
            let mut m = BytesMut::new();
            m.put_i32(wire::PROTOCOL_V3);
            m.put_i32(unknown.len() as i32);
            for k in unknown {
                wire::put_cstr(&mut m, k);
            }
            writer.msg(b'v', &m);
        }
        tracing::Span::current().record("tls", tls);
        let session = Login {
            edge: self.clone(),
            peer,
            tls,
            params,
        };
        session.run(reader, writer).await
    }

    async fn cancel(&self, key: (i32, i32)) {
        let target = {
            let c = self.cancels.lock();
            c.get(&key).map(|t| (t.target.clone(), t.key))
        };
        match target {
            Some((t, upstream_key)) => {
                if let Err(e) = upstream::cancel(&t, upstream_key).await {
                    tracing::warn!(error = %e, "cancel request not delivered");
                }
            }
            None => tracing::debug!("cancel request for an unknown key ignored"),
        }
    }
}

/// Send a FATAL error and close.
async fn fatal(w: &mut ClientWriter, code: &str, message: &str, hint: Option<&str>) {
    // Only the SQLSTATE: the message can name users and connections the client typed.
    let span = tracing::Span::current();
    span.record("outcome", format!("refused:{code}").as_str());
    span.record("otel.status_code", "ERROR");
    let body = wire::error_body("FATAL", code, message, None, hint);
    w.msg(b'E', &body);
    w.shutdown().await;
}

struct Login {
    edge: Arc<PgEdge>,
    peer: SocketAddr,
    tls: bool,
    params: Vec<(String, String)>,
}

impl Login {
    fn param(&self, k: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    async fn run(
        self,
        mut reader: ClientReader,
        mut writer: ClientWriter,
    ) -> Result<(), WireError> {
        let svc = &self.edge.services;
        let Some(user) = self.param("user").map(str::to_string) else {
            fatal(
                &mut writer,
                "28000",
                "no user given: connect with user=<identity>",
                None,
            )
            .await;
            return Ok(());
        };
        let database = self.param("database").unwrap_or(&user).to_string();
        if self
            .param("replication")
            .is_some_and(|v| v != "false" && v != "0")
        {
            fatal(
                &mut writer,
                "0A000",
                "replication connections are not supported through custos",
                None,
            )
            .await;
            return Ok(());
        }
        if !self.tls && !self.edge.opts.allow_insecure_password {
            fatal(
                &mut writer,
                "28000",
                "custos refuses to take a token over a connection without TLS",
                Some("connect with sslmode=require (or set postgres.allow_insecure_password = true for local development)"),
            )
            .await;
            return Ok(());
        }
        let cfg = svc.config();
        if !cfg.synced {
            fatal(
                &mut writer,
                "57P03",
                &format!(
                    "custos edge {} has not received its configuration from the control plane yet, so it lets nobody in",
                    svc.edge_id
                ),
                Some("check that the control plane is reachable from the edge ([controlplane] servers) and retry"),
            )
            .await;
            return Ok(());
        }
        // Ask for the token.
        let mut m = BytesMut::new();
        m.put_i32(3);
        writer.msg(b'R', &m);
        writer.flush().await?;
        let h = reader.header().await?;
        if h.tag != b'p' || h.len > 64 * 1024 {
            fatal(&mut writer, "08P01", "expected a password message", None).await;
            return Ok(());
        }
        let body = reader.body(h.len).await?;
        let token = Body::new(&body).cstr()?;
        let cfg = svc.config();
        let who = match svc.auth.authenticate(&cfg, &user, &token).await {
            Ok(id) => id,
            Err(e) => {
                tracing::info!(user = %user, peer = %self.peer, reason = %e, "client authentication failed");
                fatal(
                    &mut writer,
                    "28P01",
                    &format!("custos: password authentication failed for user \"{user}\": {e}"),
                    None,
                )
                .await;
                return Ok(());
            }
        };
        drop(token);
        tracing::Span::current().record("identity", who.subject.as_str());
        let Some(conn) = cfg.connections.get(&database).cloned() else {
            fatal(
                &mut writer,
                "3D000",
                &format!("custos: connection \"{database}\" does not exist"),
                Some("connect with dbname=<connection>; `custos connection list` shows the known ones"),
            )
            .await;
            return Ok(());
        };
        let target = match Target::from_connection(&conn) {
            Ok(t) => t,
            Err(e) => {
                fatal(&mut writer, "08004", &format!("custos: {e}"), None).await;
                return Ok(());
            }
        };
        let mode = match AuditMode::of(&conn) {
            Ok(m) => m,
            Err(e) => {
                fatal(&mut writer, "08004", &format!("custos: {e}"), None).await;
                return Ok(());
            }
        };
        let extra: Vec<(String, String)> = self
            .params
            .iter()
            .filter(|(k, _)| PASS_THROUGH.contains(&k.to_ascii_lowercase().as_str()))
            .cloned()
            .collect();
        tracing::Span::current().record("connection", conn.name.as_str());
        let login = tracing::debug_span!(
            "upstream.connect",
            otel.kind = "client",
            db.system = "postgresql",
            otel.status_code = Empty
        );
        let up = match upstream::connect(&target, &extra)
            .instrument(login.clone())
            .await
        {
            Ok(u) => u,
            Err(e) => {
                login.record("otel.status_code", "ERROR");
                drop(login);
                tracing::warn!(connection = %conn.name, error = %e, "upstream login failed");
                fatal(
                    &mut writer,
                    "08001",
                    &format!("custos: {}", e.client_message()),
                    None,
                )
                .await;
                return Ok(());
            }
        };
        drop(login);
        let origin = Origin {
            edge_id: svc.edge_id.clone(),
            session_id: new_id(),
            identity: who.subject.clone(),
            connection: conn.name.clone(),
        };
        tracing::Span::current().record("session_id", origin.session_id.as_str());
        svc.recorder
            .metrics
            .inc("custos_edge_sessions_total", &[("protocol", "postgres")]);
        let started = origin.event(Payload::SessionStarted(SessionStarted {
            protocol: "postgres".into(),
            client_addr: self.peer.to_string(),
            groups: who.groups.clone(),
            auth_method: who.method.into(),
            client_name: self.param("application_name").unwrap_or("").into(),
            tls: self.tls,
        }));
        if let Err(e) = svc.recorder.record(mode, started).await {
            fatal(
                &mut writer,
                "57P03",
                &format!(
                    "custos: the audit bus is unavailable ({e}) and connection {} records strictly, so nothing may run unrecorded",
                    conn.name
                ),
                Some("retry when the bus is back; operators: check NATS ([bus] in the edge config)"),
            )
            .await;
            return Ok(());
        }
        // Our own cancel key, mapped to the upstream's.
        let key = {
            let mut c = self.edge.cancels.lock();
            let key = loop {
                let k = (rand::random::<i32>() & 0x7fff_ffff, rand::random::<i32>());
                if !c.contains_key(&k) {
                    break k;
                }
            };
            c.insert(
                key,
                CancelTarget {
                    target: target.clone(),
                    key: up.key,
                },
            );
            key
        };
        let mut m = BytesMut::new();
        m.put_i32(0);
        writer.msg(b'R', &m);
        let mut scs = true;
        for p in &up.parameters {
            if let Ok(params) = parse_param(p) {
                if params.0 == "standard_conforming_strings" {
                    scs = params.1 == "on";
                }
            }
            writer.msg(b'S', p);
        }
        let mut k = BytesMut::new();
        k.put_i32(key.0);
        k.put_i32(key.1);
        writer.msg(b'K', &k);
        for n in &up.notices {
            writer.msg(b'N', n);
        }
        writer.msg(b'Z', &[up.status]);
        writer.flush().await?;
        tracing::info!(session = %origin.session_id, identity = %who.subject, connection = %conn.name, "session started");

        let t0 = Instant::now();
        let outcome = relay::Relay {
            services: svc.clone(),
            catalog: &self.edge.catalog,
            origin: origin.clone(),
            who,
            conn,
            target,
            mode,
            scs,
        }
        .run(reader, writer, up)
        .await;
        self.edge.cancels.lock().remove(&key);
        let ended = origin.event(Payload::SessionEnded(SessionEnded {
            reason: outcome.reason.clone(),
            duration_ms: t0.elapsed().as_millis() as u64,
            commands: outcome.commands,
            denied: outcome.denied,
            error: outcome.error.clone().unwrap_or_default(),
        }));
        svc.recorder.later(ended).await;
        let span = tracing::Span::current();
        span.record("outcome", outcome.reason.as_str());
        span.record("commands", outcome.commands);
        span.record("denied", outcome.denied);
        tracing::info!(session = %origin.session_id, reason = %outcome.reason, "session ended");
        Ok(())
    }
}

fn parse_param(body: &[u8]) -> Result<(String, String), WireError> {
    let mut b = Body::new(body);
    Ok((b.cstr()?, b.cstr()?))
}

/// Load a TLS server config from PEM files.
pub fn server_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read certificate {}: {e:?}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate {}: {e:?}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read private key {}: {e:?}", key.display()))?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not fit: {e}"))?;
    Ok(Arc::new(cfg))
}
