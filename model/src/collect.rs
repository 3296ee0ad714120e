//! [`collect`]: the one way both the single-process trainer and the actor
//! sample rollouts: [`collect_groups`] for single-turn tasks,
//! [`collect_episodes`] for multi-turn environments.

use std::time::Instant;

use rand_chacha::ChaCha8Rng;
use sluice_core::rollout::{FinishReason, Group, Rollout};
use sluice_core::sampling::SamplingParams;
use sluice_core::tasks::{Episode, Problem, Task};
use sluice_core::tokenizer::Tokenizer;

use crate::error::{Error, Result};
use crate::generate::{generate_continuous, Completion, Interrupt};
use crate::model::Model;

/// Groups sampled in one batch, with the seconds generation took.
#[derive(Debug)]
pub struct Collected {
    pub groups: Vec<Group>,
    pub generate_s: f64,
}

/// Samples `sizes[i]` completions of problem `i` (all in one batch) and scores
/// each with the problem's verifier. Every rollout is stamped with `version`,
/// or with the versions `interrupt` switched the weights to while it was sampled.
#[allow(clippy::too_many_arguments)]
pub fn collect_groups(
    model: &Model,
    tokenizer: &Tokenizer,
    problems: &[Problem],
    sizes: &[usize],
    sampling: &SamplingParams,
    version: u64,
    rng: &mut ChaCha8Rng,
    interrupt: Option<Interrupt>,
) -> Result<Collected> {
    let encoded = problems.iter().map(|p| tokenizer.encode_problem(p)).collect::<Result<Vec<_>, _>>()?;
    check_sizes(problems, sizes)?;
    let prompts: Vec<Vec<i64>> =
        encoded.iter().zip(sizes).flat_map(|(p, &n)| std::iter::repeat_n(p.clone(), n)).collect();
    let t0 = Instant::now();
    let completions = sample(model, tokenizer, &prompts, sampling, rng, interrupt)?;
    let generate_s = t0.elapsed().as_secs_f64();
    let mut groups = Vec::with_capacity(problems.len());
    let mut it = completions.into_iter();
    for ((p, prompt), &n) in problems.iter().zip(encoded).zip(sizes) {
        let mut rollouts = Vec::with_capacity(n);
        for c in it.by_ref().take(n) {
            let score = p.score(&response_text(tokenizer, sampling, &c.tokens)?);
            let (version, switches) = stamp(version, &c.switches);
            rollouts.push(Rollout {
                prompt_id: p.id,
                prompt_tokens: prompt.clone(),
                reward: score,
                extrinsic: score,
                intrinsic: 0.0,
                response_tokens: c.tokens,
                logprobs: (!model.config().is_diffusion()).then_some(c.logprobs),
                loss_mask: Vec::new(),
                captions: Vec::new(),
                version,
                switches,
                finish: c.finish,
            });
        }
        groups.push(Group { prompt_id: p.id, work_id: 0, rollouts, trace: None, generate_s: 0.0 });
    }
    Ok(Collected { groups, generate_s })
}

/// A rollout's version (the one of its first token) and its later switches,
/// from the batch's starting version and the completion's switches.
fn stamp(version: u64, switches: &[(u32, u64)]) -> (u64, Vec<(u32, u64)>) {
    let first = switches.iter().take_while(|s| s.0 == 0).last().map_or(version, |s| s.1);
    (first, switches.iter().copied().filter(|s| s.0 > 0).collect())
}

/// One completion per prompt id list: autoregressive with stop ids and stop
/// strings, or a diffusion policy's fixed-length response (no behaviour
/// log-probs: BGPO recomputes the ELBO of the sampling policy; never interrupted).
fn sample(
    model: &Model,
    tokenizer: &Tokenizer,
    prompts: &[Vec<i64>],
    sampling: &SamplingParams,
    rng: &mut ChaCha8Rng,
    interrupt: Option<Interrupt>,
) -> Result<Vec<Completion>> {
    if !model.config().is_diffusion() {
        let until = |_: usize, t: &[i64]| completes_stop(tokenizer, sampling, t);
        return generate_continuous(model, prompts, sampling, tokenizer.pad_id(), rng, &until, interrupt);
    }
    let eos = tokenizer.eos_id();
    Ok(crate::diffusion::generate(model, prompts, &sampling.diffusion(), tokenizer.pad_id(), rng)?
        .into_iter()
        .map(|tokens| {
            let finish = if tokens.contains(&eos) { FinishReason::Stop } else { FinishReason::Length };
            Completion { logprobs: Vec::new(), tokens, finish, switches: Vec::new() }
        })
        .collect())
}

/// The text a verifier scores: the response up to its first stop token (a
/// diffusion response may go on after it), cut at the first stop string.
pub fn response_text(tokenizer: &Tokenizer, sampling: &SamplingParams, tokens: &[i64]) -> Result<String> {
    let end = tokens.iter().position(|t| tokenizer.stop_ids().contains(t)).unwrap_or(tokens.len());
    Ok(sampling.cut_at_stop(&tokenizer.decode(&tokens[..end])?).to_string())
}

/// A prompt as the policy saw it and the completion it gave.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The rendered prompt (chat template applied when the tokenizer's prompts are chat).
    pub prompt: String,
    /// The response text ([`response_text`]).
    pub text: String,
    pub completion: Completion,
}

/// One completion of each problem's prompt, rendered as in training (no
/// verifier runs): `sluice generate`, and the samples shown with evaluations.
pub fn complete(
    model: &Model,
    tokenizer: &Tokenizer,
    problems: &[Problem],
    sampling: &SamplingParams,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Sample>> {
    let rendered = problems.iter().map(|p| tokenizer.render_problem(p)).collect::<Result<Vec<_>, _>>()?;
    let prompts = problems.iter().map(|p| tokenizer.encode_problem(p)).collect::<Result<Vec<_>, _>>()?;
    let completions = sample(model, tokenizer, &prompts, sampling, rng, None)?;
    rendered
        .into_iter()
        .zip(completions)
        .map(|(prompt, completion)| {
            Ok(Sample { prompt, text: response_text(tokenizer, sampling, &completion.tokens)?, completion })
        })
        .collect()
}

/// Samples `sizes[i]` rollouts of problem `i` of `task` (the group sizes:
/// uniform, or from a budget allocation): one completion each for single-turn
/// tasks ([`collect_groups`]), whole episodes for multi-turn ones ([`collect_episodes`]).
#[allow(clippy::too_many_arguments)]
pub fn collect(
    model: &Model,
    tokenizer: &Tokenizer,
    task: &dyn Task,
    problems: &[Problem],
    sizes: &[usize],
    sampling: &SamplingParams,
    version: u64,
    rng: &mut ChaCha8Rng,
    interrupt: Option<Interrupt>,
) -> Result<Collected> {
    if problems.first().is_some_and(|p| task.episode(p).is_some()) {
        collect_episodes(model, tokenizer, task, problems, sizes, sampling, version, rng, interrupt)
    } else {
        collect_groups(model, tokenizer, problems, sizes, sampling, version, rng, interrupt)
    }
}

/// True when the newest tokens complete one of the stop strings: the last few
/// tokens (one more than the longest stop string has characters) are decoded.
fn completes_stop(tokenizer: &Tokenizer, sampling: &SamplingParams, tokens: &[i64]) -> bool {
    let Some(longest) = sampling.stop.iter().map(|s| s.chars().count()).max() else {
        return false;
    };
    let tail = &tokens[tokens.len().saturating_sub(longest + 1)..];
    tokenizer.decode(tail).is_ok_and(|text| sampling.stop.iter().any(|s| text.contains(s.as_str())))
}

fn check_sizes(problems: &[Problem], sizes: &[usize]) -> Result<()> {
    if sizes.len() != problems.len() || sizes.contains(&0) {
        return Err(Error::task(format!("{} group sizes for {} problems (each >= 1)", sizes.len(), problems.len())));
    }
    Ok(())
}

/// Plays `sizes[i]` episodes of problem `i`'s environment, all episodes in
/// one batch: each turn samples an action (up to `sampling.max_new_tokens`
/// tokens) for every episode still running, steps its environment and appends
/// the observation. The response interleaves action tokens (trained on, with
/// their behaviour log-probs) and observation tokens (`loss_mask` false,
/// log-prob 0). The reward is the sum of the environment's rewards; an episode
/// that ends by itself finishes with `Stop`, one cut at `max_turns` with `Length`.
#[allow(clippy::too_many_arguments)]
pub fn collect_episodes(
    model: &Model,
    tokenizer: &Tokenizer,
    task: &dyn Task,
    problems: &[Problem],
    sizes: &[usize],
    sampling: &SamplingParams,
    version: u64,
    rng: &mut ChaCha8Rng,
    mut interrupt: Option<Interrupt>,
) -> Result<Collected> {
    check_sizes(problems, sizes)?;
    struct Live {
        env: Box<dyn Episode>,
        context: Vec<i64>,
        rollout: Rollout,
        done: bool,
    }
    let mut live = Vec::with_capacity(sizes.iter().sum());
    for (p, &n) in problems.iter().zip(sizes) {
        let prompt = tokenizer.encode_problem(p)?;
        for _ in 0..n {
            let env = task.episode(p).ok_or_else(|| Error::task(format!("{} is not a multi-turn task", task.name())))?;
            live.push(Live {
                env,
                context: prompt.clone(),
                rollout: Rollout {
                    prompt_id: p.id,
                    prompt_tokens: prompt.clone(),
                    response_tokens: Vec::new(),
                    logprobs: Some(Vec::new()),
                    loss_mask: Vec::new(),
                    captions: Vec::new(),
                    reward: 0.0,
                    extrinsic: 0.0,
                    intrinsic: 0.0,
                    version,
                    switches: Vec::new(),
                    finish: FinishReason::Length,
                },
                done: false,
            });
        }
    }
    let mut generate_s = 0.0;
    // The version the weights hold now (the interrupt may move it between turns too).
    let mut current = version;
    for _ in 0..task.max_turns() {
        let running: Vec<usize> = (0..live.len()).filter(|&i| !live[i].done).collect();
        if running.is_empty() {
            break;
        }
        let contexts: Vec<Vec<i64>> = running.iter().map(|&i| live[i].context.clone()).collect();
        let t0 = Instant::now();
        let until = |_: usize, t: &[i64]| completes_stop(tokenizer, sampling, t);
        let mut this_turn = || interrupt.as_mut().and_then(|f| f());
        let actions = generate_continuous(model, &contexts, sampling, tokenizer.pad_id(), rng, &until, Some(&mut this_turn))?;
        generate_s += t0.elapsed().as_secs_f64();
        let turn_version = current;
        current = actions.iter().flat_map(|a| a.switches.iter().map(|s| s.1)).max().unwrap_or(current).max(current);
        for (&i, action) in running.iter().zip(actions) {
            let l = &mut live[i];
            // This turn's switches, as positions in the whole response.
            let at = l.rollout.response_tokens.len() as u32;
            let mut v = l.rollout.switches.last().map_or(l.rollout.version, |s| s.1);
            let (start, switches) = stamp(turn_version, &action.switches);
            for (k, sv) in std::iter::once((0, start)).chain(switches) {
                if sv > v {
                    if at + k == 0 {
                        l.rollout.version = sv;
                    } else {
                        l.rollout.switches.push((at + k, sv));
                    }
                    v = sv;
                }
            }
            let turn = l.env.step(sampling.cut_at_stop(&tokenizer.decode(&action.tokens)?));
            let observation = tokenizer.encode(&turn.observation)?;
            let r = &mut l.rollout;
            r.loss_mask.extend(std::iter::repeat_n(true, action.tokens.len()));
            r.loss_mask.extend(std::iter::repeat_n(false, observation.len()));
            let logprobs = r.logprobs.get_or_insert_with(Vec::new);
            logprobs.extend(&action.logprobs);
            logprobs.extend(std::iter::repeat_n(0.0, observation.len()));
            r.response_tokens.extend(&action.tokens);
            r.response_tokens.extend(&observation);
            l.context.extend(&action.tokens);
            l.context.extend(&observation);
            r.reward += turn.reward;
            r.extrinsic += turn.reward;
            r.captions.extend(turn.captions);
            if turn.done {
                l.done = true;
                r.finish = FinishReason::Stop;
            }
        }
    }
    let mut groups: Vec<Group> = Vec::with_capacity(problems.len());
    let mut it = live.into_iter();
    for (p, &n) in problems.iter().zip(sizes) {
        groups.push(Group { prompt_id: p.id, work_id: 0, rollouts: it.by_ref().take(n).map(|l| l.rollout).collect(), trace: None, generate_s: 0.0 });
    }
    Ok(Collected { groups, generate_s })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::config::AdventureConfig;
    use crate::hf::Policy;
    use crate::model::ModelConfig;
    use sluice_core::tasks::{Adventure, Split};
    use rand::SeedableRng;

    /// A row ends at the token that completes a stop string, and only there.
    /// A rollout's version is its first token's; later switches stay as they are.
    #[test]
    fn rollouts_are_stamped_with_the_version_of_their_first_token() {
        assert_eq!(stamp(4, &[]), (4, vec![]));
        assert_eq!(stamp(4, &[(3, 5), (8, 6)]), (4, vec![(3, 5), (8, 6)]));
        assert_eq!(stamp(4, &[(0, 5), (8, 6)]), (5, vec![(8, 6)]));
    }

    #[test]
    fn stop_strings_end_rows_where_they_complete() {
        let tok = Tokenizer::char_level(sluice_core::tokenizer::DEFAULT_ALPHABET).unwrap();
        let cfg = ModelConfig::preset("tiny", tok.vocab_size()).unwrap();
        let policy = Policy::random(&cfg, tch::Device::Cpu, tch::Kind::Float, 5);
        let cfg_a = sluice_core::config::ArithmeticConfig { digits: 1, operands: 2, operators: vec!['+'], seed: 0, train_size: 0 };
        let task = sluice_core::tasks::Arithmetic::new(cfg_a).unwrap();
        let problems: Vec<Problem> = (0..8).map(|i| task.problem(Split::Train, i)).collect();
        let stop = vec!["ab".to_string(), "7".to_string(), "= ".to_string()];
        let sampling = SamplingParams { max_new_tokens: 48, stop: stop.clone(), ..Default::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let c = collect_groups(policy.model(), &tok, &problems, &[4; 8], &sampling, 0, &mut rng, None).unwrap();
        let has_stop = |t: &str| stop.iter().any(|s| t.contains(s.as_str()));
        let mut stopped = 0;
        for r in c.groups.iter().flat_map(|g| &g.rollouts) {
            let n = r.response_tokens.len();
            let text = tok.decode(&r.response_tokens).unwrap();
            assert!(!has_stop(&tok.decode(&r.response_tokens[..n - 1]).unwrap()), "went on past a stop string: {text:?}");
            match r.finish {
                FinishReason::Stop if r.response_tokens[n - 1] != tok.eos_id() => {
                    assert!(has_stop(&text), "stopped without a stop string: {text:?}");
                    stopped += 1;
                }
                FinishReason::Length => assert!(!has_stop(&text) && n == 48, "{text:?}"),
                _ => {}
            }
        }
        assert!(stopped > 0, "no row hit a stop string; the test needs another seed");
        assert_eq!(sampling.cut_at_stop("x = 12ab7"), "x ", "the earliest stop string cuts");
        assert_eq!(sampling.cut_at_stop("1+2"), "1+2");
    }

    #[test]
    fn episodes_interleave_masked_observations_with_sampled_actions() {
        let tok = Tokenizer::char_level(sluice_core::tokenizer::DEFAULT_ALPHABET).unwrap();
        let cfg = ModelConfig::preset("tiny", tok.vocab_size()).unwrap();
        let policy = Policy::random(&cfg, tch::Device::Cpu, tch::Kind::Float, 0);
        let task = Adventure::new(AdventureConfig { rooms: 3, max_turns: 5, layouts: 0, seed: 2 }).unwrap();
        let problems: Vec<Problem> = (0..2).map(|i| task.problem(Split::Train, i)).collect();
        let sampling = SamplingParams { max_new_tokens: 1, ..Default::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let c = collect(policy.model(), &tok, &task, &problems, &[3, 2], &sampling, 4, &mut rng, None).unwrap();
        assert_eq!(c.groups.iter().map(|g| g.rollouts.len()).collect::<Vec<_>>(), vec![3, 2]);
        for r in c.groups.iter().flat_map(|g| &g.rollouts) {
            let n = r.response_tokens.len();
            let logprobs = r.logprobs.as_ref().expect("an autoregressive policy has behaviour log-probs");
            assert_eq!((logprobs.len(), r.loss_mask.len()), (n, n));
            let actions = r.loss_mask.iter().filter(|&&m| m).count();
            // One token per action; every action yields one caption; 5 turns unless the goal was reached.
            assert_eq!(actions, r.captions.len());
            assert!(actions == 5 || r.finish == FinishReason::Stop, "{actions} actions, {:?}", r.finish);
            for (k, &m) in r.loss_mask.iter().enumerate() {
                if m {
                    assert!(logprobs[k] < 0.0 && logprobs[k].is_finite());
                } else {
                    assert_eq!(logprobs[k], 0.0);
                }
            }
            // Replaying the actions in a fresh world gives the same captions and reward.
            let mut world = task.world(&problems.iter().find(|p| p.id == r.prompt_id).unwrap().clone());
            let mut replay = Vec::new();
            let mut reward = 0.0;
            for (k, &m) in r.loss_mask.iter().enumerate() {
                if m {
                    let t = sluice_core::tasks::Episode::step(&mut world, &tok.decode(&[r.response_tokens[k]]).unwrap());
                    replay.extend(t.captions);
                    reward += t.reward;
                }
            }
            assert_eq!((replay, reward), (r.captions.clone(), r.reward));
            assert_eq!(r.version, 4);
        }
    }
}
