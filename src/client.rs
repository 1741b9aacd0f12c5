//! A gRPC client for the control plane that turns transport errors into next steps.

use anyhow::{anyhow, Context, Result};
use custos_proto::v1::{
    self as pb, admin_client::AdminClient, audit_client::AuditClient, cluster_client::ClusterClient,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::{Filter, Global};

pub struct Client {
    server: String,
    token: Option<String>,
    admin: AdminClient<Channel>,
    audit: AuditClient<Channel>,
    cluster: ClusterClient<Channel>,
    channel: Channel,
}

/// The one mapping from gRPC status to what a person should do.
fn explain(server: &str, s: Status) -> anyhow::Error {
    let msg = s.message();
    match s.code() {
        Code::Unavailable if msg.contains("transport") || msg.contains("connect") || msg.contains("tcp") || msg.contains("dns") => anyhow!(
            "cannot reach the control plane at {server} ({msg}); is `custos dev` or `custos controlplane` running? set --server or CUSTOS_SERVER"
        ),
        Code::Unauthenticated => anyhow!("{msg}"),
        Code::PermissionDenied => anyhow!("permission denied: {msg}"),
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::Unavailable | Code::DeadlineExceeded => anyhow!("{msg}"),
        _ => anyhow!("control plane error ({:?}): {msg}", s.code()),
    }
}

impl Client {
    pub async fn connect(g: &Global) -> Result<Client> {
        let token = match (&g.token, &g.token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(p)) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read token file {}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let server = if g.server.contains("://") {
            g.server.clone()
        } else if g.ca.is_some() {
            format!("https://{}", g.server)
        } else {
            format!("http://{}", g.server)
        };
        let mut ep = tonic::transport::Endpoint::from_shared(server.clone())
            .with_context(|| format!("--server {server:?} is not a valid address"))?
            .connect_timeout(std::time::Duration::from_secs(3));
        if let Some(ca) = &g.ca {
            let read = |p: &std::path::Path| {
                std::fs::read(p).with_context(|| format!("cannot read TLS file {}", p.display()))
            };
            let mut tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
            if let (Some(cert), Some(key)) = (&g.cert, &g.key) {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read(cert)?,
                    read(key)?,
                ));
            }
            ep = ep.tls_config(tls)?;
        }
        let ch = ep.connect_lazy();
        let max = 256 * 1024 * 1024;
        Ok(Client {
            server,
            token,
            admin: AdminClient::new(ch.clone()),
            audit: AuditClient::new(ch.clone()).max_decoding_message_size(max),
            cluster: ClusterClient::new(ch.clone()),
            channel: ch,
        })
    }

    /// The connection, for services without a wrapper here.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn req<T>(&self, body: T) -> Request<T> {
        let mut r = Request::new(body);
        if let Some(t) = &self.token {
            if let Ok(v) = format!("Bearer {t}").parse() {
                r.metadata_mut().insert("authorization", v);
            }
        }
        r
    }

    pub fn err(&self, s: Status) -> anyhow::Error {
        explain(&self.server, s)
    }

    pub async fn apply_policy(
        &mut self,
        text: String,
        description: String,
        expected_version: u64,
    ) -> Result<pb::PolicySet> {
        let r = self.req(pb::ApplyPolicyRequest {
            text,
            description,
            expected_version,
        });
        Ok(self
            .admin
            .apply_policy(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner())
    }

    pub async fn get_policy(&mut self, version: u64) -> Result<pb::PolicySet> {
        let r = self.req(pb::GetPolicyRequest { version });
        Ok(self
            .admin
            .get_policy(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner())
    }

    pub async fn put_connection(&mut self, c: pb::Connection) -> Result<pb::Connection> {
        let r = self.req(c);
        Ok(self
            .admin
            .put_connection(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner())
    }

    pub async fn get_connection(&mut self, name: String) -> Result<pb::Connection> {
        let r = self.req(pb::ConnectionName { name });
        Ok(self
            .admin
            .get_connection(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner())
    }

    pub async fn list_connections(&mut self) -> Result<Vec<pb::Connection>> {
        let r = self.req(pb::Empty {});
        Ok(self
            .admin
            .list_connections(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner()
            .connections)
    }

    pub async fn delete_connection(&mut self, name: String) -> Result<()> {
        let r = self.req(pb::ConnectionName { name });
        self.admin
            .delete_connection(r)
            .await
            .map_err(|s| self.err(s))?;
        Ok(())
    }

    pub async fn issue_token(
        &mut self,
        subject: String,
        groups: Vec<String>,
        ttl_seconds: u64,
        roles: Vec<String>,
    ) -> Result<pb::IssuedToken> {
        let r = self.req(pb::IssueTokenRequest {
            subject,
            groups,
            ttl_seconds,
            roles,
        });
        Ok(self
            .admin
            .issue_token(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner())
    }

    pub async fn revoke_token(&mut self, token_id: String) -> Result<()> {
        let r = self.req(pb::RevokeTokenRequest { token_id });
        self.admin.revoke_token(r).await.map_err(|s| self.err(s))?;
        Ok(())
    }

    pub async fn tail(
        &mut self,
        last: u32,
        follow: bool,
        mut each: impl FnMut(&pb::AuditRecord),
    ) -> Result<()> {
        let r = self.req(pb::TailRequest {
            after_seq: 0,
            last,
            follow,
        });
        let mut stream = self
            .audit
            .tail(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        while let Some(rec) = stream.message().await.map_err(|s| self.err(s))? {
            each(&rec);
        }
        Ok(())
    }

    pub async fn search(&mut self, f: &Filter, limit: u32) -> Result<Vec<pb::AuditRecord>> {
        let q = pb::AuditQuery {
            since_unix_nano: f
                .since
                .as_deref()
                .map(crate::parse_time)
                .transpose()?
                .unwrap_or(0),
            until_unix_nano: f
                .until
                .as_deref()
                .map(crate::parse_time)
                .transpose()?
                .unwrap_or(0),
            identity: f.identity.clone().unwrap_or_default(),
            connection: f.connection.clone().unwrap_or_default(),
            session_id: f.session.clone().unwrap_or_default(),
            kind: f.kind.clone().unwrap_or_default(),
            verdict: f.verdict.clone().unwrap_or_default(),
            after_seq: 0,
            limit,
        };
        let r = self.req(q);
        Ok(self
            .audit
            .query(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner()
            .records)
    }

    /// One page of an audit query.
    pub async fn query(&mut self, q: pb::AuditQuery) -> Result<pb::AuditRecords> {
        let r = self.req(q);
        Ok(self
            .audit
            .query(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner())
    }

    /// Records with seq > `after_seq`, unfiltered, in order.
    pub async fn search_after(
        &mut self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<pb::AuditRecord>> {
        let r = self.req(pb::AuditQuery {
            after_seq,
            limit,
            ..Default::default()
        });
        Ok(self
            .audit
            .query(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner()
            .records)
    }

    pub async fn verify(&mut self) -> Result<pb::VerifyReply> {
        let r = self.req(pb::VerifyRequest {});
        Ok(self
            .audit
            .verify(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner())
    }

    pub async fn status(&mut self) -> Result<pb::ClusterStatus> {
        let r = self.req(pb::Empty {});
        Ok(self
            .cluster
            .status(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner())
    }

    pub async fn add_node(
        &mut self,
        id: u64,
        addr: String,
        learner_only: bool,
    ) -> Result<pb::ClusterStatus> {
        let r = self.req(pb::AddNodeRequest {
            id,
            addr,
            learner_only,
        });
        Ok(self
            .cluster
            .add_node(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner())
    }

    pub async fn remove_node(&mut self, id: u64) -> Result<pb::ClusterStatus> {
        let r = self.req(pb::RemoveNodeRequest { id });
        Ok(self
            .cluster
            .remove_node(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner())
    }
}
