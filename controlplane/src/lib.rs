//! custos-controlplane: the Raft-replicated control plane that keeps policies, connections,
//! tokens and the canonical audit log.
//!
//! ```text
//!   custos CLI / edges ──gRPC──▶ node (any) ──forward──▶ leader ──Raft (tonic)──▶ followers
//!                                                         │
//!   NATS custos.events.> ──durable pull (leader only)─────┘ commit batch ─▶ ack
//!                                                         │
//!   NATS custos.audit.>  ◀──OCSF JSON (leader only)───────┘ after commit
//! ```
//!
//! - [`types`]: the Raft type config and the replicated [`types::Command`]s.
//! - [`store`]: RocksDB log store and state machine (the canonical audit log lives here).
//! - [`snapshot`]: Raft snapshots as framed, checksummed files, streamed in bounded memory.
//! - [`network`]: openraft RPCs over tonic.
//! - [`node`]: wiring one node together; [`ControlPlane`] is the handle.
//! - `grpc`, `ingest`, `siem`: the services and the leader-only tasks.
#![forbid(unsafe_code)]

pub mod approvals;
mod approvals_svc;
pub mod config;
mod grpc;
mod ingest;
pub mod network;
pub mod node;
pub mod notify;
pub mod notify_task;
mod siem;
pub mod slack;
pub mod snapshot;
pub mod store;
pub mod tls;
pub mod types;

pub use config::ControlPlaneConfig;
pub use node::{ControlPlane, EventInput, StartError, WriteError};
pub use siem::AUDIT_SUBJECT_PREFIX;
