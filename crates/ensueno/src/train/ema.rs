//! Exponential moving average of model weights, the weights diffusion
//! models are sampled with.
//!
//! As diffusers' `training_utils.EMAModel` (with `use_ema_warmup=False`):
//! the decay at update `n` (1-based) is `min(decay, (1 + n) / (10 + n))`, so
//! early averages are not dominated by the random initialisation.

use std::collections::HashMap;

use candle_core::Tensor;

use super::ParamStore;
use crate::{Error, Result};

/// Shadow copies of a [`ParamStore`]'s variables.
#[derive(Debug, Clone)]
pub struct Ema {
    decay: f64,
    updates: usize,
    shadow: Vec<(String, Tensor)>,
}

impl Ema {
    /// Starts from the current weights of `params`.
    pub fn new(params: &ParamStore, decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            return Err(Error::invalid(format!(
                "EMA decay must be in [0, 1), got {decay}"
            )));
        }
        let shadow = params
            .tensors()
            .into_iter()
            // Detached: a copy of a variable would record the op, and every
            // update would then extend a graph that holds all past shadows.
            .map(|(k, t)| Ok((k, t.detach().copy()?.detach())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            decay,
            updates: 0,
            shadow,
        })
    }

    /// The decay used by the next update.
    pub fn current_decay(&self) -> f64 {
        let n = (self.updates + 1) as f64;
        self.decay.min((1. + n) / (10. + n))
    }

    /// Moves the shadow weights toward the current ones.
    pub fn update(&mut self, params: &ParamStore) -> Result<()> {
        let d = self.current_decay();
        let current = params.tensors();
        if current.len() != self.shadow.len() {
            return Err(Error::invalid("EMA: the set of parameters changed"));
        }
        for ((name, s), (cname, p)) in self.shadow.iter_mut().zip(current) {
            if *name != cname {
                return Err(Error::invalid(format!(
                    "EMA: expected parameter '{name}', found '{cname}'"
                )));
            }
            // s = d * s + (1 - d) * p, as one fused affine pair.
            *s = ((&*s * d)? + (p.detach() * (1. - d))?)?.detach();
        }
        self.updates += 1;
        Ok(())
    }

    /// The averaged weights, by parameter name.
    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.shadow
    }

    pub fn updates(&self) -> usize {
        self.updates
    }

    /// For checkpoints: the shadow weights under `prefix` plus the update
    /// count.
    pub fn state(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<_> = self
            .shadow
            .iter()
            .map(|(k, t)| (format!("{prefix}{k}"), t.clone()))
            .collect();
        out.push((
            format!("{prefix}__updates"),
            Tensor::new(&[self.updates as i64], &candle_core::Device::Cpu)?,
        ));
        Ok(out)
    }

    /// Restores [`Ema::state`].
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, prefix: &str) -> Result<()> {
        let mut loaded = Vec::with_capacity(self.shadow.len());
        for (name, s) in &self.shadow {
            let key = format!("{prefix}{name}");
            let t = state
                .get(&key)
                .ok_or_else(|| Error::invalid(format!("checkpoint has no EMA tensor '{key}'")))?;
            if t.dims() != s.dims() {
                return Err(Error::Shape {
                    what: format!("EMA tensor '{key}'"),
                    expected: format!("{:?}", s.dims()),
                    got: format!("{:?}", t.dims()),
                });
            }
            loaded.push(t.to_dtype(s.dtype())?.to_device(s.device())?.detach());
        }
        let updates = state
            .get(&format!("{prefix}__updates"))
            .ok_or_else(|| Error::invalid("checkpoint has no EMA update count"))?
            .flatten_all()?
            .to_vec1::<i64>()?;
        self.updates = updates.first().copied().unwrap_or(0).max(0) as usize;
        for ((_, s), t) in self.shadow.iter_mut().zip(loaded) {
            *s = t;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn shadows_hold_no_graph_and_follow_the_decay() -> Result<()> {
        let store = ParamStore::new(0);
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        vb.get_with_hints(3, "w", candle_nn::Init::Const(1.))?;
        let mut ema = Ema::new(&store, 0.5)?;
        store.vars()[0]
            .1
            .set(&Tensor::new(&[3f32, 3., 3.], &Device::Cpu)?)?;
        // First update: decay min(0.5, 2/11) = 2/11.
        ema.update(&store)?;
        let d = 2. / 11.;
        let v = ema.tensors()[0].1.to_vec1::<f32>()?;
        assert!((v[0] as f64 - (d + 3. * (1. - d))).abs() < 1e-6);
        // A graph would keep every past shadow alive (and leak memory).
        assert!(!ema.tensors()[0].1.track_op());
        Ok(())
    }
}
