//! `sluice-reward-server`: scores rollouts for actors.
//!
//! * extrinsic reward: the task verifiers of `sluice_core::tasks`;
//! * intrinsic reward (ONI): [`captions`] are normalised and hashed; labelled ones
//!   are answered from the [`labels`] store, unlabelled ones go on the bounded
//!   newest-first [`queue`], which an [`annotator`] drains in the background.
//!   Scoring never waits for the annotator.
//! * reward models behind one trait, [`intrinsic::Intrinsic`]: retrieval (label
//!   lookup), classification ([`classifier`] predicts labels), ranking
//!   ([`ranker`], Bradley-Terry on pairwise preferences).
//! * [`service`]: the `sluice.v1.Reward` gRPC service; [`server`]: the process.

pub mod annotator;
pub mod captions;
pub mod classifier;
pub mod error;
pub mod intrinsic;
pub mod labels;
pub mod llm;
pub mod queue;
pub mod ranker;
pub mod server;
pub mod service;

pub use error::{Error, Result};
