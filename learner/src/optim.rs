//! AdamW (Loshchilov & Hutter, arXiv 1711.05101, Algorithm 2) with state we own,
//! so it can be checkpointed and restored exactly, and global-norm gradient clipping.
//!
//! Moments are kept in fp32. Parameters stored in a lower precision (bf16) get an
//! fp32 master copy that the update is applied to, then copied back.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

struct Slot {
    param: Tensor,
    m: Tensor,
    v: Tensor,
    master: Option<Tensor>,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    slots: BTreeMap<String, Slot>,
    /// Completed optimizer steps (t in the paper).
    pub t: i64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW").field("cfg", &self.cfg).field("t", &self.t).field("params", &self.slots.len()).finish()
    }
}

/// Outcome of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// True when the gradient (or loss) was not finite and the step was skipped.
    pub skipped: bool,
}

impl AdamW {
    /// Tracks the given named parameters (shallow clones of the var store's tensors).
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, p)| {
                let zeros = || Tensor::zeros(p.size(), (Kind::Float, p.device()));
                let master = (p.kind() != Kind::Float).then(|| p.detach().to_kind(Kind::Float));
                (name, Slot { m: zeros(), v: zeros(), master, param: p })
            })
            .collect();
        AdamW { cfg, slots, t: 0 }
    }

    pub fn zero_grad(&mut self) {
        for s in self.slots.values_mut() {
            let mut g = s.param.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// Every parameter's gradient (zeros are allocated where none exists yet),
    /// in a fixed order: what data-parallel ranks all-reduce.
    pub fn grads(&mut self) -> Vec<Tensor> {
        let missing: Vec<Tensor> =
            self.slots.values().filter(|s| !s.param.grad().defined()).map(|s| s.param.sum(Kind::Float)).collect();
        if !missing.is_empty() {
            // A zero-valued backward pass is how libtorch allocates the gradients.
            (Tensor::stack(&missing, 0).sum(Kind::Float) * 0.0).backward();
        }
        self.slots.values().map(|s| s.param.grad()).collect()
    }

    /// Global gradient norm over all parameters (one host sync).
    pub fn grad_norm(&self) -> f64 {
        let norms: Vec<Tensor> = self
            .slots
            .values()
            .map(|s| s.param.grad())
            .filter(Tensor::defined)
            .map(|g| g.to_kind(Kind::Float).norm())
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        Tensor::stack(&norms, 0).norm().double_value(&[])
    }

    /// Clips gradients to `max_norm` (0 = no clipping) and applies one AdamW update,
    /// unless the gradient is not finite: then the gradients are zeroed, the
    /// parameters and moments are left untouched and the step is reported skipped.
    pub fn step(&mut self, max_norm: f64) -> StepReport {
        let grad_norm = self.grad_norm();
        if !grad_norm.is_finite() {
            self.zero_grad();
            return StepReport { grad_norm, skipped: true };
        }
        let clip = if max_norm > 0.0 && grad_norm > max_norm { max_norm / (grad_norm + 1e-6) } else { 1.0 };
        self.t += 1;
        let AdamWConfig { lr, beta1, beta2, eps, weight_decay } = self.cfg;
        let bc1 = 1.0 - beta1.powi(self.t as i32);
        let bc2 = 1.0 - beta2.powi(self.t as i32);
        tch::no_grad(|| {
            for s in self.slots.values_mut() {
                let g = s.param.grad();
                if !g.defined() {
                    continue;
                }
                let g = g.to_kind(Kind::Float);
                let g = if clip < 1.0 { g * clip } else { g };
                // m_t = b1 m + (1 - b1) g  (as a lerp towards g);  v_t = b2 v + (1 - b2) g^2
                let _ = s.m.lerp_(&g, 1.0 - beta1);
                let _ = s.v.g_mul_scalar_(beta2).addcmul_(&(&g * (1.0 - beta2)), &g);
                // theta <- theta (1 - lr wd) - lr * m_hat / (sqrt(v_hat) + eps), computed in
                // one temporary: lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
                let mut update = s.v.sqrt();
                let _ = update.g_div_scalar_(bc2.sqrt()).g_add_scalar_(eps).reciprocal_().g_mul_(&s.m).g_mul_scalar_(lr / bc1);
                let target = s.master.as_mut().unwrap_or(&mut s.param);
                let _ = target.g_mul_scalar_(1.0 - lr * weight_decay).g_sub_(&update);
                if let Some(master) = &s.master {
                    s.param.copy_(&master.to_kind(s.param.kind()));
                }
            }
        });
        self.zero_grad();
        StepReport { grad_norm, skipped: false }
    }

    /// Moments (and fp32 masters) as named tensors, for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.slots.len() * 2);
        for (name, s) in &self.slots {
            out.push((format!("m.{name}"), s.m.shallow_clone()));
            out.push((format!("v.{name}"), s.v.shallow_clone()));
            if let Some(master) = &s.master {
                out.push((format!("master.{name}"), master.shallow_clone()));
            }
        }
        out
    }

    /// Restores moments written by [`AdamW::state_tensors`].
    pub fn load_state_tensors(&mut self, tensors: Vec<(String, Tensor)>, t: i64) -> Result<()> {
        let map: BTreeMap<String, Tensor> = tensors.into_iter().collect();
        tch::no_grad(|| -> Result<()> {
            for (name, s) in self.slots.iter_mut() {
                let mut targets = vec![("m", &mut s.m), ("v", &mut s.v)];
                if let Some(master) = s.master.as_mut() {
                    targets.push(("master", master));
                }
                for (prefix, dst) in targets {
                    let key = format!("{prefix}.{name}");
                    let src = map.get(&key).ok_or_else(|| Error::Checkpoint(format!("optimizer state lacks `{key}`")))?;
                    if src.size() != dst.size() {
                        return Err(Error::Checkpoint(format!(
                            "optimizer tensor `{key}` has shape {:?}, expected {:?}",
                            src.size(),
                            dst.size()
                        )));
                    }
                    dst.copy_(&src.to_device(dst.device()).to_kind(Kind::Float));
                }
            }
            Ok(())
        })?;
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_adamw_formula_by_hand() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let cfg = AdamWConfig { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], cfg);
        // loss = sum(p^2) / 2  ->  grad = p
        (&p * &p * 0.5).sum(Kind::Float).backward();
        let r = opt.step(0.0);
        assert!(!r.skipped && (r.grad_norm - 5f64.sqrt()).abs() < 1e-6);
        // First step: m_hat = g, v_hat = g^2, update = lr * sign(g) (eps aside).
        let got = Vec::<f32>::try_from(&p.detach()).unwrap();
        let want = [1.0 * (1.0 - 0.001) - 0.1, -2.0 * (1.0 - 0.001) + 0.1];
        for (a, b) in got.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn non_finite_gradient_skips_the_step() {
        let p = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let cfg = AdamWConfig { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], cfg);
        (&p * f64::NAN).sum(Kind::Float).backward();
        let r = opt.step(1.0);
        assert!(r.skipped);
        assert_eq!(opt.t, 0);
        assert_eq!(Vec::<f32>::try_from(&p.detach()).unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let p = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        let cfg = AdamWConfig { lr: 0.0, beta1: 0.0, beta2: 0.0, eps: 1e-8, weight_decay: 0.0 };
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], cfg);
        (&p * &p * 0.5).sum(Kind::Float).backward();
        let r = opt.step(1.0);
        assert!((r.grad_norm - 5.0).abs() < 1e-6);
        // beta1 = 0: m = clipped gradient = g / 5.
        let m = Vec::<f32>::try_from(&opt.state_tensors()[0].1).unwrap();
        assert!((m[0] - 0.6).abs() < 1e-5 && (m[1] - 0.8).abs() < 1e-5, "{m:?}");
    }
}
