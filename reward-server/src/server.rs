//! The reward-server process: open the label store, start the annotator loop,
//! serve `sluice.v1.Reward` and gRPC health.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sluice_core::config::JobConfig;
use sluice_proto::v1::reward_server::RewardServer;
use tonic::service::interceptor::InterceptedService;
use sluice_proto::tls::ServerFiles;
use tonic::transport::ServerTlsConfig;

use crate::annotator::{self, Annotator, Counters};
use crate::error::{Error, Result};
use crate::intrinsic::Annotations;
use crate::labels::LabelStore;
use crate::queue::CaptionQueue;
use crate::service::{RewardService, State};

/// What the server prints as JSON lines.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ServerEvent {
    Listening { addr: String, store: String, annotator: String },
}

/// Builds the shared state and starts the annotator loop on the current runtime.
/// Labels are stored under `labels_of` — the job's id when an orchestrator gave
/// one, so two jobs with the same name never share (or poison) labels.
pub async fn start(job: &JobConfig, labels_of: &str) -> Result<Arc<State>> {
    let cfg = job.reward.clone();
    let store = Arc::new(LabelStore::open(&cfg.store, labels_of).await?);
    let queue = Arc::new(CaptionQueue::new(cfg.queue_capacity));
    let annotator = Arc::new(Annotator::from_config(&cfg)?);
    let counters = Arc::new(Counters::default());
    let state = Arc::new(State {
        job: job.name.clone(),
        annotator_name: annotator.name(),
        store: store.clone(),
        queue: queue.clone(),
        counters: counters.clone(),
        cfg: cfg.clone(),
        intrinsic: crate::intrinsic::build(&cfg),
        lookups: AtomicU64::new(0),
        hits: AtomicU64::new(0),
        store_errors: AtomicU64::new(0),
    });
    let (pairwise, learns) = state.intrinsic.as_ref().map_or((false, false), |m| (m.pairwise(), m.learns()));
    tokio::spawn(annotator::run(queue, store, annotator, cfg.batch_size, pairwise, counters));
    if learns {
        tokio::spawn(train_model(state.clone()));
    }
    Ok(state)
}

/// Labels (or preferences) a learnt reward model trains on at most (the newest).
const TRAIN_LABELS: usize = 5000;

/// Retrains the classifier (or the ranker) whenever the number of labels
/// (preferences) changed — checked twice a second, once `train_min_labels`
/// exist — then swaps it in and bumps the reward model's version.
async fn train_model(state: Arc<State>) {
    let ranking = state.intrinsic.as_ref().is_some_and(|m| m.pairwise());
    let mut trained = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let n = if ranking { state.store.preference_count().await } else { state.store.count().await };
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count labels");
                continue;
            }
        };
        if n < state.cfg.train_min_labels as u64 || n == trained {
            continue;
        }
        match retrain(&state, ranking).await {
            Ok(()) => {
                state.counters.version.fetch_add(1, Ordering::SeqCst);
                trained = n;
            }
            Err(e) => tracing::warn!(error = %e, "reward model not retrained"),
        }
    }
}

/// One training run on the newest labels (preferences), in a blocking task.
async fn retrain(state: &Arc<State>, ranking: bool) -> Result<()> {
    let data = if ranking {
        Annotations::Preferences(state.store.preferences(TRAIN_LABELS).await?)
    } else {
        Annotations::Labels(state.store.recent(TRAIN_LABELS).await?)
    };
    let st = state.clone();
    tokio::task::spawn_blocking(move || {
        if let Some(model) = &st.intrinsic {
            let n = model.train(data);
            tracing::info!(model = model.name(), annotations = n, "reward model retrained");
        }
    })
    .await
    .map_err(|e| Error::Annotator(format!("training task: {e}")))
}

/// Serves until `shutdown` resolves. With a `token`, Reward calls without it
/// are refused (health stays open); with `tls`, only TLS connections are served.
pub async fn serve(
    state: Arc<State>,
    listener: tokio::net::TcpListener,
    token: Option<&str>,
    tls: Option<ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::result::Result<(), tonic::transport::Error> {
    let svc = InterceptedService::new(
        RewardServer::new(RewardService::new(state))
            .max_decoding_message_size(sluice_core::limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(sluice_core::limits::MAX_MESSAGE_BYTES),
        sluice_proto::auth::Check::new(token),
    );
    sluice_proto::serve::serve::<RewardServer<RewardService>>(listener, tls, shutdown, |s| s.add_service(svc)).await
}

/// Runs the reward server for `job` on `listen` until Ctrl-C / SIGTERM.
/// Runs the server until Ctrl-C / SIGTERM; labels are kept under `job_id`
/// (else the job's name, for a job run without an orchestrator).
pub fn run(
    job: JobConfig,
    job_id: Option<&str>,
    listen: &str,
    token: Option<&str>,
    tls: Option<&ServerFiles>,
    report: impl Fn(&ServerEvent),
) -> Result<()> {
    let tls = tls.map(ServerFiles::config).transpose().map_err(Error::Server)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Io { what: "async runtime".into(), source: e })?;
    rt.block_on(async {
        let state = start(&job, job_id.unwrap_or(&job.name)).await?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| Error::Io { what: format!("listen address {listen}"), source: e })?;
        let addr = listener.local_addr().map_err(|e| Error::Io { what: "listener".into(), source: e })?;
        report(&ServerEvent::Listening {
            addr: addr.to_string(),
            store: job.reward.store.to_string(),
            annotator: state.annotator_name.clone(),
        });
        tracing::info!(%addr, "reward server serving");
        serve(state, listener, token, tls, sluice_core::signal::shutdown())
            .await
            .map_err(|e| Error::Io { what: "gRPC server".into(), source: std::io::Error::other(e) })
    })
}
