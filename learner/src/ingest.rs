//! Checking and assembling rollouts that arrive from actors.
//!
//! [`check`] turns one wire rollout into a core [`Rollout`] or a [`Refusal`]
//! (the reason becomes an `INVALID_ARGUMENT` status); [`Assembler`] collects the
//! rollouts of one stream into complete groups. A group whose stream ends early
//! is never released.

use std::collections::{BTreeMap, HashMap};

pub use sluice_core::ids::WorkIds;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prost::Message;
use sluice_core::limits::{MAX_PARTIAL_GROUPS, MAX_PARTIAL_GROUPS_PER_STREAM};
use sluice_core::rollout::{Group, Rollout};
use sluice_proto::v1;

/// Limits a learner enforces on every rollout.
#[derive(Debug, Clone)]
pub struct Limits {
    pub job: String,
    pub vocab_size: usize,
    /// Prompt plus response tokens.
    pub max_tokens: usize,
    pub max_rollout_bytes: usize,
    pub max_group_size: usize,
    /// The objective needs behaviour log-probs (GRPO's importance ratio); a
    /// rollout without them is refused.
    pub needs_logprobs: bool,
}

/// Why a rollout was refused: a short kind (counted in status) and a reason
/// for the client — the codec's own type, extended with this learner's limits.
pub use sluice_proto::codec::Malformed as Refusal;

fn refuse(kind: &'static str, reason: impl Into<String>) -> Refusal {
    Refusal { kind, reason: reason.into() }
}

fn check_tokens(what: &str, tokens: &[i64], vocab: usize) -> Result<(), Refusal> {
    match tokens.iter().position(|&t| t as usize >= vocab) {
        Some(i) => Err(refuse(
            "token_out_of_vocab",
            format!("{what} token {} at position {i} is outside the vocabulary (size {vocab})", tokens[i]),
        )),
        None => Ok(()),
    }
}

/// Validates one rollout message against the limits.
pub fn check(r: &v1::Rollout, limits: &Limits) -> Result<Rollout, Refusal> {
    if r.job_id != limits.job {
        return Err(refuse("unknown_job", format!("unknown job `{}`: this learner serves `{}`", r.job_id, limits.job)));
    }
    let size = r.encoded_len();
    if size > limits.max_rollout_bytes {
        return Err(refuse(
            "too_large",
            format!("rollout is {size} bytes, over the limit of {} (rollout.max_rollout_bytes)", limits.max_rollout_bytes),
        ));
    }
    if r.group_size == 0 || r.group_size as usize > limits.max_group_size {
        return Err(refuse(
            "group_size",
            format!("group_size {} is outside 1..={} (rollout.max_group_size)", r.group_size, limits.max_group_size),
        ));
    }
    if r.index >= r.group_size {
        return Err(refuse("group_size", format!("index {} is not below group_size {}", r.index, r.group_size)));
    }
    let rollout = Rollout::try_from(r)?;
    if limits.needs_logprobs && rollout.logprobs.is_none() {
        return Err(refuse("no_logprobs", "the rollout has no behaviour log-probs and this job's objective (GRPO) needs them"));
    }
    let len = rollout.prompt_tokens.len() + rollout.response_tokens.len();
    if len > limits.max_tokens {
        return Err(refuse("too_long", format!("{len} tokens exceed the model's {} positions", limits.max_tokens)));
    }
    check_tokens("prompt", &rollout.prompt_tokens, limits.vocab_size)?;
    check_tokens("response", &rollout.response_tokens, limits.vocab_size)?;
    Ok(rollout)
}

struct Partial {
    size: u32,
    prompt_id: u64,
    version: u64,
    /// Members that arrived, by index (nothing is reserved for those that have not).
    slots: BTreeMap<u32, Rollout>,
}

/// The refusal kind for a stream over [`MAX_PARTIAL_GROUPS_PER_STREAM`], or
/// a learner over [`MAX_PARTIAL_GROUPS`] (`RESOURCE_EXHAUSTED`). An actor sends
/// each group's rollouts together, so it never has more than one or two open.
pub const TOO_MANY_PARTIAL_GROUPS: &str = "too_many_partial_groups";

/// Collects the rollouts of one stream into complete groups; `open` counts the
/// incomplete groups of every stream of the learner.
#[derive(Default)]
pub struct Assembler {
    partial: HashMap<u64, Partial>,
    open: Arc<AtomicUsize>,
}

impl Drop for Assembler {
    fn drop(&mut self) {
        self.open.fetch_sub(self.partial.len(), Ordering::SeqCst);
    }
}

impl Assembler {
    /// An assembler whose incomplete groups count toward `open` (shared by all streams).
    pub fn new(open: Arc<AtomicUsize>) -> Assembler {
        Assembler { partial: HashMap::new(), open }
    }

    /// Adds a checked rollout; returns its group once all members have arrived.
    pub fn add(&mut self, wire: &v1::Rollout, r: Rollout) -> Result<Option<Group>, Refusal> {
        if !self.partial.contains_key(&wire.group_id) {
            if self.partial.len() >= MAX_PARTIAL_GROUPS_PER_STREAM {
                return Err(refuse(
                    TOO_MANY_PARTIAL_GROUPS,
                    format!(
                        "more than {MAX_PARTIAL_GROUPS_PER_STREAM} incomplete groups on one stream (send each group's rollouts together)"
                    ),
                ));
            }
            if self.open.fetch_add(1, Ordering::SeqCst) >= MAX_PARTIAL_GROUPS {
                self.open.fetch_sub(1, Ordering::SeqCst);
                return Err(refuse(
                    TOO_MANY_PARTIAL_GROUPS,
                    format!("this learner holds {MAX_PARTIAL_GROUPS} incomplete groups across its streams; try again later"),
                ));
            }
        }
        let p = self.partial.entry(wire.group_id).or_insert_with(|| Partial {
            size: wire.group_size,
            prompt_id: r.prompt_id,
            version: r.version,
            slots: BTreeMap::new(),
        });
        if p.size != wire.group_size || p.prompt_id != r.prompt_id || p.version != r.version {
            return Err(refuse(
                "group_mismatch",
                format!(
                    "group {}: rollout says group_size {}, prompt {}, version {}; the group started with {}, {}, {}",
                    wire.group_id, wire.group_size, r.prompt_id, r.version, p.size, p.prompt_id, p.version
                ),
            ));
        }
        if p.slots.insert(wire.index, r).is_some() {
            return Err(refuse("group_mismatch", format!("group {}: index {} sent twice", wire.group_id, wire.index)));
        }
        if p.slots.len() < p.size as usize {
            return Ok(None);
        }
        let p = self.partial.remove(&wire.group_id).expect("present");
        self.open.fetch_sub(1, Ordering::SeqCst);
        // Indices are checked below `size` and distinct: all of 0..size, in order.
        let rollouts: Vec<Rollout> = p.slots.into_values().collect();
        // The sampling batch's trace, for the train_step span's links (bounded).
        let trace = (!wire.traceparent.is_empty() && wire.traceparent.len() <= 256).then(|| wire.traceparent.clone());
        // The actor's generation time for it (only a sane value counts).
        let generate_s = wire.timings.map_or(0.0, |t| t.generate_s);
        let generate_s = if (0.0..=86_400.0).contains(&generate_s) { generate_s } else { 0.0 };
        Ok(Some(Group { prompt_id: p.prompt_id, work_id: wire.work_id, rollouts, trace, generate_s }))
    }

    /// Groups still waiting for members (dropped when the stream ends).
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::packed;

    fn limits() -> Limits {
        Limits { job: "j".into(), vocab_size: 50, max_tokens: 64, max_rollout_bytes: 4096, max_group_size: 8, needs_logprobs: true }
    }

    fn rollout(index: u32) -> v1::Rollout {
        v1::Rollout {
            job_id: "j".into(),
            actor_id: "a".into(),
            group_id: 9,
            group_size: 2,
            index,
            prompt_id: 3,
            prompt_tokens: packed::tokens(&[4, 5]),
            response_tokens: packed::tokens(&[6, 1]),
            logprobs: packed::floats(&[-0.5, -0.1]),
            rewards: Some(v1::Rewards { extrinsic: 1.0, intrinsic: 0.0, total: 1.0 }),
            policy_version: 2,
            finish: v1::FinishReason::Stop as i32,
            ..Default::default()
        }
    }

    #[test]
    fn a_stream_cannot_hold_open_groups_without_bound() {
        let lim = Limits { max_group_size: 1024, ..limits() };
        let mut asm = Assembler::default();
        let open = |id: u64| v1::Rollout { group_id: id, group_size: 1024, ..rollout(0) };
        for id in 0..MAX_PARTIAL_GROUPS_PER_STREAM as u64 {
            let r = open(id);
            assert!(asm.add(&r, check(&r, &lim).unwrap()).unwrap().is_none());
        }
        let one_more = open(MAX_PARTIAL_GROUPS_PER_STREAM as u64);
        let e = asm.add(&one_more, check(&one_more, &lim).unwrap()).unwrap_err();
        assert_eq!(e.kind, TOO_MANY_PARTIAL_GROUPS);
        // A group already open still takes its members.
        let member = v1::Rollout { index: 1, ..open(0) };
        assert!(asm.add(&member, check(&member, &lim).unwrap()).unwrap().is_none());
        assert_eq!(asm.pending(), MAX_PARTIAL_GROUPS_PER_STREAM);
    }

    /// Many streams together cannot hold more than the learner's total; a
    /// closed stream's groups no longer count.
    #[test]
    fn all_streams_together_cannot_hold_open_groups_without_bound() {
        let lim = Limits { max_group_size: 1024, ..limits() };
        let shared = Arc::new(AtomicUsize::new(0));
        let open = |id: u64| v1::Rollout { group_id: id, group_size: 1024, ..rollout(0) };
        let streams = MAX_PARTIAL_GROUPS / MAX_PARTIAL_GROUPS_PER_STREAM;
        let mut asms: Vec<Assembler> = (0..streams).map(|_| Assembler::new(shared.clone())).collect();
        for asm in &mut asms {
            for id in 0..MAX_PARTIAL_GROUPS_PER_STREAM as u64 {
                assert!(asm.add(&open(id), check(&open(id), &lim).unwrap()).unwrap().is_none());
            }
        }
        assert_eq!(shared.load(Ordering::SeqCst), MAX_PARTIAL_GROUPS);
        let mut late = Assembler::new(shared.clone());
        let e = late.add(&open(0), check(&open(0), &lim).unwrap()).unwrap_err();
        assert_eq!(e.kind, TOO_MANY_PARTIAL_GROUPS);
        assert!(e.reason.contains("across its streams"), "{}", e.reason);
        // A group that completes and a stream that closes give their places back.
        let one = v1::Rollout { group_id: 7, group_size: 1, ..rollout(0) };
        drop(asms.pop());
        assert_eq!(shared.load(Ordering::SeqCst), MAX_PARTIAL_GROUPS - MAX_PARTIAL_GROUPS_PER_STREAM);
        assert!(late.add(&one, check(&one, &lim).unwrap()).unwrap().is_some());
        assert_eq!(shared.load(Ordering::SeqCst), MAX_PARTIAL_GROUPS - MAX_PARTIAL_GROUPS_PER_STREAM);
    }

    #[test]
    fn members_arriving_out_of_order_are_put_in_index_order() {
        let mut asm = Assembler::default();
        let second = v1::Rollout { response_tokens: packed::tokens(&[7, 1]), ..rollout(1) };
        assert!(asm.add(&second, check(&second, &limits()).unwrap()).unwrap().is_none());
        let first = rollout(0);
        let g = asm.add(&first, check(&first, &limits()).unwrap()).unwrap().unwrap();
        assert_eq!((g.rollouts[0].response_tokens[0], g.rollouts[1].response_tokens[0]), (6, 7));
    }

    #[test]
    fn a_group_keeps_its_generation_time_when_it_is_sane() {
        for (sent, kept) in [(0.25, 0.25), (f64::NAN, 0.0), (-1.0, 0.0), (1e12, 0.0)] {
            let mut asm = Assembler::default();
            let timed = |i| v1::Rollout { timings: Some(v1::Timings { generate_s: sent, ..Default::default() }), ..rollout(i) };
            let (a, b) = (timed(0), timed(1));
            assert!(asm.add(&a, check(&a, &limits()).unwrap()).unwrap().is_none());
            let g = asm.add(&b, check(&b, &limits()).unwrap()).unwrap().unwrap();
            assert_eq!(g.generate_s, kept, "sent {sent}");
        }
    }

    #[test]
    fn good_rollouts_round_trip_and_assemble_into_a_group() {
        let mut asm = Assembler::default();
        let a = rollout(1);
        let ra = check(&a, &limits()).unwrap();
        assert_eq!(ra.response_tokens, vec![6, 1]);
        assert!(asm.add(&a, ra).unwrap().is_none());
        assert_eq!(asm.pending(), 1);
        let b = rollout(0);
        let g = asm.add(&b, check(&b, &limits()).unwrap()).unwrap().unwrap();
        assert_eq!(g.rollouts.len(), 2);
        assert_eq!(asm.pending(), 0);
        let dup = rollout(0);
        asm.add(&dup, check(&dup, &limits()).unwrap()).unwrap();
        assert_eq!(asm.add(&dup, check(&dup, &limits()).unwrap()).unwrap_err().kind, "group_mismatch");
    }

    #[test]
    fn bad_rollouts_are_refused_with_a_reason() {
        type Edit = Box<dyn Fn(&mut v1::Rollout)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("unknown_job", Box::new(|r| r.job_id = "other".into())),
            ("token_out_of_vocab", Box::new(|r| r.response_tokens = packed::tokens(&[50, 1]))),
            ("non_finite", Box::new(|r| r.logprobs = packed::floats(&[-0.5, f32::NAN]))),
            ("non_finite", Box::new(|r| r.rewards.as_mut().unwrap().total = f64::INFINITY)),
            ("shape", Box::new(|r| r.logprobs = packed::floats(&[-0.5, -0.1, -1.0]))),
            ("shape", Box::new(|r| r.response_tokens = [&r.response_tokens[..], &[0]].concat().into())),
            ("shape", Box::new(|r| r.loss_mask = vec![1, 2].into())),
            ("group_size", Box::new(|r| r.index = 2)),
            ("group_size", Box::new(|r| r.group_size = 9)),
            ("too_large", Box::new(|r| r.prompt_tokens = packed::tokens(&[1; 1500]))),
            ("too_long", Box::new(|r| r.prompt_tokens = packed::tokens(&[1; 100]))),
            ("bad_logprob", Box::new(|r| r.logprobs = packed::floats(&[0.5, -0.1]))),
            ("no_logprobs", Box::new(|r| r.logprobs = Default::default())),
        ];
        for (kind, edit) in cases {
            let mut r = rollout(0);
            edit(&mut r);
            let e = check(&r, &limits()).unwrap_err();
            assert_eq!(e.kind, kind, "{}", e.reason);
            assert!(!e.reason.is_empty());
        }
        let mut asm = Assembler::default();
        let a = rollout(0);
        asm.add(&a, check(&a, &limits()).unwrap()).unwrap();
        let mut b = rollout(1);
        b.group_size = 3;
        assert_eq!(asm.add(&b, check(&b, &limits()).unwrap()).unwrap_err().kind, "group_mismatch");
    }
}
