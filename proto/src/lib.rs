//! The custos wire contract, generated from `proto/custos/v1/*.proto`.
//!
//! `events.proto` defines the `Event` every edge publishes and `controlplane.proto` the gRPC
//! services (Admin, Audit, EdgeSync, Cluster and the internal Raft transport). The `.proto` files
//! are the documentation of every field.
#![forbid(unsafe_code)]

/// Version 1 of the contract.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("custos.v1");
}

pub use v1::event::Payload;
pub use v1::Event;

/// The short, stable name of an event's payload kind, used in bus subjects and audit queries.
pub fn payload_kind(payload: Option<&Payload>) -> &'static str {
    match payload {
        Some(Payload::SessionStarted(_)) => "session_started",
        Some(Payload::SessionEnded(_)) => "session_ended",
        Some(Payload::CommandReceived(_)) => "command_received",
        Some(Payload::CommandCompleted(_)) => "command_completed",
        Some(Payload::ApprovalRequested(_)) => "approval_requested",
        Some(Payload::ApprovalDecided(_)) => "approval_decided",
        Some(Payload::PolicyApplied(_)) => "policy_applied",
        Some(Payload::ConnectionChanged(_)) => "connection_changed",
        Some(Payload::TokenIssued(_)) => "token_issued",
        Some(Payload::GrantUsed(_)) => "grant_used",
        Some(Payload::GrantRevoked(_)) => "grant_revoked",
        None => "unknown",
    }
}
