//! Weight sync, the learner's side: a [`WeightPublisher`] makes each new
//! policy version available to actors (the actor's side is
//! `sluice_actor::sync::WeightSubscriber`). [`GrpcPublisher`] is the
//! `GetWeights` backend: the parameters as one safetensors blob (f32, or bf16
//! to halve the bytes) that the learner service streams in chunks, with the
//! delta from the version before (`rollout.delta_weights`) for actors that hold
//! it. [`BroadcastPublisher`] also pushes every version to the actors that
//! joined rank 0's weights broadcast group (`sluice_collective::weights`: the
//! TCP collective on CPU, NCCL on CUDA), keeping `GetWeights` for actors that
//! just joined or missed a version.

use std::sync::Arc;
use std::time::Instant;

use prost::bytes::Bytes;

use sluice_collective::weights::Root;
use sluice_core::kinds::Dtype;
use sluice_model::hf::Policy;
use tch::Tensor;

use crate::error::Result;
use crate::service::{Delta, Shared};

/// What one publication cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Publication {
    pub version: u64,
    pub bytes: usize,
    /// Size of the delta from the version before (0: none).
    pub delta_bytes: usize,
    pub seconds: f64,
    /// Actors the version was broadcast to, and how long that took (broadcast only).
    pub broadcast: Option<(usize, f64)>,
}

/// Where a learner puts each policy version.
pub trait WeightPublisher {
    /// Makes `policy`'s parameters available as `version`. A version is
    /// complete before it is announced.
    fn publish(&mut self, version: u64, policy: &Policy) -> Result<Publication>;
}

/// [`WeightPublisher`] for the learner service's `GetWeights` stream.
pub struct GrpcPublisher {
    shared: Arc<Shared>,
    dtype: Dtype,
    deltas: bool,
    /// The version published last and its blob (the base of the next delta).
    last: Option<(u64, Bytes)>,
}

impl GrpcPublisher {
    pub fn new(shared: Arc<Shared>, dtype: Dtype, deltas: bool) -> Self {
        GrpcPublisher { shared, dtype, deltas, last: None }
    }
}

impl WeightPublisher for GrpcPublisher {
    fn publish(&mut self, version: u64, policy: &Policy) -> Result<Publication> {
        self.publish_tensors(version, &policy.named_parameters())
    }
}

impl GrpcPublisher {
    /// [`WeightPublisher::publish`] of these named tensors (converted to the
    /// wire dtype here unless they already have it).
    fn publish_tensors(&mut self, version: u64, named: &[(String, Tensor)]) -> Result<Publication> {
        let t0 = Instant::now();
        let bytes = Bytes::from(sluice_model::weights::encode(named, sluice_model::device::kind(self.dtype))?);
        let n = bytes.len();
        let delta = match self.last.take().filter(|(v, _)| self.deltas && *v < version) {
            Some((base, old)) => match sluice_model::weights::delta(&old, &bytes) {
                // Rebuilding from a delta costs a pass over the held blob: only
                // worth it when it saves at least half the bytes.
                Ok(d) if d.len() * 2 < n => Some(Delta { base, version, bytes: Bytes::from(d) }),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "no weights delta for this version");
                    None
                }
            },
            None => None,
        };
        let delta_bytes = delta.as_ref().map_or(0, |d| d.bytes.len());
        if self.deltas {
            self.last = Some((version, bytes.clone()));
        }
        self.shared.publish(version, bytes, self.dtype, delta);
        Ok(Publication { version, bytes: n, delta_bytes, seconds: t0.elapsed().as_secs_f64(), broadcast: None })
    }
}

/// [`WeightPublisher`] of rank 0 with `rollout.weight_transport = "broadcast"`:
/// every version goes to the members of the weights broadcast group, in the
/// wire dtype, from the policy's device (NCCL when it is CUDA), after it was
/// made available for `GetWeights` (which joiners and members that missed a
/// version use). A failed broadcast is logged and training goes on: the
/// members rejoin at the next version and download this one.
pub struct BroadcastPublisher {
    grpc: GrpcPublisher,
    root: Root,
    dtype: Dtype,
}

impl BroadcastPublisher {
    /// `root` was bound with this learner's incarnation (`Shared::incarnation`).
    pub fn new(grpc: GrpcPublisher, root: Root, dtype: Dtype) -> Self {
        BroadcastPublisher { grpc, root, dtype }
    }
}

impl WeightPublisher for BroadcastPublisher {
    fn publish(&mut self, version: u64, policy: &Policy) -> Result<Publication> {
        // Converted to the wire dtype once, for the blob and the broadcast.
        let kind = sluice_model::device::kind(self.dtype);
        let params: Vec<(String, Tensor)> = tch::no_grad(|| {
            policy.named_parameters().into_iter().map(|(n, t)| (n, t.detach().to_kind(kind).contiguous())).collect()
        });
        let mut p = self.grpc.publish_tensors(version, &params)?;
        match self.root.broadcast(version, &params) {
            Ok(sent) => p.broadcast = Some((sent.members, sent.seconds)),
            Err(e) => tracing::warn!(version, error = %e, "weights broadcast failed; its members download this version"),
        }
        Ok(p)
    }
}
