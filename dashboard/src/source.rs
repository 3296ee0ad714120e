//! Where the dashboard reads jobs and events ([`Source`]), and its errors.

use std::future::Future;

use serde_json::Value;

/// What can go wrong in the dashboard.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not found: {0}")]
    NotFound(String),
    /// The source cannot answer now (e.g. its store is down); try again later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("TLS: {0}")]
    Tls(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A job's events from some sequence number on.
#[derive(Debug, Default)]
pub struct Events {
    /// `(seq, JSON line)`, in order.
    pub events: Vec<(u64, String)>,
    /// The job has ended: nothing follows these.
    pub finished: bool,
}

/// Where the dashboard reads jobs and their events.
pub trait Source: Send + Sync + 'static {
    /// Job summaries, newest first: JSON objects with at least `id`, `name`
    /// and `state` (`progress`, `created_unix_ms`, `message` when known).
    fn jobs(&self) -> impl Future<Output = Result<Vec<Value>>> + Send;
    /// One job's summary, as in [`Source::jobs`].
    fn job(&self, id: &str) -> impl Future<Output = Result<Value>> + Send;
    /// The job's events with `seq >= from`.
    fn events(&self, id: &str, from: u64) -> impl Future<Output = Result<Events>> + Send;
}

