//! `strata-rpc`: framed request/response over TCP, used by the management service and the data
//! plane, plus the wire messages of every service (so a client never depends on a server crate).
//!
//! A connection starts with a handshake (`Hello` → `HelloAck` or a refusal naming the reason:
//! wrong cluster, unsupported protocol, wrong service). Then each request carries a request id
//! and a timeout; the server runs requests concurrently (up to `inflight_requests_max` per
//! connection) and answers in any order; the client matches answers by id. A frame is a fixed
//! 32-byte header, a postcard message header and a raw payload for bulk data (`frame.rs`).
//!
//! Invariants and limits:
//! - A malformed, oversized or corrupt frame closes only its own connection (logged); the
//!   server keeps serving everyone else and never panics on peer input.
//! - Message headers are at most [`frame::HEADER_BYTES_MAX`], payloads at most
//!   [`frame::PAYLOAD_BYTES_MAX`]; a connection has at most `inflight_requests_max` requests in
//!   flight (further requests wait for a slot, which back-pressures the peer).
//! - Every frame format carries a version byte (v1).

pub mod buffer_pool;
pub mod huge_buffers;
mod byte_vec;
pub mod capability;
mod client;
pub mod frame;
pub mod engine_msg;
pub mod kv_msg;
pub mod mgmt_client;
pub mod mgmt_msg;
pub mod records;
mod server;

pub use client::{ClientConfig, RpcClient, RpcPool};
pub use server::{serve, Handler, RequestCtx, ServerConfig};

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Version of the message protocol carried in the handshake.
pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ServiceKind {
    Mgmt,
    Engine,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub service: ServiceKind,
    /// The cluster the client expects; `None` accepts any (first contact).
    pub cluster: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HelloAck {
    pub protocol: u32,
    pub cluster: String,
}

/// Stable error codes a service returns; clients branch on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    Internal,
    InvalidArgument,
    NotFound,
    AlreadyExists,
    /// The request carried an older pool map; `detail` holds the newer one.
    StaleMap,
    /// This node is not the management leader; `message` names the leader if known.
    NotLeader,
    Unavailable,
    Corrupt,
    Timeout,
    Busy,
    NoSpace,
    PermissionDenied,
    Conflict,
    Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct RemoteError {
    pub code: ErrorCode,
    pub message: String,
    /// Service-defined postcard payload (e.g. the newer pool map for `StaleMap`).
    pub detail: Option<Vec<u8>>,
}

impl RemoteError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> RemoteError {
        RemoteError { code, message: message.into(), detail: None }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("handshake with {addr} refused: {reason}")]
    Handshake { addr: String, reason: String },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("connection to {0} closed")]
    ConnectionClosed(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("message does not decode: {0}")]
    Decode(String),
    #[error("request too large: {0}")]
    TooLarge(String),
}

impl RpcError {
    /// Worth retrying on another connection or after a refresh.
    pub fn is_transient(&self) -> bool {
        match self {
            RpcError::Connect { .. } | RpcError::Timeout(_) | RpcError::ConnectionClosed(_) => true,
            RpcError::Remote(r) => matches!(r.code, ErrorCode::Unavailable | ErrorCode::Busy | ErrorCode::NotLeader | ErrorCode::Timeout),
            _ => false,
        }
    }
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, RpcError> {
    postcard::to_allocvec(v).map_err(|e| RpcError::Protocol(format!("encode: {e}")))
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, RpcError> {
    postcard::from_bytes(b).map_err(|e| RpcError::Decode(e.to_string()))
}
