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
    let mut ep = tonic::transport::Endpoint::from_shared(server.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2));
    if let Some(tls) = &opts.tls {
        ep = ep
            .tls_config(tls.clone())
            .map_err(|e| format!("TLS configuration: {e}"))?;
    }
    let ch = ep
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut client = EdgeSyncClient::new(ch);
    let mut req = tonic::Request::new(WatchRequest {
        edge_id: opts.edge_id.clone(),
    });
    let bearer = format!("Bearer {}", opts.token)
        .parse()
        .map_err(|_| "token is not valid header text".to_string())?;
    req.metadata_mut().insert("authorization", bearer);
    let mut stream = client
        .watch(req)
        .await
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
