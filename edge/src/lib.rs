//! custos-edge: the data-path side of custos.
//!
//! This release holds the piece every protocol listener builds on: [`watch`], which follows the
//! control plane's EdgeSync stream (a snapshot, then every change) and keeps the current
//! configuration in a `tokio::sync::watch` value. The hot path reads the snapshot (an `Arc`) and
//! never calls the network. The protocol listeners (PostgreSQL first) plug in next.
//!
//! ```text
//!  control plane ──EdgeSync.Watch (gRPC stream)──▶ watch::run ──▶ watch::Receiver<Arc<EdgeConfig>>
//!                    reconnect with backoff; keep the last config while the control plane is away
//! ```
#![forbid(unsafe_code)]

pub mod watch;
