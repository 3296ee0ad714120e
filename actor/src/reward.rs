//! Scoring through the reward server: verifier (or environment) reward plus
//! the intrinsic (ONI) reward, for a batch of groups the actor sampled.

use std::sync::atomic::{AtomicBool, Ordering};

use sluice_core::config::{JobConfig, ResponseCaptions};
use sluice_proto::auth;
use sluice_proto::v1::reward_client::RewardClient;
use sluice_proto::v1;
use sluice_proto::Channel;
use tonic::transport::ClientTlsConfig;
use tonic::Code;

use crate::error::{Error, Result};
use crate::link::{channel, Backoff};

/// Replaces each rollout's reward with the reward server's total (verifier —
/// or, for an episode, the environment's reward — plus intrinsic reward). Keeps one connection in `client`; reconnects and
/// retries with backoff while the server is unreachable; false when stopped first.
///
/// With one span per group (`spans`: the work items' traces), each group is
/// its own `Score` call inside its span, all calls at once; else one call.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rescore(
    rt: &tokio::runtime::Runtime,
    endpoint: &str,
    token: Option<&str>,
    tls: Option<&ClientTlsConfig>,
    client: &mut Option<RewardClient<Channel>>,
    cfg: &JobConfig,
    task: &dyn sluice_core::tasks::Task,
    problems: &[sluice_core::tasks::Problem],
    groups: &mut [sluice_core::rollout::Group],
    tokenizer: &sluice_core::tokenizer::Tokenizer,
    spans: &[tracing::Span],
    stop: &AtomicBool,
) -> Result<bool> {
    use tracing::Instrument;
    let mut items = Vec::new();
    // Where each group's items start in `items`.
    let mut starts = Vec::with_capacity(groups.len());
    let episodes = problems.first().is_some_and(|p| task.episode(p).is_some());
    for (gi, (p, group)) in problems.iter().zip(groups.iter()).enumerate() {
        starts.push(items.len());
        for (ri, r) in group.rollouts.iter().enumerate() {
            let id = format!("{gi}:{ri}");
            if episodes {
                // The environment scored the episode and named its captions.
                items.push(v1::ScoreItem { id, env_reward: Some(r.extrinsic), captions: r.captions.clone(), ..Default::default() });
                continue;
            }
            let response = tokenizer.decode(&r.response_tokens)?;
            let captions = match cfg.reward.response_captions {
                ResponseCaptions::None => Vec::new(),
                ResponseCaptions::Lines => {
                    response.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
                }
            };
            items.push(v1::ScoreItem {
                id,
                verifier: p.verifier.name().to_string(),
                answer: p.answer.clone(),
                response,
                captions,
                env_reward: None,
            });
        }
    }
    starts.push(items.len());
    let calls: Vec<(v1::ScoreRequest, tracing::Span)> = if !spans.is_empty() && spans.len() == groups.len() {
        starts
            .windows(2)
            .zip(spans)
            .map(|(w, span)| (v1::ScoreRequest { job_id: cfg.name.clone(), items: items[w[0]..w[1]].to_vec() }, span.clone()))
            .collect()
    } else {
        vec![(v1::ScoreRequest { job_id: cfg.name.clone(), items }, tracing::Span::current())]
    };
    let mut backoff = Backoff::new();
    let scores = loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let attempt = rt.block_on(async {
            if client.is_none() {
                let c = channel(endpoint, tls).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                *client = Some(RewardClient::new(c));
            }
            let c = client.as_ref().expect("connected above");
            let mut tasks = tokio::task::JoinSet::new();
            for (k, (req, span)) in calls.iter().enumerate() {
                let (mut c, req) = (c.clone(), auth::request(req.clone(), token));
                tasks.spawn(async move { c.score(req).await.map(|r| (k, r.into_inner().scores)) }.instrument(span.clone()));
            }
            let mut parts = vec![Vec::new(); calls.len()];
            while let Some(done) = tasks.join_next().await {
                let (k, scores) = done.map_err(|e| tonic::Status::internal(e.to_string()))??;
                parts[k] = scores;
            }
            Ok::<_, tonic::Status>(parts.concat())
        });
        match attempt {
            Ok(scores) => break scores,
            Err(s) if s.code() == Code::Unauthenticated => return Err(Error::Status(s)),
            Err(e) => {
                tracing::warn!(error = %e, "reward server unavailable; retrying");
                *client = None;
                backoff.wait(stop);
            }
        }
    };
    let mut it = scores.into_iter();
    for group in groups.iter_mut() {
        for r in &mut group.rollouts {
            let s = it.next().ok_or_else(|| Error::Reward("it returned too few scores".into()))?;
            if !s.error.is_empty() {
                return Err(Error::Reward(format!("rollout {} refused: {}", s.id, s.error)));
            }
            r.reward = s.total;
            r.extrinsic = s.extrinsic;
            r.intrinsic = s.intrinsic;
        }
    }
    Ok(true)
}

/// The reward server's annotation pipeline as the job event's body (actor 0
/// reports it now and then for the dashboard); `None` without a connection or
/// when the call fails or takes over a second (it is never worth waiting for).
pub(crate) fn annotation_progress(
    rt: &tokio::runtime::Runtime,
    client: &mut Option<RewardClient<Channel>>,
    token: Option<&str>,
    job: &str,
) -> Option<v1::AnnotationProgress> {
    let c = client.as_mut()?;
    let req = auth::request(v1::AnnotationStatsRequest { job_id: job.to_string() }, token);
    let s = rt
        .block_on(async { tokio::time::timeout(std::time::Duration::from_secs(1), c.annotation_statistics(req)).await })
        .ok()?
        .ok()?
        .into_inner();
    let mean = if s.batches > 0 { s.annotate_seconds / s.batches as f64 } else { f64::NAN };
    Some(v1::AnnotationProgress {
        labelled: s.labelled,
        queued: s.queued,
        queue_capacity: s.queue_capacity,
        dropped: s.dropped,
        annotated: s.annotated,
        failures: s.failures,
        lookups: s.lookups,
        hits: s.hits,
        annotate_seconds_mean: mean,
        reward_model_version: s.reward_model_version,
    })
}

