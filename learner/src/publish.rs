//! Weight sync, the learner's side: a [`WeightPublisher`] makes each new
//! policy version available to actors (the actor's side is
//! `sluice_actor::sync::WeightSubscriber`). [`GrpcPublisher`] is the
//! `GetWeights` backend: the parameters as one safetensors blob (f32, or bf16
//! to halve the bytes) that the learner service streams in chunks, with the
//! delta from the version before (`rollout.delta_weights`) for actors that hold
//! it. An NCCL broadcast is another implementation of the trait.

use std::sync::Arc;
use std::time::Instant;

use prost::bytes::Bytes;

use sluice_core::kinds::Dtype;
use sluice_model::hf::Policy;

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
        let t0 = Instant::now();
        let bytes = Bytes::from(sluice_model::weights::encode(&policy.named_parameters(), sluice_model::device::kind(self.dtype))?);
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
        Ok(Publication { version, bytes: n, delta_bytes, seconds: t0.elapsed().as_secs_f64() })
    }
}
