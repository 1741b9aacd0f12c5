//! openraft's RPCs over tonic: every message is bincode in a `RaftPayload`, sent with the cluster
//! secret as a bearer token.

use std::time::Duration;

use custos_proto::v1::raft_client::RaftClient;
use custos_proto::v1::RaftPayload;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use crate::tls::ClientTls;
use crate::types::{Node, NodeId, TypeConfig};

/// Largest gRPC message between nodes (append batches and snapshot chunks stay well below).
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// Creates one connection per peer.
#[derive(Clone)]
pub struct Network {
    pub cluster_secret: String,
    pub tls: Option<ClientTls>,
}

pub struct Connection {
    target: NodeId,
    client: Option<RaftClient<Channel>>,
    secret: String,
}

/// Build a lazily-connecting channel to a node address (`host:port` or a URL).
pub fn channel(addr: &str, tls: Option<&ClientTls>) -> Result<Channel, tonic::transport::Error> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else if tls.is_some() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    };
    let mut ep = tonic::transport::Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10));
    if let Some(tls) = tls {
        ep = ep.tls_config(tls.config())?;
    }
    Ok(ep.connect_lazy())
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        let client = channel(&node.addr, self.tls.as_ref()).ok().map(|ch| {
            RaftClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE)
        });
        Connection {
            target,
            client,
            secret: self.cluster_secret.clone(),
        }
    }
}

impl Connection {
    async fn call<Req, Resp, E>(
        &mut self,
        which: &'static str,
        req: &Req,
        chunk: Vec<u8>,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, Node, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = self.client.as_mut().ok_or_else(|| {
            RPCError::Unreachable(Unreachable::new(&std::io::Error::other("bad peer address")))
        })?;
        let data = bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { data, chunk });
        request.set_timeout(timeout);
        if let Ok(v) = format!("Bearer {}", self.secret).parse() {
            request.metadata_mut().insert("authorization", v);
        }
        let reply = match which {
            "append" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                RPCError::Unreachable(Unreachable::new(&status))
            }
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let result: Result<Resp, E> = bincode::deserialize(&reply.into_inner().data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call("append", &req, Vec::new(), option.hard_ttl())
            .await
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let mut req = req;
        let chunk = std::mem::take(&mut req.data);
        self.call("snapshot", &req, chunk, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        req: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call("vote", &req, Vec::new(), option.hard_ttl()).await
    }
}
