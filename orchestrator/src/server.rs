//! The orchestrator process: open the store, restore jobs, serve
//! `sluice.v1.Orchestrator` and gRPC health, and expire leases.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sluice_proto::tls::ServerFiles;
use sluice_proto::v1::orchestrator_server::OrchestratorServer;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ServerTlsConfig;

use crate::error::{Error, Result};
use crate::service::{now_ms, Orchestrator, OrchestratorService};
use crate::store::Store;

/// What the process prints as JSON lines.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ServerEvent {
    Listening { addr: String, store: String, jobs: usize },
}

/// Serves until `shutdown` resolves, sweeping expired leases every quarter lease.
pub async fn serve(
    orch: Arc<Orchestrator>,
    listener: tokio::net::TcpListener,
    token: Option<&str>,
    tls: Option<ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::result::Result<(), tonic::transport::Error> {
    let sweeper = {
        let orch = orch.clone();
        let every = Duration::from_millis((orch.lease_ms / 4).clamp(50, 5000));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = orch.sweep(now_ms()).await {
                    tracing::warn!(error = %e, "lease sweep failed");
                }
            }
        })
    };
    let svc = InterceptedService::new(
        OrchestratorServer::new(OrchestratorService::new(orch))
            .max_decoding_message_size(sluice_core::limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(sluice_core::limits::MAX_MESSAGE_BYTES),
        sluice_proto::auth::Check::new(token),
    );
    let out =
        sluice_proto::serve::serve::<OrchestratorServer<OrchestratorService>>(listener, tls, shutdown, |s| s.add_service(svc)).await;
    sweeper.abort();
    out
}

/// Options of the orchestrator process.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: String,
    /// `memory` or a `redis://` URL.
    pub store: String,
    /// Prefix of every Redis key (one per orchestrator sharing a Redis).
    pub store_prefix: String,
    pub lease: Duration,
    pub token: Option<String>,
    pub tls: Option<ServerFiles>,
}

/// Runs the orchestrator until Ctrl-C / SIGTERM.
pub fn run(opts: Options, report: impl Fn(&ServerEvent)) -> Result<()> {
    let tls = opts.tls.as_ref().map(ServerFiles::config).transpose().map_err(Error::Invalid)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Io { what: "async runtime".into(), source: e })?;
    rt.block_on(async {
        let store = Store::open_prefixed(&opts.store, &opts.store_prefix).await?;
        let orch = Arc::new(Orchestrator::open(store, opts.lease).await?);
        let listener = tokio::net::TcpListener::bind(&opts.listen)
            .await
            .map_err(|e| Error::Io { what: format!("listen address {}", opts.listen), source: e })?;
        let addr = listener.local_addr().map_err(|e| Error::Io { what: "listener".into(), source: e })?;
        report(&ServerEvent::Listening { addr: addr.to_string(), store: orch.store().describe(), jobs: orch.job_count().await? });
        tracing::info!(%addr, "orchestrator serving");
        serve(orch, listener, opts.token.as_deref(), tls, sluice_core::signal::shutdown())
            .await
            .map_err(|e| Error::Io { what: "gRPC server".into(), source: std::io::Error::other(e) })
    })
}
