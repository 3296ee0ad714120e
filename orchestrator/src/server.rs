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
    /// `dashboard`: the web dashboard's URL (without the token), when served.
    Listening {
        addr: String,
        store: String,
        jobs: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        dashboard: Option<String>,
    },
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
    /// Serve the web dashboard on this address (port 0: a free one).
    pub dashboard: Option<String>,
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
        let (dashboard, url) = match &opts.dashboard {
            Some(at) => {
                let (task, url) = start_dashboard(&orch, at, &opts).await?;
                (Some(task), Some(url))
            }
            None => (None, None),
        };
        let jobs = orch.job_count().await?;
        report(&ServerEvent::Listening { addr: addr.to_string(), store: orch.store().describe(), jobs, dashboard: url });
        tracing::info!(%addr, "orchestrator serving");
        let out = serve(orch, listener, opts.token.as_deref(), tls, sluice_core::signal::shutdown())
            .await
            .map_err(|e| Error::Io { what: "gRPC server".into(), source: std::io::Error::other(e) });
        if let Some(task) = dashboard {
            task.abort();
        }
        out
    })
}

/// Binds the dashboard's address and serves it on a task of its own (same
/// token and TLS files as the gRPC API); returns the task and the URL.
async fn start_dashboard(orch: &Arc<Orchestrator>, at: &str, opts: &Options) -> Result<(tokio::task::JoinHandle<()>, String)> {
    let tls = match &opts.tls {
        Some(f) => Some(sluice_dashboard::tls_config(&f.cert, &f.key).map_err(|e| Error::Invalid(e.to_string()))?),
        None => None,
    };
    let listener =
        tokio::net::TcpListener::bind(at).await.map_err(|e| Error::Io { what: format!("dashboard address {at}"), source: e })?;
    let addr = listener.local_addr().map_err(|e| Error::Io { what: "dashboard listener".into(), source: e })?;
    let url = format!("{}://{addr}/", if tls.is_some() { "https" } else { "http" });
    let dash = sluice_dashboard::Options { token: opts.token.clone(), tls: tls.is_some(), ..Default::default() };
    let router = sluice_dashboard::router(crate::dashboard::Jobs(orch.clone()), &dash);
    let task = tokio::spawn(async move {
        if let Err(e) = sluice_dashboard::serve(listener, router, tls, std::future::pending()).await {
            tracing::error!(error = %e, "dashboard stopped");
        }
    });
    tracing::info!(%url, "dashboard serving");
    Ok((task, url))
}
