//! `sluice-proto`: the `sluice.v1` wire types and gRPC services.
//!
//! The `.proto` files next to this crate are the source of truth; this crate
//! only includes what `build.rs` generates from them.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("sluice.v1");
}

/// Largest gRPC message any sluice server or client decodes (a backstop; the
/// servers apply their own, smaller, per-message limits with clear errors).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
