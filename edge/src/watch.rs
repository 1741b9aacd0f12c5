//! Follow the control plane's configuration (policy, connections, token hashes).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use custos_proto::v1::{
    edge_change::Change, edge_sync_client::EdgeSyncClient, edge_sync_message::Body, Approval,
    Connection, Grant, PolicySet, TokenRecord, WatchRequest,
};
use tokio::sync::watch;

/// What an edge knows. `revision == 0` and `synced == false` means it never heard from the
/// control plane and must refuse clients.
#[derive(Debug, Clone, Default)]
pub struct EdgeConfig {
    pub revision: u64,
    pub synced: bool,
    /// The configuration stream is up: the last message came over a stream that is still open
    /// (HTTP/2 keepalive notices a dead one within ~10 s). False while the edge serves from the
    /// last configuration it had.
    pub stream_up: bool,
    pub policy: Option<PolicySet>,
    pub connections: BTreeMap<String, Connection>,
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Approval requests that are pending or were decided recently (a held command waits for
    /// its request to change state here).
    pub approvals: BTreeMap<String, Approval>,
    /// Grants in force.
    pub grants: BTreeMap<String, Grant>,
}

/// How long a decided request is kept, so a late waiter still sees the outcome.
const KEEP_DECIDED: i64 = 10 * 60 * 1_000_000_000;

impl EdgeConfig {
    /// Apply one message of the stream, returning the new config.
    pub fn apply(&self, msg: custos_proto::v1::EdgeSyncMessage) -> EdgeConfig {
        let mut next = match msg.body {
            Some(Body::Snapshot(s)) => EdgeConfig {
                revision: 0,
                synced: true,
                stream_up: true,
                policy: s.policy,
                connections: s
                    .connections
                    .into_iter()
                    .map(|c| (c.name.clone(), c))
                    .collect(),
                tokens: s
                    .tokens
                    .into_iter()
                    .map(|t| (t.token_id.clone(), t))
                    .collect(),
                approvals: s.approvals.into_iter().map(|a| (a.id.clone(), a)).collect(),
                grants: s.grants.into_iter().map(|g| (g.id.clone(), g)).collect(),
            },
            Some(Body::Change(c)) => {
                let mut next = self.clone();
                match c.change {
                    Some(Change::Policy(p)) => next.policy = Some(p),
                    Some(Change::ConnectionUpserted(conn)) => {
                        next.connections.insert(conn.name.clone(), conn);
                    }
                    Some(Change::ConnectionDeleted(name)) => {
                        next.connections.remove(&name);
                    }
                    Some(Change::Token(t)) => {
                        next.tokens.insert(t.token_id.clone(), t);
                    }
                    Some(Change::Approval(a)) => {
                        let now = custos_core::events::now_unix_nano();
                        next.approvals.retain(|_, a| {
                            a.state == "pending" || a.decided_unix_nano > now - KEEP_DECIDED
                        });
                        next.approvals.insert(a.id.clone(), a);
                    }
                    Some(Change::Grant(g)) => {
                        let now = custos_core::events::now_unix_nano();
                        next.grants.retain(|_, g| g.expires_unix_nano > now);
                        next.grants.insert(g.id.clone(), g);
                    }
                    None => {}
                }
                next
            }
            None => self.clone(),
        };
        next.revision = msg.revision;
        next.stream_up = true;
        next
    }
}

/// Where and how to reach the control plane.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub edge_id: String,
    /// Control-plane addresses; tried in turn (any node serves the stream).
    pub servers: Vec<String>,
    pub token: String,
    pub max_backoff: Duration,
    /// TLS (and a client certificate for mutual TLS) toward the control plane.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

pub(crate) fn server_url(s: &str, tls: bool) -> String {
    if s.contains("://") {
        s.to_string()
    } else if tls {
        format!("https://{s}")
    } else {
        format!("http://{s}")
    }
}

/// HTTP/2 PING interval toward the control plane, and how long an unanswered PING may wait: a
/// connection that went silent (a partition that leaves TCP half-open) is noticed within their sum
/// instead of never.
const KEEPALIVE: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on connecting (TCP, TLS and the HTTP/2 handshake) and on the first answer to a call.
pub(crate) const CALL_SETUP: Duration = Duration::from_secs(10);

/// The endpoint every gRPC connection of the edge to a control-plane node uses: bounded connect,
/// TCP keepalive and HTTP/2 keepalive PINGs, also while idle.
pub(crate) fn endpoint(
    server: &str,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<tonic::transport::Endpoint, String> {
    let mut ep = tonic::transport::Endpoint::from_shared(server.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_keepalive(Some(Duration::from_secs(10)))
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        ep = ep
            .tls_config(tls.clone())
            .map_err(|e| format!("TLS configuration: {e}"))?;
    }
    Ok(ep)
}

/// Follow the control plane until `shutdown` fires. The receiver always holds the last good
/// configuration; a lost stream is retried with exponential backoff across all servers.
pub async fn run(
    opts: WatchOptions,
    tx: watch::Sender<Arc<EdgeConfig>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut i = 0usize;
    loop {
        if *shutdown.borrow() || opts.servers.is_empty() {
            return;
        }
        let server = server_url(&opts.servers[i % opts.servers.len()], opts.tls.is_some());
        i += 1;
        let res = tokio::select! {
            _ = shutdown.changed() => return,
            r = follow(&opts, &server, &tx) => r,
        };
        if tx.borrow().stream_up {
            tx.send_modify(|c| {
                let mut next = (**c).clone();
                next.stream_up = false;
                *c = Arc::new(next);
            });
        }
        match res {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(server = %server, error = %e, "configuration stream lost; serving the last configuration and retrying")
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(opts.max_backoff);
    }
}

async fn follow(
    opts: &WatchOptions,
    server: &str,
    tx: &watch::Sender<Arc<EdgeConfig>>,
) -> Result<(), String> {
    let ep = endpoint(server, opts.tls.as_ref())?;
    let ch = tokio::time::timeout(CALL_SETUP, ep.connect())
        .await
        .map_err(|_| format!("cannot connect: no handshake within {CALL_SETUP:?}"))?
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut client = EdgeSyncClient::new(ch);
    let mut req = tonic::Request::new(WatchRequest {
        edge_id: opts.edge_id.clone(),
    });
    let bearer = format!("Bearer {}", opts.token)
        .parse()
        .map_err(|_| "token is not valid header text".to_string())?;
    req.metadata_mut().insert("authorization", bearer);
    let mut stream = tokio::time::timeout(CALL_SETUP, client.watch(req))
        .await
        .map_err(|_| format!("no answer to the configuration stream within {CALL_SETUP:?}"))?
        .map_err(|s| s.message().to_string())?
        .into_inner();
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| s.message().to_string())?
    {
        let next = tx.borrow().apply(msg);
        tx.send_replace(Arc::new(next));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use custos_proto::v1::{EdgeChange, EdgeSnapshot, EdgeSyncMessage};

    #[test]
    fn snapshot_then_changes() {
        let c = EdgeConfig::default();
        assert!(!c.synced);
        let c = c.apply(EdgeSyncMessage {
            revision: 3,
            body: Some(Body::Snapshot(EdgeSnapshot {
                policy: None,
                connections: vec![Connection {
                    name: "a".into(),
                    ..Default::default()
                }],
                tokens: vec![],
                ..Default::default()
            })),
        });
        assert!(c.synced && c.revision == 3 && c.connections.contains_key("a"));
        let c = c.apply(EdgeSyncMessage {
            revision: 4,
            body: Some(Body::Change(EdgeChange {
                change: Some(Change::ConnectionDeleted("a".into())),
            })),
        });
        assert!(c.connections.is_empty() && c.revision == 4);
        let c = c.apply(EdgeSyncMessage {
            revision: 5,
            body: Some(Body::Change(EdgeChange {
                change: Some(Change::Policy(PolicySet {
                    version: 2,
                    ..Default::default()
                })),
            })),
        });
        assert_eq!(c.policy.unwrap().version, 2);
    }
}
