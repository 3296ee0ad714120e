//! Weight sync, the learner's side: a [`WeightPublisher`] makes each new
//! policy version available to actors (the actor's side is
//! `sluice_actor::sync::WeightSubscriber`). [`GrpcPublisher`] is the
//! `GetWeights` backend: the parameters as one safetensors blob (f32, or bf16
//! to halve the bytes) that the learner service streams in chunks. An NCCL
//! broadcast or a delta encoding is another implementation of the trait.

use std::sync::Arc;
use std::time::Instant;

use sluice_core::kinds::Dtype;
use sluice_model::hf::Policy;

use crate::error::Result;
use crate::service::Shared;

/// What one publication cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Publication {
    pub version: u64,
    pub bytes: usize,
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
}

impl GrpcPublisher {
    pub fn new(shared: Arc<Shared>, dtype: Dtype) -> Self {
        GrpcPublisher { shared, dtype }
    }
}

impl WeightPublisher for GrpcPublisher {
    fn publish(&mut self, version: u64, policy: &Policy) -> Result<Publication> {
        let t0 = Instant::now();
        let bytes = sluice_model::weights::encode(&policy.named_parameters(), sluice_model::device::kind(self.dtype))?;
        let n = bytes.len();
        self.shared.publish(version, bytes, self.dtype);
        Ok(Publication { version, bytes: n, seconds: t0.elapsed().as_secs_f64() })
    }
}
