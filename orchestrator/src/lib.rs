//! `sluice-orchestrator`: jobs, worker leases and the dispatch of work.
//!
//! - [`driver`]: one job's work items, rounds, budgets and exact accounting (no I/O).
//! - [`store`]: where the state lives — process memory or Redis.
//! - [`service`]: the `sluice.v1.Orchestrator` gRPC service over the drivers.
//! - [`server`]: the process (store, service, lease sweeps, dashboard).
//! - [`dashboard`]: jobs and events as the web dashboard's source (`sluice-dashboard`).
//!
//! The client side, for workers and the CLI, is `sluice-worker`.

pub mod dashboard;
pub mod driver;
pub mod error;
pub mod server;
pub mod service;
pub mod store;

pub use error::{Error, Result};
