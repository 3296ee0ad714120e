//! The web dashboard: a jobs page and a page per job whose plots follow the
//! job's events live, over any [`Source`] of jobs and events: the
//! orchestrator's state (`sluice-orchestrator --dashboard ADDR`) or run
//! directories' `metrics.jsonl` ([`RunDirs`], `sluice dashboard RUN_DIR`).
//!
//! * Pages are static HTML and JavaScript compiled into the binary
//!   ([`assets`]); the plots are drawn in the browser by uPlot, vendored
//!   under `assets/vendor` (no CDN: it works offline).
//! * `GET /api/jobs`, `GET /api/jobs/{id}`: job summaries as JSON.
//! * `GET /api/jobs/{id}/events`: the job's events as server-sent events
//!   (`id:` the event's sequence number, `data:` its JSON line, the form
//!   `sluice logs --json` prints), followed live; an `end` event closes a
//!   finished job's stream. A reconnecting browser resumes after
//!   `Last-Event-ID`.
//!
//! Read-only. With a token every page and call needs it ([`auth`]).

pub mod assets;
pub mod auth;
mod run_dirs;
mod source;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

pub use run_dirs::RunDirs;
pub use source::{Error, Events, Result, Source};

/// How the dashboard is served.
#[derive(Debug, Clone)]
pub struct Options {
    /// Every page and API call needs this token (none: open).
    pub token: Option<String>,
    /// Served over TLS: the cookie is marked `Secure`.
    pub tls: bool,
    /// How often a live event stream asks the source for new events.
    pub poll: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options { token: None, tls: false, poll: Duration::from_millis(250) }
    }
}

struct App<S> {
    source: S,
    auth: auth::Auth,
    poll: Duration,
}

/// The dashboard's routes over `source`.
pub fn router<S: Source>(source: S, opts: &Options) -> Router {
    let app = Arc::new(App { source, auth: auth::Auth::new(opts.token.as_deref(), opts.tls), poll: opts.poll });
    Router::new()
        .route("/", get(jobs_page::<S>))
        .route("/jobs/{id}", get(job_page::<S>))
        .route("/login", post(login::<S>))
        .route("/assets/{file}", get(asset))
        .route("/api/jobs", get(api_jobs::<S>))
        .route("/api/jobs/{id}", get(api_job::<S>))
        .route("/api/jobs/{id}/events", get(api_events::<S>))
        .with_state(app)
}

/// What every page may load and do: only this server's scripts, styles and
/// calls, no inline script, no framing (model output is shown as text, and
/// this keeps it so even if a bug let markup through).
pub(crate) const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

fn page<S>(app: &App<S>, headers: &HeaderMap, path: &str, query: Option<String>, html: &'static str) -> Response {
    match app.auth.page(headers, path, query.as_deref()) {
        auth::Verdict::Allowed => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
                (header::CONTENT_SECURITY_POLICY, CSP),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            html,
        )
            .into_response(),
        auth::Verdict::Respond(r) => r,
    }
}

async fn jobs_page<S: Source>(State(app): State<Arc<App<S>>>, headers: HeaderMap, RawQuery(q): RawQuery) -> Response {
    page(&app, &headers, "/", q, assets::JOBS_HTML)
}

async fn job_page<S: Source>(
    State(app): State<Arc<App<S>>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    page(&app, &headers, &format!("/jobs/{}", auth::encode_path(&id)), q, assets::JOB_HTML)
}

async fn login<S: Source>(State(app): State<Arc<App<S>>>, Form(form): Form<auth::LoginForm>) -> Response {
    app.auth.login(&form)
}

async fn asset(UrlPath(file): UrlPath<String>) -> Response {
    match assets::get(&file) {
        Some((mime, body)) => ([(header::CONTENT_TYPE, mime), (header::CACHE_CONTROL, "max-age=3600")], body).into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

fn error_response(e: &Error) -> Response {
    let code = match e {
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Io { .. } | Error::Tls(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json_response(code, serde_json::json!({ "error": e.to_string() }))
}

fn json_response(code: StatusCode, v: Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], v.to_string()).into_response()
}

async fn api_jobs<S: Source>(State(app): State<Arc<App<S>>>, headers: HeaderMap) -> Response {
    if let Some(r) = app.auth.api(&headers) {
        return r;
    }
    match app.source.jobs().await {
        Ok(jobs) => json_response(StatusCode::OK, Value::Array(jobs)),
        Err(e) => error_response(&e),
    }
}

async fn api_job<S: Source>(State(app): State<Arc<App<S>>>, UrlPath(id): UrlPath<String>, headers: HeaderMap) -> Response {
    if let Some(r) = app.auth.api(&headers) {
        return r;
    }
    match app.source.job(&id).await {
        Ok(job) => json_response(StatusCode::OK, job),
        Err(e) => error_response(&e),
    }
}

/// `?from=SEQ`: the first event to send (a reconnect's `Last-Event-ID` wins).
#[derive(Debug, Deserialize)]
struct Since {
    from: Option<u64>,
}

async fn api_events<S: Source>(
    State(app): State<Arc<App<S>>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<Since>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = app.auth.api(&headers) {
        return r;
    }
    // A reconnecting EventSource says where it got to.
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u64>().ok()).map(|s| s + 1);
    let from = resume.or(q.from).unwrap_or(0);
    // An unknown job is an error now, not an empty stream.
    if let Err(e) = app.source.events(&id, u64::MAX).await {
        return error_response(&e);
    }
    let (tx, rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let mut next = from;
        loop {
            if tx.is_closed() {
                return;
            }
            match app.source.events(&id, next).await {
                Ok(batch) => {
                    for (seq, json) in batch.events {
                        if tx.send(Event::default().id(seq.to_string()).data(json)).await.is_err() {
                            return;
                        }
                        next = seq + 1;
                    }
                    if batch.finished {
                        let _ = tx.send(Event::default().event("end").data("finished")).await;
                        return;
                    }
                }
                Err(Error::NotFound(what)) => {
                    let _ = tx.send(Event::default().event("end").data(format!("gone: {what}"))).await;
                    return;
                }
                // Passing trouble (a store outage): say so and keep polling.
                Err(e) => {
                    if tx.send(Event::default().event("trouble").data(e.to_string())).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            tokio::time::sleep(app.poll).await;
        }
    });
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, Infallible>)).keep_alive(KeepAlive::default()).into_response()
}

/// A rustls server configuration from PEM files (certificate chain, key).
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<tokio_rustls::rustls::ServerConfig>> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::Tls(format!("certificate {}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| Error::Tls(format!("key {}: {e}", key.display())))?;
    let mut cfg = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| Error::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves `router` on `listener` (over TLS when `tls` is given) until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let Some(tls) = tls else {
        return axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| Error::Io { what: "dashboard server".into(), source: e });
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "dashboard accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => return tracing::debug!(%peer, error = %e, "dashboard TLS handshake failed"),
            };
            let svc = hyper_util::service::TowerToHyperService::new(router);
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "dashboard connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// One finished job with three events (the HTTP layer's tests; the real
    /// sources are tested through the orchestrator and `sluice dashboard`).
    struct Fixed;

    impl Source for Fixed {
        async fn jobs(&self) -> Result<Vec<Value>> {
            Ok(vec![serde_json::json!({"id": "j-1", "name": "j", "state": "succeeded"})])
        }
        async fn job(&self, id: &str) -> Result<Value> {
            if id == "j-1" {
                Ok(self.jobs().await?.remove(0))
            } else {
                Err(Error::NotFound(format!("job `{id}`")))
            }
        }
        async fn events(&self, id: &str, from: u64) -> Result<Events> {
            self.job(id).await?;
            let all = ["{\"event\":\"step\",\"step\":1}", "{\"event\":\"step\",\"step\":2}", "{\"event\":\"eval\",\"step\":2}"];
            let events = all.iter().enumerate().skip(from as usize).map(|(i, e)| (i as u64, e.to_string())).collect();
            Ok(Events { events, finished: true })
        }
    }

    async fn get(stream: &mut (impl AsyncRead + AsyncWrite + Unpin), path: &str, headers: &str) -> String {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn start(tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opts = Options { token: Some("t0k".into()), tls: tls.is_some(), ..Default::default() };
        tokio::spawn(serve(listener, router(Fixed, &opts), tls, std::future::pending()));
        addr
    }

    #[tokio::test]
    async fn events_stream_end_for_a_finished_job_and_resume_after_the_last_id() {
        let addr = start(None).await;
        let call = |path: &'static str, headers: &'static str| async move {
            get(&mut tokio::net::TcpStream::connect(addr).await.unwrap(), path, headers).await
        };
        let auth = "Authorization: Bearer t0k\r\n";
        let all = call("/api/jobs/j-1/events", auth).await;
        assert!(all.starts_with("HTTP/1.1 200") && all.contains("text/event-stream"), "{all}");
        let ids: Vec<&str> = all.lines().filter_map(|l| l.strip_prefix("id: ")).collect();
        assert_eq!(ids, ["0", "1", "2"]);
        assert!(all.contains("data: {\"event\":\"step\",\"step\":2}") && all.contains("event: end"), "{all}");
        let resumed = call("/api/jobs/j-1/events", "Authorization: Bearer t0k\r\nLast-Event-ID: 1\r\n").await;
        assert_eq!(resumed.lines().filter_map(|l| l.strip_prefix("id: ")).collect::<Vec<_>>(), ["2"]);
        assert!(call("/api/jobs/nope/events", auth).await.starts_with("HTTP/1.1 404"));
        assert!(call("/api/jobs/j-1/events", "").await.starts_with("HTTP/1.1 401"));
        assert!(call("/api/jobs", "Cookie: sluice_token=74306b\r\n").await.contains("\"j-1\""));
        let js = call("/assets/uPlot.iife.min.js", "").await;
        assert!(js.starts_with("HTTP/1.1 200") && js.contains("uPlot"), "assets need no token");
        let page = call("/jobs/j-1", auth).await;
        assert!(page.contains("content-security-policy: default-src 'self'; script-src 'self';"), "{page}");
        assert!(!page.contains("<script>"), "no inline script");
    }

    #[tokio::test]
    async fn over_tls_the_cookie_is_secure() {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        let tls = tls_config(&dir.path().join("cert.pem"), &dir.path().join("key.pem")).unwrap();
        assert!(tls_config(&dir.path().join("cert.pem"), &dir.path().join("missing.pem")).is_err());
        let addr = start(Some(tls)).await;

        use tokio_rustls::rustls;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut s = connector.connect(name, tcp).await.unwrap();
        let r = get(&mut s, "/?token=t0k", "").await;
        assert!(r.starts_with("HTTP/1.1 303"), "{r}");
        let cookie = r.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).unwrap();
        assert!(cookie.contains("HttpOnly") && cookie.contains("Secure") && cookie.contains("SameSite=Strict"), "{cookie}");
    }
}
