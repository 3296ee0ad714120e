//! `sluice-actor`: the process that turns the current policy into rollouts.
//!
//! * [`sync`] — downloads a policy version from a learner (chunked, resumable)
//!   and swaps it in only once it is complete.
//! * [`actor`] — the loop: keep weights fresh enough for `max_staleness`,
//!   sample groups, score them with the task verifier, stream them to a learner.
//! * [`link`] — the connection to a learner: channel, acks, backoff.
//! * [`reward`] — scoring through the reward server.

pub mod actor;
pub mod error;
pub mod link;
pub mod reward;
pub mod sync;

pub use error::{Error, Result};
