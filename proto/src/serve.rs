//! The one way a sluice process serves gRPC and the flags that secure it.
//!
//! [`serve`] runs a service (already wrapped in [`crate::auth::Check`]) next to
//! gRPC health on a bound listener: TLS when configured, large HTTP/2 windows
//! and frames, `TCP_NODELAY` on accepted sockets (small replies — acks, scores —
//! must not wait for Nagle's algorithm), graceful shutdown. [`ServerSecurity`]
//! and [`ClientSecurity`] are the token and TLS flags every binary flattens
//! into its own (`#[command(flatten)]`), with the same names and variables.

use std::future::Future;
use std::path::PathBuf;

use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::{ClientTlsConfig, Server, ServerTlsConfig};

use crate::tls::ServerFiles;

/// Serves what `routes` adds to the server (one `add_service` call) plus gRPC
/// health, which reports `S` serving, until `shutdown` resolves.
pub async fn serve<S: NamedService>(
    listener: TcpListener,
    tls: Option<ServerTlsConfig>,
    shutdown: impl Future<Output = ()>,
    routes: impl FnOnce(&mut Server) -> Router,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<S>().await;
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let mut builder = builder.initial_stream_window_size(8 << 20).initial_connection_window_size(16 << 20).max_frame_size(1 << 20);
    routes(&mut builder)
        .add_service(health)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown)
        .await
}

/// A server's bearer token and TLS files.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerSecurity {
    /// Bearer token every call of this server's sluice service must carry
    /// (gRPC health stays open); none: no check.
    #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Serve TLS: certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "SLUICE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Serve TLS: private key (PEM).
    #[arg(long, env = "SLUICE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

impl ServerSecurity {
    /// Both TLS files or neither (one alone is named as the mistake it is).
    pub fn tls(&self) -> Result<Option<ServerFiles>, String> {
        ServerFiles::from_options(self.tls_cert.clone(), self.tls_key.clone())
    }
}

/// A client's bearer token and the CA it trusts.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientSecurity {
    /// Bearer token to send, when the servers require one.
    #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to trust for `https://` endpoints.
    #[arg(long, env = "SLUICE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl ClientSecurity {
    pub fn tls(&self) -> Result<Option<ClientTlsConfig>, String> {
        self.tls_ca.as_deref().map(crate::tls::client_config).transpose()
    }
}
