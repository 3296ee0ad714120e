//! The trainer on hand-made groups: data parallelism, non-finite losses,
//! environment-token masks, knapsack history in checkpoints.

use super::*;
use tch::Tensor;
use sluice_core::rollout::FinishReason;
use sluice_core::rollout::Rollout;

fn trainer(dir: &Path) -> Trainer {
    let text = format!(
        "[model]\npreset = \"tiny\"\ndevice = \"cpu\"\n[task]\nkind = \"arithmetic\"\n[train]\nout_dir = \"{}\"\n",
        dir.display()
    );
    Trainer::new(JobConfig::from_toml(&text).unwrap(), false).unwrap()
}

fn params(t: &Trainer) -> Vec<Tensor> {
    t.policy().named_parameters().into_iter().map(|(_, p)| p.detach().copy()).collect()
}

/// A group of two rollouts of prompt [5, 6, 7] with rewards 1 and 0.
fn pair(response: &[i64], logprobs: &[f32], loss_mask: &[bool]) -> Group {
    let r = |reward| Rollout {
        prompt_id: 0,
        prompt_tokens: vec![5, 6, 7],
        response_tokens: response.to_vec(),
        logprobs: Some(logprobs.to_vec()),
        loss_mask: loss_mask.to_vec(),
        captions: vec![],
        switches: Vec::new(),
        reward,
        extrinsic: reward,
        intrinsic: 0.0,
        version: 0,
        finish: FinishReason::Stop,
    };
    Group { prompt_id: 0, work_id: 0, rollouts: vec![r(1.0), r(0.0)], trace: None, generate_s: 0.0 }
}

fn group(logprob: f32) -> Group {
    pair(&[8, 1], &[logprob, logprob], &[])
}

/// Diffusion-policy rollouts in groups of uneven (knapsack) sizes.
fn diffusion_groups() -> Vec<Group> {
    [2usize, 6, 4, 4]
        .iter()
        .enumerate()
        .map(|(g, &n)| {
            let rollouts = (0..n)
                .map(|i| {
                    let reward = ((g * 3 + i) % 4) as f64 / 3.0;
                    Rollout {
                        prompt_id: g as u64,
                        prompt_tokens: vec![5 + g as i64, 6],
                        response_tokens: vec![8 + (i % 3) as i64, 9, 10 + (i % 4) as i64, 1],
                        logprobs: None,
                        loss_mask: vec![],
                        captions: vec![],
                        switches: Vec::new(),
                        reward,
                        extrinsic: reward,
                        intrinsic: 0.0,
                        version: 0,
                        finish: FinishReason::Length,
                    }
                })
                .collect();
            Group { prompt_id: g as u64, work_id: 0, rollouts, trace: None, generate_s: 0.0 }
        })
        .collect()
}

#[test]
fn bgpo_on_two_ranks_equals_one_rank_with_uneven_groups() {
    use crate::collective::TcpCollective;
    let dir = tempfile::tempdir().unwrap();
    // adam_eps = 1: the first update is ~lr·g, so equal gradients give equal weights.
    let cfg = |name: &str| {
        JobConfig::from_toml(&format!(
            "algorithm = \"bgpo\"\n[model]\npreset = \"tiny-diffusion\"\ndevice = \"cpu\"\n[task]\nkind = \"arithmetic\"\n\
             [sampling]\nmax_new_tokens = 4\n[bgpo]\nmc_samples = 3\n\
             [train]\nprompts_per_step = 4\nmicro_batch_size = 5\nlr = 0.01\nadam_eps = 1.0\nout_dir = \"{}\"\n",
            dir.path().join(name).display()
        ))
        .unwrap()
    };
    let groups = diffusion_groups();
    let mut one = Trainer::new(cfg("one"), false).unwrap();
    let start = sluice_model::weights::encode(&one.engine.policy.named_parameters(), tch::Kind::Float).unwrap();
    let names: Vec<String> = one.engine.policy.named_parameters().into_iter().map(|(n, _)| n).collect();
    let before = params(&one);
    let m1 = one.step_on(&groups).unwrap();
    assert!(m1.grad_norm > 0.0 && m1.skipped_updates == 0, "{m1:?}");
    let want = params(&one);

    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let (addr, start, cfg) = (addr.clone(), start.clone(), cfg(&format!("rank{rank}")));
            let mine: Vec<Group> = groups[rank * 2..rank * 2 + 2].to_vec();
            std::thread::spawn(move || {
                let comm = TcpCollective::connect(rank, 2, &addr, &crate::collective::GroupAuth::default(), std::time::Duration::from_secs(30)).unwrap();
                let mut t = Trainer::with_collective(cfg, false, Box::new(comm)).unwrap();
                let named = sluice_model::weights::decode(&start).unwrap().into_iter().collect();
                t.engine.policy.set_parameters(named, Path::new("test")).unwrap();
                t.step_on(&mine).unwrap();
                params(&t).into_iter().map(|p| Vec::<f32>::try_from(p.reshape([-1])).unwrap()).collect::<Vec<_>>()
            })
        })
        .collect();
    let ranks: Vec<Vec<Vec<f32>>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut moved = 0.0f32;
    for (k, w) in want.iter().enumerate() {
        let w = Vec::<f32>::try_from(w.reshape([-1])).unwrap();
        let b = Vec::<f32>::try_from(before[k].reshape([-1])).unwrap();
        for r in &ranks {
            for ((x, y), z) in r[k].iter().zip(&w).zip(&b) {
                assert!((x - y).abs() < 1e-6, "{}: rank {x} vs one-rank {y}", names[k]);
                moved = moved.max((y - z).abs());
            }
        }
    }
    assert!(moved > 1e-4, "the update changed the weights ({moved})");
}

#[test]
fn non_finite_loss_skips_the_update_and_keeps_weights() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(dir.path());
    let before = params(&t);
    let m = t.train_on(&[group(f32::NAN)]).unwrap();
    assert_eq!(m.skipped_updates, 1);
    assert_eq!(t.state().optimizer_t, 0);
    for (a, b) in before.iter().zip(params(&t)) {
        assert!(a.equal(&b), "weights changed on a skipped step");
    }
    // A finite batch afterwards trains normally.
    let m = t.train_on(&[group(-3.0)]).unwrap();
    assert_eq!((m.skipped_updates, t.state().optimizer_t), (0, 1));
    assert!(before.iter().zip(params(&t)).any(|(a, b)| !a.equal(&b)));
}

/// An episode's response: action, two environment tokens, action.
fn episode(env_logprob: f32, mask: bool) -> Group {
    let mask: &[bool] = if mask { &[true, false, false, true] } else { &[] };
    pair(&[8, 20, 21, 1], &[-1.0, env_logprob, env_logprob, -1.5], mask)
}

#[test]
fn environment_tokens_are_masked_out_of_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    // Every run starts from the same weights (random init reads libtorch's global
    // RNG, which tests running in parallel share).
    let base = trainer(dir.path());
    let updated = |g: Group| {
        let mut t = trainer(dir.path());
        t.engine.policy.copy_from(base.policy()).unwrap();
        t.train_on(&[g]).unwrap();
        params(&t)
    };
    // Whatever the (meaningless) log-probs of environment tokens, the update is the same...
    let a = updated(episode(0.0, true));
    let b = updated(episode(-9.0, true));
    for (x, y) in a.iter().zip(&b) {
        assert!(x.equal(y), "masked tokens changed the update");
    }
    // ...while training on them too (no mask) gives another update.
    let c = updated(episode(-9.0, false));
    assert!(a.iter().zip(&c).any(|(x, y)| !x.equal(y)), "the mask made no difference");
}

#[test]
fn knapsack_history_survives_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[model]\npreset = \"tiny\"\ndevice = \"cpu\"\n[task]\nkind = \"arithmetic\"\ntrain_size = 4\n\
         [sampling]\nmax_new_tokens = 2\n[grpo]\ngroup_size = 4\n[train]\nprompts_per_step = 4\nout_dir = \"{}\"\n\
         [budget]\nstrategy = \"knapsack\"\nmin_outcomes = 4\nn_up = 8\n",
        dir.path().display()
    );
    let cfg = JobConfig::from_toml(&text).unwrap();
    let mut t = Trainer::new(cfg.clone(), false).unwrap();
    let problems: Vec<Problem> = (0..4).map(|i| t.task.problem(Split::Train, i)).collect();
    assert_eq!(t.budget(&problems), vec![4; 4], "no history yet: the default N");
    t.grpo_step().unwrap();
    let rates: Vec<Option<f64>> = problems.iter().map(|p| t.history.rate(p.id, 4)).collect();
    assert!(rates.iter().all(Option::is_some), "every prompt has 4 outcomes: {rates:?}");
    let budget = t.budget(&problems);
    assert_eq!(budget.iter().sum::<usize>(), 16);
    t.save_checkpoint().unwrap();
    let resumed = Trainer::new(cfg, true).unwrap();
    assert_eq!(resumed.history, t.history);
    assert_eq!(resumed.budget(&problems), budget);
}

#[test]
fn equal_rewards_give_no_effective_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(dir.path());
    let mut g = group(-2.0);
    g.rollouts[1].reward = 1.0;
    let m = t.train_on(&[g, group(-2.0)]).unwrap();
    assert!((m.effective_gradient_ratio - 0.5).abs() < 1e-12);
}

/// NuRL hints: a prompt that failed every rollout is sampled next time with
/// its hint in the prompt tokens; that group's outcomes go to the hint
/// history, not the prompt's own (so it stays unsolved for budgets and hints);
/// without hints the same prompt is shown as it was.
#[test]
fn all_fail_prompts_get_a_hint_and_their_outcomes_are_kept_apart() {
    let dir = tempfile::tempdir().unwrap();
    let text = |enabled: bool| {
        format!(
            "[model]\npreset = \"tiny\"\ndevice = \"cpu\"\n[task]\nkind = \"arithmetic\"\n[sampling]\nmax_new_tokens = 3\n\
             [hints]\nenabled = {enabled}\nmin_outcomes = 4\ntemplate = \"HINT {{answer_len}} {{answer_first}}\"\n\
             [train]\nout_dir = \"{}\"\n",
            dir.path().display()
        )
    };
    for enabled in [true, false] {
        let mut t = Trainer::new(JobConfig::from_toml(&text(enabled)).unwrap(), false).unwrap();
        let problem = t.next_problems(1).remove(0);
        // Four failures on record: the prompt is all-fail.
        t.history.record(problem.id, [0.0; 4]);
        let mut rng = rng_for(1, 0, 0);
        let (groups, _) = t.collect(std::slice::from_ref(&problem), &mut rng).unwrap();
        let plain = t.tokenizer.encode_problem(&problem).unwrap();
        let hinted = t.tokenizer.encode_problem(&problem.with_hint("HINT {answer_len} {answer_first}")).unwrap();
        let shown = &groups[0].rollouts[0].prompt_tokens;
        assert!(t.all_fail_ever().contains(&problem.id));
        if enabled {
            assert_eq!(shown, &hinted, "the hinted prompt is what was sampled");
            assert_eq!(t.history().outcomes(problem.id), vec![0.0; 4], "hinted outcomes stay out of the prompt's history");
            assert_eq!(t.hint_history.outcomes(problem.id).len(), groups[0].rollouts.len());
            assert_eq!(t.hinted_now[0], 1.0);
        } else {
            assert_eq!(shown, &plain);
            assert_eq!(t.history().outcomes(problem.id).len(), 4 + groups[0].rollouts.len());
            assert_eq!(t.hinted_now[0], 0.0);
        }
    }
}

/// Dynamic reward weights through a real step: every rollout is correct (that
/// component is saturated: zero advantage, zero gradient) while their lengths
/// differ (brevity still has a gradient), so the step's weights move toward
/// brevity — and the new weights are in the checkpoint.
#[test]
fn dynamic_weights_move_toward_the_component_that_still_has_a_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[model]\npreset = \"tiny\"\ndevice = \"cpu\"\n[task]\nkind = \"arithmetic\"\n[sampling]\nmax_new_tokens = 4\n\
         [reward]\nweights = {{ correct = 1.0, short = 1.0 }}\ndynamic = true\ndynamic_scale = 0.001\n[train]\nout_dir = \"{}\"\n",
        dir.path().display()
    );
    let mut t = Trainer::new(JobConfig::from_toml(&text).unwrap(), false).unwrap();
    let mut g = pair(&[8, 1, 3], &[-0.7, -0.4, -1.1], &[]);
    g.rollouts[1].response_tokens = vec![8];
    g.rollouts[1].logprobs = Some(vec![-0.7]);
    for r in &mut g.rollouts {
        r.extrinsic = 1.0;
    }
    let m = t.train_on(&[g]).unwrap();
    let (c, s) = (m.reward_weights["correct"], m.reward_weights["short"]);
    assert!(s > 0.5 && c < 0.5 && (c + s - 1.0).abs() < 1e-9, "correct {c}, short {s}");
    let saved = t.save_checkpoint().unwrap();
    let back = checkpoint::read_reward_weights(&saved).unwrap();
    assert!((back["short"] - s).abs() < 1e-12);
}
