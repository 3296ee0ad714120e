//! The supervised warm-up: maximum likelihood on task demonstrations (prompt →
//! answer + EOS) before RL.
//!
//! * Autoregressive policies: mean negative log-likelihood of the response
//!   tokens, normalised by the response tokens of the whole batch over all ranks.
//! * Masked diffusion policies: the negative ELBO of the demonstration (one
//!   Monte Carlo sample each, as in LLaDA's supervised fine-tuning, arXiv
//!   2502.09992; responses padded with EOS to the sampler's fixed length), per
//!   response token.

use sluice_core::config::JobConfig;
use sluice_model::diffusion::{elbo, McSample};
use tch::{Kind, Tensor};

use crate::engine::{rng_for, Batch, Engine, Row};
use crate::error::Result;
use crate::optim::StepReport;

/// Supervised fine-tuning loss: negative log-likelihood over the masked target
/// tokens, normalised by `tokens` (the batch total over all ranks).
pub fn sft_loss(logp: &Tensor, mask: &Tensor, tokens: f64) -> Tensor {
    -(logp * mask).sum(Kind::Float) / tokens.max(1.0)
}

/// The warm-up's update rule.
#[derive(Debug, Clone)]
pub struct Sft {
    micro_batch_size: usize,
    max_grad_norm: f64,
    lr: f64,
    /// `Some(response length)` for a diffusion policy.
    diffusion_len: Option<usize>,
    eos: i64,
}

impl Sft {
    pub fn new(job: &JobConfig, diffusion: bool, eos: i64) -> Self {
        Sft {
            micro_batch_size: job.train.micro_batch_size.max(1),
            max_grad_norm: job.train.max_grad_norm,
            lr: job.train.sft_lr,
            diffusion_len: diffusion.then_some(job.sampling.max_new_tokens as usize),
            eos,
        }
    }

    /// One optimizer step on this rank's demonstrations `(prompt, response +
    /// EOS)`; every rank calls it once per warm-up step. Returns the loss summed
    /// over ranks and the engine's step report. `seed` and `sft_step` key the
    /// diffusion ELBO's samples.
    pub fn step(&self, engine: &mut Engine, data: &[(Vec<i64>, Vec<i64>)], seed: u64, sft_step: u64) -> Result<(f64, StepReport)> {
        let mut tokens = [data.iter().map(|(_, r)| r.len() as f64).sum::<f64>()];
        engine.all_reduce(&mut tokens)?;
        engine.opt.cfg.lr = self.lr;
        let (loss_sum, finite) = match self.diffusion_len {
            Some(len) => self.diffusion_loss(engine, data, tokens[0], len, seed, sft_step)?,
            None => self.autoregressive_loss(engine, data, tokens[0]),
        };
        let report = engine.step(finite, self.max_grad_norm)?;
        let mut loss = [loss_sum];
        engine.all_reduce(&mut loss)?;
        Ok((loss[0], report))
    }

    /// Accumulates gradients micro-batch by micro-batch; (loss, all finite).
    fn autoregressive_loss(&self, engine: &Engine, data: &[(Vec<i64>, Vec<i64>)], tokens: f64) -> (f64, bool) {
        let rows: Vec<Row> = data
            .iter()
            .map(|(p, r)| Row { prompt: p, response: r, old_logp: None, loss_mask: &[], advantage: 0.0 })
            .collect();
        let mut loss_sum = 0.0;
        for micro in rows.chunks(self.micro_batch_size) {
            let micro: Vec<&Row> = micro.iter().collect();
            let batch = Batch::new(&micro, engine.pad, engine.policy.device());
            let logp = engine.train_logprobs(&batch, 1.0);
            let loss = sft_loss(&logp.logp, &batch.mask, tokens);
            let v = loss.double_value(&[]);
            if !v.is_finite() {
                return (loss_sum, false);
            }
            logp.backward(&engine.policy, &loss);
            loss_sum += v;
        }
        (loss_sum, true)
    }

    fn diffusion_loss(
        &self,
        engine: &Engine,
        data: &[(Vec<i64>, Vec<i64>)],
        tokens: f64,
        len: usize,
        seed: u64,
        sft_step: u64,
    ) -> Result<(f64, bool)> {
        let (rank, _) = engine.rank();
        let mut rng = rng_for(seed, (3 << 8) | rank as u64, sft_step);
        let mut loss_sum = 0.0;
        for chunk in data.chunks(self.micro_batch_size) {
            let prompts: Vec<Vec<i64>> = chunk.iter().map(|(p, _)| p.clone()).collect();
            let responses: Vec<Vec<i64>> = chunk
                .iter()
                .map(|(_, r)| r.iter().copied().chain(std::iter::repeat(self.eos)).take(len).collect())
                .collect();
            let samples: Vec<McSample> = responses.iter().map(|r| McSample::draw(r.len(), &mut rng)).collect();
            let l = elbo(engine.policy.model(), &prompts, &responses, &samples.iter().collect::<Vec<_>>(), engine.pad)?;
            let loss = -l.sum(Kind::Float) / tokens.max(1.0);
            let v = loss.double_value(&[]);
            if !v.is_finite() {
                return Ok((loss_sum, false));
            }
            loss.backward();
            loss_sum += v;
        }
        Ok((loss_sum, true))
    }
}
