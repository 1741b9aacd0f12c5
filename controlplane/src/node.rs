//! One control-plane node: the Raft instance, its store, the gRPC server, and the leader-only
//! tasks (event ingest and the SIEM republisher).
//!
//! ```text
//!             ┌──────────── ControlPlane ────────────┐
//!  gRPC ──────▶ services ──write()──▶ Raft (leader) ──▶ StateMachine ──▶ RocksDB
//!             │     ▲  (follower: Raft.Forward to leader)      │ audit_tx / changes_tx
//!  bus ───────▶ ingest (leader only) ──write(Ingest)──┘       ▼
//!             │                                   siem republisher (leader only) ──▶ NATS custos.audit.>
//!             └──────────────────────────────────────┘
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use custos_core::bus::{InProcSource, NatsBus};
use custos_core::secrets::SecretKey;
use custos_proto::v1::RaftPayload;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use crate::config::{BusKind, ControlPlaneConfig};
use crate::network::{self, Network};
use crate::store::{self, Store};
use crate::tls::ClientTls;
use crate::types::{Command, IngestItem, NodeId, Raft, Response};

/// Why a write did not commit. Messages name the cause and the next step.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("no control-plane leader is elected yet (a majority of nodes must be up and connected); retry shortly and check `custos cluster status`")]
    NoLeader,
    #[error("cannot reach the leader (node {leader} at {addr}) to forward the write: {detail}; retry, or check that node")]
    Forward {
        leader: NodeId,
        addr: String,
        detail: String,
    },
    #[error("raft write failed: {0}")]
    Raft(String),
}

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the data directory {path}: {detail} (is another node using it?)")]
    Store { path: String, detail: String },
    #[error("cannot listen on {addr}: {source}; choose a free [node] listen address")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Secret(#[from] custos_core::secrets::SecretError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Bus(#[from] custos_core::bus::BusError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("approval notifications: {0}")]
    Notify(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where the leader's ingest reads events from.
pub enum EventInput {
    /// No ingest on this node.
    None,
    /// `custos dev`: the in-process bus.
    InProc(InProcSource),
    /// Production: a durable pull consumer on NATS JetStream.
    Nats(Box<NatsBus>),
}

pub(crate) struct Inner {
    pub id: NodeId,
    pub raft: Raft,
    pub store: Arc<Store>,
    pub config: ControlPlaneConfig,
    pub secret_key: SecretKey,
    pub admin_token_hash: String,
    pub cluster_secret: String,
    pub advertise: String,
    pub client_tls: Option<ClientTls>,
    pub metrics: Arc<custos_core::metrics::Metrics>,
    /// Events the bus holds for the ingest consumer as of the leader's last fetch; -1 when this
    /// node is not ingesting or the bus cannot tell.
    pub consumer_backlog: std::sync::atomic::AtomicI64,
}

/// A running control-plane node.
pub struct ControlPlane {
    pub(crate) inner: Arc<Inner>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn read_or_create_secret(path: &std::path::Path) -> Result<String, std::io::Error> {
    if !path.exists() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        custos_core::secrets::write_private(path, custos_core::token::generate().token.as_bytes())?;
    }
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

impl ControlPlane {
    /// Open the store, start Raft and the gRPC server, join or initialize the cluster.
    pub async fn start(
        config: ControlPlaneConfig,
        input: EventInput,
    ) -> Result<ControlPlane, StartError> {
        std::fs::create_dir_all(&config.node.data_dir)?;
        let secret_key = SecretKey::load_or_create(
            &config.data_file(&config.node.secret_key_file, "secret.key"),
        )?;
        let cluster_secret = read_or_create_secret(
            &config.data_file(&config.node.cluster_secret_file, "cluster.secret"),
        )?;
        let admin_token =
            read_or_create_secret(&config.data_file(&config.node.admin_token_file, "admin.token"))?;
        let client_tls = config.tls.client()?;
        let server_tls = config.tls.server()?;

        let db_dir = config.node.data_dir.join("db");
        // On a blocking thread: opening may finish an interrupted snapshot install.
        let open_dir = db_dir.clone();
        let (store, log_store, state_machine) =
            tokio::task::spawn_blocking(move || store::open(&open_dir))
                .await
                .map_err(|e| StartError::Store {
                    path: db_dir.display().to_string(),
                    detail: e.to_string(),
                })?
                .map_err(|e| StartError::Store {
                    path: db_dir.display().to_string(),
                    detail: e.to_string(),
                })?;

        let listener = tokio::net::TcpListener::bind(&config.node.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: config.node.listen.clone(),
                source,
            })?;
        let addr = listener.local_addr()?;
        let advertise = config
            .node
            .advertise
            .clone()
            .unwrap_or_else(|| addr.to_string());

        let raft_config = openraft::Config {
            cluster_name: "custos".into(),
            heartbeat_interval: config.cluster.heartbeat_ms,
            election_timeout_min: config.cluster.election_timeout_min_ms,
            election_timeout_max: config.cluster.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.cluster.snapshot_every),
            max_in_snapshot_log_to_keep: config.cluster.keep_logs,
            // openraft gives each AppendEntries the heartbeat interval to complete; with ingest
            // entries of at most MAX_ENTRY_BYTES, a follower catching up gets at most 2 MiB per
            // request (64 entries of 2000 events each once kept a restarted follower from ever
            // catching up: every request timed out).
            max_payload_entries: 8,
            // openraft's default is 200 ms per chunk, and one late chunk restarts the whole
            // transfer: a follower that needed a large snapshot under load never got one.
            install_snapshot_timeout: config.cluster.snapshot_chunk_timeout_ms,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let net = Network {
            cluster_secret: cluster_secret.clone(),
            tls: client_tls.clone(),
        };
        let raft = Raft::new(
            config.node.id,
            Arc::new(raft_config),
            net,
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;

        let inner = Arc::new(Inner {
            id: config.node.id,
            raft: raft.clone(),
            store,
            admin_token_hash: custos_core::token::hash(&admin_token),
            cluster_secret,
            secret_key,
            advertise: advertise.clone(),
            client_tls,
            config: config.clone(),
            metrics: {
                let m = custos_core::metrics::Metrics::new();
                m.describe("custos_ingest_events_total", "counter", "Bus events committed by this node as leader: appended, duplicate (dropped) or parked (malformed).");
                m.describe(
                    "custos_siem_records_total",
                    "counter",
                    "Records the leader republished to the SIEM stream: published (the batch ack confirmed them all) or resent (re-sent one by one after the stream did not store a whole batch).",
                );
                m.describe(
                    "custos_ingest_bus_messages_total",
                    "counter",
                    "Bus messages the leader fetched; events fetched divided by this is the publishers' mean batch size.",
                );
                m.describe(
                    "custos_ingest_commit_failures_total",
                    "counter",
                    "Ingest batches whose Raft commit failed (they are redelivered).",
                );
                m
            },
            consumer_backlog: std::sync::atomic::AtomicI64::new(-1),
        });

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(crate::grpc::serve(
            inner.clone(),
            listener,
            server_tls,
            shutdown_rx.clone(),
        )));

        if let Some(addr) = config.metrics.listen.as_ref().filter(|a| !a.is_empty()) {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Listen {
                    addr: addr.clone(),
                    source,
                })?;
            let i = inner.clone();
            tasks.push(tokio::spawn(custos_core::metrics::serve(
                l,
                Arc::new(move || render_metrics(&i)),
                shutdown_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(crate::approvals_svc::sweep(
            inner.clone(),
            shutdown_rx.clone(),
        )));
        let mut notifiers: Vec<Arc<dyn crate::notify::Notifier>> = Vec::new();
        if let Some(slack) = &config.slack {
            let n = crate::slack::SlackNotifier::new(slack)
                .map_err(|e| StartError::Notify(format!("[slack] {e}")))?;
            notifiers.push(Arc::new(n));
            if !slack.listen.is_empty() {
                let tls = slack
                    .server_tls()
                    .map_err(|e| StartError::Notify(format!("[slack] {e}")))?;
                let l = tokio::net::TcpListener::bind(&slack.listen)
                    .await
                    .map_err(|source| StartError::Listen {
                        addr: slack.listen.clone(),
                        source,
                    })?;
                tasks.push(tokio::spawn(crate::slack::serve_interactions(
                    l,
                    tls,
                    Arc::new(slack.clone()),
                    Arc::new(crate::notify_task::ControlPlaneSink(inner.clone())),
                    shutdown_rx.clone(),
                )));
            }
        }
        for w in &config.webhooks {
            let n = w
                .notifier()
                .map_err(|e| StartError::Notify(format!("[[webhooks]] {e}")))?;
            notifiers.push(Arc::new(n));
        }
        tasks.push(tokio::spawn(crate::notify_task::run(
            inner.clone(),
            notifiers,
            shutdown_rx.clone(),
        )));

        // A new cluster: every initial member proposes the same membership; openraft accepts the
        // first and the others are no-ops.
        let members = config.initial_members();
        if !members.is_empty() {
            let nodes: BTreeMap<NodeId, BasicNode> = members
                .into_iter()
                .map(|(id, a)| {
                    (
                        id,
                        BasicNode::new(if id == config.node.id {
                            advertise.clone()
                        } else {
                            a
                        }),
                    )
                })
                .collect();
            if let Err(e) = raft.initialize(nodes).await {
                tracing::debug!(error = %e, "initialize skipped (already initialized)");
            }
        }

        match (config.bus.kind, input) {
            (BusKind::None, _) | (_, EventInput::None) => {}
            (_, EventInput::InProc(src)) => {
                let src = Arc::new(Mutex::new(src));
                tasks.push(tokio::spawn(crate::ingest::run(
                    inner.clone(),
                    crate::ingest::Input::InProc(src),
                    shutdown_rx.clone(),
                )));
            }
            (_, EventInput::Nats(bus)) => {
                tasks.push(tokio::spawn(crate::ingest::run(
                    inner.clone(),
                    crate::ingest::Input::Nats(bus.clone()),
                    shutdown_rx.clone(),
                )));
                if config.siem.enabled {
                    tasks.push(tokio::spawn(crate::siem::run(
                        inner.clone(),
                        *bus,
                        shutdown_rx.clone(),
                    )));
                }
            }
        }
        tracing::info!(node = config.node.id, %addr, "control plane node started");
        Ok(ControlPlane {
            inner,
            addr,
            shutdown,
            tasks,
        })
    }

    /// The bound gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// A renderer of this node's metrics page (for a process that serves several).
    pub fn metrics_renderer(&self) -> Arc<dyn Fn() -> String + Send + Sync> {
        let i = self.inner.clone();
        Arc::new(move || render_metrics(&i))
    }

    /// Commit a command through the leader (forwarding when this node is a follower).
    pub async fn write(&self, cmd: Command) -> Result<Response, WriteError> {
        self.inner.write(cmd).await
    }

    /// Stop serving, stop background tasks, and shut Raft down.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        let _ = self.inner.raft.shutdown().await;
    }
}

impl Inner {
    pub(crate) fn is_leader(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    pub(crate) fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, node.addr))
    }

    /// Commit locally if leader, else forward to the leader; retry while an election settles.
    pub(crate) async fn write(&self, cmd: Command) -> Result<Response, WriteError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let last_err = match self.raft.client_write(cmd.clone()).await {
                Ok(resp) => return Ok(resp.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    match (f.leader_id, f.leader_node) {
                        (Some(leader), Some(node)) if leader != self.id => {
                            match self.forward(&node.addr, &cmd).await {
                                Ok(r) => return Ok(r),
                                Err(detail) => WriteError::Forward {
                                    leader,
                                    addr: node.addr,
                                    detail,
                                },
                            }
                        }
                        _ => WriteError::NoLeader,
                    }
                }
                Err(e) => WriteError::Raft(e.to_string()),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(last_err);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn forward(&self, addr: &str, cmd: &Command) -> Result<Response, String> {
        let ch = network::channel(addr, self.client_tls.as_ref()).map_err(|e| e.to_string())?;
        let mut client = custos_proto::v1::raft_client::RaftClient::new(ch)
            .max_decoding_message_size(network::MAX_MESSAGE)
            .max_encoding_message_size(network::MAX_MESSAGE);
        let data = bincode::serialize(cmd).map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(RaftPayload {
            data,
            chunk: Vec::new(),
        });
        req.set_timeout(Duration::from_secs(10));
        if let Ok(v) = format!("Bearer {}", self.cluster_secret).parse() {
            req.metadata_mut().insert("authorization", v);
        }
        let reply = client
            .forward(req)
            .await
            .map_err(|s| s.message().to_string())?;
        let r: Result<Response, String> =
            bincode::deserialize(&reply.into_inner().data).map_err(|e| e.to_string())?;
        r
    }

    /// Add a node as a learner, wait for it to catch up, then make it a voter.
    pub(crate) async fn add_node(
        &self,
        id: NodeId,
        addr: String,
        learner_only: bool,
    ) -> Result<(), String> {
        self.raft
            .add_learner(id, BasicNode::new(addr), true)
            .await
            .map_err(|e| e.to_string())?;
        if learner_only {
            return Ok(());
        }
        let mut voters = self.voters();
        voters.insert(id);
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The current voter ids, as this node sees the membership.
    fn voters(&self) -> BTreeSet<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    pub(crate) async fn remove_node(&self, id: NodeId) -> Result<(), String> {
        let mut voters = self.voters();
        if !voters.remove(&id) {
            return Err(format!("node {id} is not a voter"));
        }
        if voters.is_empty() {
            return Err("cannot remove the last voter".into());
        }
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Ingest items from raw deliveries.
pub(crate) fn items(deliveries: &[custos_core::bus::Delivery]) -> Vec<IngestItem> {
    deliveries
        .iter()
        .map(|d| IngestItem {
            data: d.data.to_vec(),
            bus_seq: d.seq,
        })
        .collect()
}

/// The node's metrics page: Raft state, the audit head, approvals and ingest counters.
pub(crate) fn render_metrics(inner: &Inner) -> String {
    let m = inner.raft.metrics().borrow().clone();
    let role = format!("{:?}", m.state).to_lowercase();
    let last_log = m.last_log_index.unwrap_or(0) as f64;
    let applied = m.last_applied.map(|l| l.index).unwrap_or(0) as f64;
    let leader = m.current_leader.unwrap_or(0) as f64;
    let node = inner.id.to_string();
    let n = || vec![("node", node.clone())];
    let mut role_labels = n();
    role_labels.push(("role", role));
    let backlog = inner
        .consumer_backlog
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut gauges = vec![
        ("custos_raft_role", role_labels, 1.0),
        (
            "custos_raft_is_leader",
            n(),
            if inner.is_leader() { 1.0 } else { 0.0 },
        ),
        ("custos_raft_leader_id", n(), leader),
        ("custos_raft_term", n(), m.current_term as f64),
        ("custos_raft_last_log_index", n(), last_log),
        ("custos_raft_last_applied_index", n(), applied),
        ("custos_raft_apply_lag", n(), (last_log - applied).max(0.0)),
        (
            "custos_audit_head_seq",
            n(),
            inner.store.audit_head().seq as f64,
        ),
        (
            "custos_audit_parked",
            n(),
            inner.store.parked_count() as f64,
        ),
        (
            "custos_approvals_pending",
            n(),
            inner.store.open_approvals().len() as f64,
        ),
    ];
    if backlog >= 0 {
        gauges.push(("custos_bus_consumer_pending", n(), backlog as f64));
    }
    inner.metrics.render(&gauges)
}
