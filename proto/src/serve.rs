//! The one way a sluice process serves and calls gRPC, and the flags that secure it.
//!
//! [`serve`] runs a service (already wrapped in [`crate::auth::Check`]) next to
//! gRPC health on a bound listener: TLS when configured, large HTTP/2 windows
//! and frames, `TCP_NODELAY` on accepted sockets (small replies — acks, scores —
//! must not wait for Nagle's algorithm), graceful shutdown. [`ServerSecurity`]
//! and [`ClientSecurity`] are the token and TLS flags every binary flattens
//! into its own (`#[command(flatten)]`), with the same names and variables.
//! Clients call through [`Channel`], whose calls are CLIENT spans.

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
    let mut builder = builder
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .trace_fn(rpc_span);
    routes(&mut builder)
        .add_service(health)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown)
        .await
}

/// The SERVER span of one served call, named `package.Service/Method` per the
/// OpenTelemetry RPC conventions, child of the caller's span when the request
/// carries `traceparent`. Health checks get none.
fn rpc_span(req: &http::Request<()>) -> tracing::Span {
    if req.uri().path().starts_with("/grpc.health") {
        return tracing::Span::none();
    }
    let span = call_span(req.uri().path(), "server");
    sluice_core::telemetry::set_parent(&span, &Headers(req.headers()));
    span
}

/// The span of one call to `/package.Service/Method` (`kind`: server or
/// client): named `package.Service/Method` with the `rpc.*` attributes of
/// the OpenTelemetry RPC conventions. Other paths get none.
fn call_span(path: &str, kind: &'static str) -> tracing::Span {
    let path = path.trim_start_matches('/');
    let Some((service, method)) = path.split_once('/') else { return tracing::Span::none() };
    tracing::info_span!(
        "rpc",
        otel.name = %path,
        otel.kind = kind,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    )
}

/// Every sluice client's channel: a [`Traced`] tonic channel.
pub type Channel = Traced<tonic::transport::Channel>;

/// A gRPC channel whose every call is a CLIENT span named
/// `package.Service/Method` (the OpenTelemetry RPC conventions), child of the
/// caller's span, and carries that span's W3C `traceparent`, so the server's
/// SERVER span is its child. The span lasts until the response headers arrive.
#[derive(Debug, Clone)]
pub struct Traced<S>(pub S);

impl<S, B> tonic::codegen::Service<http::Request<B>> for Traced<S>
where
    S: tonic::codegen::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        use tracing::Instrument;
        let span = call_span(req.uri().path(), "client");
        span.in_scope(|| sluice_core::telemetry::inject(&mut HeadersMut(req.headers_mut())));
        self.0.call(req).instrument(span)
    }
}

/// A request's HTTP headers as an OpenTelemetry propagation carrier (write).
struct HeadersMut<'a>(&'a mut http::HeaderMap);

impl opentelemetry::propagation::Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value)) {
            self.0.insert(k, v);
        }
    }
}

/// A request's HTTP headers as an OpenTelemetry propagation carrier (read).
struct Headers<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
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
