//! custos-core: the shared domain of the gateway, with no knowledge of any one protocol.
//!
//! ```text
//!  edge ──Event──▶ bus::EventBus ──▶ (in-process queue | NATS JetStream) ──▶ bus::EventSource ──▶ control plane
//!                                                                                   │
//!                                                     audit::chain (seq + SHA-256 link) ◀─┘
//! ```
//!
//! - [`events`]: building events (UUIDv7 ids, timestamps) and naming their bus subjects.
//! - [`bus`]: the one event-bus trait and its in-process and NATS JetStream implementations.
//! - [`audit`]: the canonical record's hash chain and its OCSF-shaped JSON form for SIEMs.
//! - [`mask`]: the masking engine (column rules, content detectors, strategies, streaming).
//! - [`policy`]: the Cedar schema and policy validation.
//! - [`authz`]: one Cedar decision per classified action, with `@approval` requirements.
//! - [`classify`]: SQL classification with the PostgreSQL parser (statement kind, tables, functions).
//! - [`token`]: custos-issued tokens (only their hashes are stored).
//! - [`secrets`]: AEAD encryption of connection credentials at rest.
//! - [`oidc`]: OIDC JWT verification against the identity provider's JWKS (file or URL).
//! - [`telemetry`]: the `[telemetry]` configuration: where spans go over OTLP, if anywhere.
//! - [`ws`]: a passive WebSocket frame reader for the transcripts of upgraded HTTP connections.
#![forbid(unsafe_code)]

pub mod audit;
pub mod authz;
pub mod bus;
pub mod classify;
pub mod events;
pub mod mask;
pub mod metrics;
pub mod oidc;
pub mod policy;
pub mod secrets;
pub mod telemetry;
pub mod token;
pub mod ws;

pub use custos_proto as proto;
