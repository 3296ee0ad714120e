//! Weight sync, the actor's side: a [`WeightSubscriber`] brings the policy to
//! the newest version a learner published (the learner's side is
//! `sluice_learner::publish::WeightPublisher`). [`GrpcSubscriber`] is the
//! `GetWeights` backend: a chunked, resumable download of one version's
//! safetensors bytes. The policy is only touched once a version is complete, so
//! an interrupted download leaves the actor on its previous version; the next
//! attempt resumes at the byte it stopped at when the learner still has that
//! version (same incarnation), and starts over otherwise.
//!
//! With deltas on (`rollout.delta_weights`), the actor keeps the blob of the
//! version it holds and tells the learner which version that is; the learner
//! may answer with only the elements that changed since
//! (`sluice_model::weights::apply_deltas` rebuilds the new blob byte for
//! byte), else with the whole blob.
//!
//! [`BroadcastSubscriber`] (`rollout.weight_transport = "broadcast"`) is a
//! member of the learner's weights broadcast group (`sluice_collective::weights`):
//! every version arrives in its staging tensors as it is published, and a pull
//! copies the newest staged version into the policy; a version the broadcast
//! did not bring (the actor just joined, or the group re-formed) comes over
//! `GetWeights` as above.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use sluice_collective::weights::Member;
use sluice_collective::GroupAuth;
use tch::Tensor;

use sluice_model::hf::Policy;
use sluice_proto::v1::learner_client::LearnerClient;
use sluice_proto::v1::WeightsRequest;
use sluice_proto::Channel;
use tonic::Code;

use crate::error::{Error, Result};

struct Partial {
    version: u64,
    incarnation: u64,
    total: u64,
    /// The download is the deltas from this version.
    delta_from: Option<u64>,
    buf: Vec<u8>,
}

/// The blob of the version the actor holds.
struct Held {
    version: u64,
    incarnation: u64,
    blob: Vec<u8>,
}

/// A finished download.
#[derive(Debug, Clone, PartialEq)]
pub struct Synced {
    pub version: u64,
    pub incarnation: u64,
    /// Bytes downloaded (the deltas' size when `delta_from` is set).
    pub bytes: usize,
    /// The download was the changes since this version.
    pub delta_from: Option<u64>,
    /// Byte the download resumed at (0 for a fresh one).
    pub resumed_from: u64,
    pub seconds: f64,
    /// Came through the weights broadcast group (staged), not `GetWeights`.
    pub broadcast: bool,
}

/// Download state kept across attempts.
#[derive(Default)]
pub struct WeightSync {
    partial: Option<Partial>,
    held: Option<Held>,
    /// Bearer token for the learner (`sluice_proto::auth`).
    pub token: Option<String>,
    /// Ask for deltas (and keep the blob they apply to).
    pub deltas: bool,
}

impl WeightSync {
    /// Bytes held from an interrupted download.
    pub fn partial_bytes(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.buf.len())
    }

    /// A sync that asks for deltas.
    pub fn with_deltas() -> Self {
        WeightSync { deltas: true, ..WeightSync::default() }
    }

    /// The blob of the version downloaded last (until [`WeightSync::release`]).
    pub fn blob(&self) -> Option<&[u8]> {
        self.held.as_ref().map(|h| h.blob.as_slice())
    }

    /// Drops the held blob unless deltas need it.
    pub fn release(&mut self) {
        if !self.deltas {
            self.held = None;
        }
    }

    /// Downloads the newest version (or finishes the interrupted one); its
    /// blob is then [`WeightSync::blob`].
    pub async fn download(&mut self, client: &mut LearnerClient<Channel>, job: &str) -> Result<Synced> {
        match self.try_download(client, job).await {
            Err(Error::Status(s)) if self.partial.is_some() && matches!(s.code(), Code::NotFound | Code::FailedPrecondition | Code::OutOfRange) => {
                tracing::info!(reason = %s.message(), "cannot resume the weight download; starting over");
                self.partial = None;
                self.try_download(client, job).await
            }
            Err(e @ Error::Model(_)) => {
                // Deltas that do not apply to the held blob: fetch the whole version.
                tracing::warn!(error = %e, "weights delta did not apply; downloading the whole version");
                self.held = None;
                self.try_download(client, job).await
            }
            other => other,
        }
    }

    async fn try_download(&mut self, client: &mut LearnerClient<Channel>, job: &str) -> Result<Synced> {
        let t0 = Instant::now();
        let have = self.held.as_ref().filter(|_| self.deltas);
        let req = match &self.partial {
            Some(p) => WeightsRequest {
                job_id: job.into(),
                version: p.version,
                offset: p.buf.len() as u64,
                incarnation: p.incarnation,
                have_version: p.delta_from,
                have_incarnation: p.incarnation,
            },
            None => WeightsRequest {
                job_id: job.into(),
                have_version: have.map(|h| h.version),
                have_incarnation: have.map_or(0, |h| h.incarnation),
                ..Default::default()
            },
        };
        let resumed_from = req.offset;
        let mut stream = client.get_weights(sluice_proto::auth::request(req, self.token.as_deref())).await?.into_inner();
        loop {
            let chunk = match stream.message().await {
                Ok(Some(c)) => c,
                Ok(None) => {
                    let have = self.partial_bytes();
                    return Err(Error::Sync(format!("stream ended after {have} bytes of an incomplete version")));
                }
                Err(status) => return Err(Error::Status(status)),
            };
            let p = self.partial.get_or_insert_with(|| Partial {
                version: chunk.version,
                incarnation: chunk.incarnation,
                total: chunk.total_bytes,
                delta_from: chunk.delta_from,
                buf: Vec::with_capacity(chunk.total_bytes as usize),
            });
            if (chunk.version, chunk.incarnation, chunk.total_bytes, chunk.delta_from) != (p.version, p.incarnation, p.total, p.delta_from)
                || chunk.offset != p.buf.len() as u64
            {
                let msg = format!(
                    "chunk of version {} at offset {} does not continue version {} at offset {}",
                    chunk.version,
                    chunk.offset,
                    p.version,
                    p.buf.len()
                );
                self.partial = None;
                return Err(Error::Sync(msg));
            }
            p.buf.extend_from_slice(&chunk.data);
            if p.buf.len() as u64 > p.total {
                self.partial = None;
                return Err(Error::Sync("more bytes than announced".into()));
            }
            if p.buf.len() as u64 == p.total {
                let p = self.partial.take().expect("present");
                let bytes = p.buf.len();
                let blob = match p.delta_from {
                    None => p.buf,
                    Some(base) => {
                        let held = self.held.take().filter(|h| (h.version, h.incarnation) == (base, p.incarnation));
                        let mut blob = held.ok_or_else(|| Error::Sync(format!("deltas from version {base}, which this actor does not hold")))?.blob;
                        sluice_model::weights::apply_deltas(&mut blob, &p.buf)?;
                        blob
                    }
                };
                self.held = Some(Held { version: p.version, incarnation: p.incarnation, blob });
                let synced = Synced {
                    version: p.version,
                    incarnation: p.incarnation,
                    bytes,
                    delta_from: p.delta_from,
                    resumed_from,
                    seconds: t0.elapsed().as_secs_f64(),
                    broadcast: false,
                };
                return Ok(synced);
            }
        }
    }
}

/// How an actor gets a newer policy version.
pub trait WeightSubscriber {
    /// Brings `policy` to the newest published version (finishing an
    /// interrupted fetch when it can) and says what it did; on error the
    /// policy is untouched. `announced` is the `(version, incarnation)` the
    /// learner last announced: what the newest version is at least.
    fn pull(&mut self, policy: &Policy, announced: (u64, u64)) -> Result<Synced>;
}

/// [`WeightSubscriber`] over the learner's `GetWeights` stream. The download
/// state outlives a connection: after a reconnect ([`GrpcSubscriber::attach`])
/// it resumes where it stopped.
pub struct GrpcSubscriber {
    state: WeightSync,
    client: Option<LearnerClient<Channel>>,
    job: String,
    rt: tokio::runtime::Handle,
}

impl GrpcSubscriber {
    pub fn new(job: &str, token: Option<String>, deltas: bool, rt: tokio::runtime::Handle) -> Self {
        GrpcSubscriber { state: WeightSync { token, deltas, ..WeightSync::default() }, client: None, job: job.to_string(), rt }
    }

    /// Fetches through this learner connection from now on.
    pub fn attach(&mut self, client: LearnerClient<Channel>) {
        self.client = Some(client);
    }
}

impl WeightSubscriber for GrpcSubscriber {
    fn pull(&mut self, policy: &Policy, _announced: (u64, u64)) -> Result<Synced> {
        let client = self.client.as_mut().ok_or_else(|| Error::Sync("no learner connection".into()))?;
        let synced = self.rt.block_on(self.state.download(client, &self.job))?;
        apply(policy, self.state.blob().expect("a finished download holds its blob"), synced.version)?;
        self.state.release();
        Ok(synced)
    }
}

/// How long a pull waits at most for a version the group will bring (one
/// published after this member was admitted: the learner broadcasts before it
/// announces, so its bytes are on their way; a generation that fails ends the
/// wait at once) before it downloads the version instead.
const BROADCAST_WAIT: Duration = Duration::from_secs(10);

/// [`WeightSubscriber`] in the learner's weights broadcast group, with
/// `GetWeights` for what the broadcast did not bring. Until it
/// [`joins`](BroadcastSubscriber::join) a group it is a [`GrpcSubscriber`].
pub struct BroadcastSubscriber {
    grpc: GrpcSubscriber,
    member: Option<Member>,
    auth: GroupAuth,
    kind: tch::Kind,
}

impl BroadcastSubscriber {
    /// `group` is the job (its orchestrator id, or its name for a job file)
    /// and `dtype` the job's `rollout.weights_dtype`, as the learner has them.
    pub fn new(grpc: GrpcSubscriber, token: Option<&str>, group: &str, dtype: sluice_core::kinds::Dtype) -> Self {
        BroadcastSubscriber { grpc, member: None, auth: GroupAuth::new(token, group), kind: sluice_model::device::kind(dtype) }
    }

    /// Fetches through this learner connection from now on.
    pub fn attach(&mut self, client: LearnerClient<Channel>) {
        self.grpc.attach(client);
    }

    /// Joins the group at `addr` with staging tensors shaped like `policy`'s
    /// parameters (on its device); a member of another address is left.
    pub fn join(&mut self, addr: &str, policy: &Policy) -> Result<()> {
        if self.member.as_ref().is_some_and(|m| m.addr() == addr) {
            return Ok(());
        }
        self.member = None;
        let device = policy.device();
        let staging = tch::no_grad(|| {
            policy.named_parameters().into_iter().map(|(n, t)| (n, Tensor::zeros(t.size(), (self.kind, device)))).collect()
        });
        self.member = Some(Member::join(addr, &self.auth, staging).map_err(|e| Error::Sync(e.to_string()))?);
        tracing::info!(%addr, "joining the learner's weights broadcast group");
        Ok(())
    }

    /// The group member, if it joined one.
    pub fn member(&self) -> Option<&Member> {
        self.member.as_ref()
    }
}

impl WeightSubscriber for BroadcastSubscriber {
    fn pull(&mut self, policy: &Policy, announced: (u64, u64)) -> Result<Synced> {
        if let Some(m) = &self.member {
            let t0 = Instant::now();
            let (want, incarnation) = announced;
            let staged = m.with_version(
                want,
                incarnation,
                BROADCAST_WAIT,
                |version, incarnation, tensors| -> Result<Synced> {
                    let map = tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
                    policy.set_parameters(map, Path::new(&format!("<broadcast version {version}>")))?;
                    let bytes = tensors.iter().map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes()).sum();
                    let seconds = t0.elapsed().as_secs_f64();
                    Ok(Synced { version, incarnation, bytes, delta_from: None, resumed_from: 0, seconds, broadcast: true })
                },
            );
            if let Some(synced) = staged {
                return synced;
            }
            if let Some(why) = m.failed() {
                tracing::warn!(reason = %why, "the weights broadcast group cannot be used; downloading over gRPC");
                self.member = None;
            }
        }
        self.grpc.pull(policy, announced)
    }
}

/// Loads downloaded weights into the policy (all parameters or none: names and
/// shapes are checked before anything is copied).
pub fn apply(policy: &Policy, bytes: &[u8], version: u64) -> Result<()> {
    let tensors: HashMap<_, _> = sluice_model::weights::decode(bytes)?.into_iter().collect();
    policy.set_parameters(tensors, Path::new(&format!("<weights version {version}>")))?;
    Ok(())
}
