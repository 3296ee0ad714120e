//! Multi-process tests: real `sluice-learner` and `sluice-actor` processes on
//! loopback ports, checked through what crosses the wire (gRPC status, acks,
//! weights) and what the learner writes (metrics, checkpoints).

mod dp;
mod e2e;
mod faults;
mod harness;
mod weight_sync;
