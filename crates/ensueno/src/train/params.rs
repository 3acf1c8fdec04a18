//! Trainable parameters with seeded, order-independent initialisation.
//!
//! candle's `VarMap` draws initial weights from the CPU's unseeded RNG, so
//! two runs of the same recipe start from different weights. `ParamStore`
//! is a `VarBuilder` backend that honours the same [`Init`] hints (the
//! formulas of `candle_nn::Init::var`, which follow PyTorch's defaults) but
//! draws each tensor from a ChaCha8 stream keyed by the run's seed and the
//! tensor's full name: the result does not depend on construction order or
//! thread count, and adding a module does not shift the others' weights.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::{Error, Result};

/// Named trainable variables, created on first use by a [`VarBuilder`].
#[derive(Clone)]
pub struct ParamStore {
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
    seed: u64,
    keras_defaults: bool,
}

impl std::fmt::Debug for ParamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamStore")
            .field("seed", &self.seed)
            .field("keras_defaults", &self.keras_defaults)
            .field("tensors", &self.len())
            .finish()
    }
}

/// FNV-1a of the name mixed with the seed (SplitMix64 finaliser): a stable
/// per-tensor stream id.
pub(crate) fn stream_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix64(seed ^ h.rotate_left(17))
}

/// SplitMix64's finaliser: turns nearby integers into unrelated seeds.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn init_values(init: Init, shape: &Shape, rng: &mut ChaCha8Rng) -> candle_core::Result<Vec<f32>> {
    let n = shape.elem_count();
    let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| -> candle_core::Result<Vec<f32>> {
        let d = rand_distr::Uniform::new(lo, up.max(lo + f64::MIN_POSITIVE))
            .map_err(|e| candle_core::Error::Msg(format!("bad uniform init [{lo}, {up}): {e}")))?;
        Ok((0..n).map(|_| d.sample(rng) as f32).collect())
    };
    let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(rng);
                (mean + std * z) as f32
            })
            .collect()
    };
    Ok(match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Uniform { lo, up } => uniform(rng, lo, up)?,
        Init::Randn { mean, stdev } => normal(rng, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = fan.for_shape(shape).max(1);
            let std = non_linearity.gain() / (fan as f64).sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(rng, -bound, bound)?
                }
                candle_nn::init::NormalOrUniform::Normal => normal(rng, 0., std),
            }
        }
    })
}

impl ParamStore {
    pub fn new(seed: u64) -> Self {
        Self {
            vars: Arc::new(Mutex::new(BTreeMap::new())),
            seed,
            keras_defaults: false,
        }
    }

    /// A store that initialises as Keras' layers do by default, whatever
    /// hint a module gives: weights of rank >= 2 from Glorot-uniform,
    /// `U(-l, l)` with `l = sqrt(6 / (fan_in + fan_out))`, `*.bias` zero,
    /// anything else (norm scales) as hinted. Fans follow Keras: a dense
    /// `[out, in]` weight has fans `in` and `out`; a convolution
    /// `[a, b, kh, kw]` has `a * kh * kw` and `b * kh * kw` (the sum, all the
    /// bound needs, is the same for transposed ones).
    pub fn keras_defaults(seed: u64) -> Self {
        Self {
            keras_defaults: true,
            ..Self::new(seed)
        }
    }

    /// The initialisation of a new variable: the module's hint, or Keras'
    /// default for it (see [`Self::keras_defaults`]).
    fn init_for(&self, name: &str, shape: &Shape, hint: Init) -> Init {
        if !self.keras_defaults {
            return hint;
        }
        let dims = shape.dims();
        if name.ends_with(".bias") {
            Init::Const(0.0)
        } else if dims.len() >= 2 {
            let receptive: usize = dims[2..].iter().product();
            let limit = (6.0 / ((dims[0] + dims[1]) * receptive).max(1) as f64).sqrt();
            Init::Uniform {
                lo: -limit,
                up: limit,
            }
        } else {
            hint
        }
    }

    /// A `VarBuilder` that creates (or returns the existing) variables.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Var>> {
        // A panic while holding the lock leaves the map itself consistent.
        self.vars.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All variables, sorted by name (a stable order for optimisers).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// An AdamW optimiser over every variable (in name order), with
    /// ensueno's fused CPU step.
    pub fn adamw(&self, config: candle_nn::ParamsAdamW) -> Result<crate::ops::adamw::AdamW> {
        let vars = self.vars().into_iter().map(|(_, v)| v).collect();
        <crate::ops::adamw::AdamW as candle_nn::Optimizer>::new(vars, config).map_err(Into::into)
    }

    /// The variables' current values, by name.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// The values under `prefix` (for a checkpoint's training state).
    pub fn state(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.tensors()
            .into_iter()
            .map(|(k, t)| (format!("{prefix}{k}"), t))
            .collect()
    }

    /// Number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.lock().values().map(|v| v.elem_count()).sum()
    }

    /// Overwrites every variable with the tensor of the same name (prefixed
    /// by `prefix`) in `tensors`. All names and shapes are checked before
    /// anything changes.
    pub fn load_tensors(&self, tensors: &HashMap<String, Tensor>, prefix: &str) -> Result<()> {
        let vars = self.lock();
        let mut pairs = Vec::with_capacity(vars.len());
        for (name, var) in vars.iter() {
            let key = format!("{prefix}{name}");
            let t = tensors
                .get(&key)
                .ok_or_else(|| Error::invalid(format!("checkpoint has no tensor '{key}'")))?;
            if t.dims() != var.dims() {
                return Err(Error::Shape {
                    what: format!("checkpoint tensor '{key}'"),
                    expected: format!("{:?}", var.dims()),
                    got: format!("{:?}", t.dims()),
                });
            }
            pairs.push((var, t));
        }
        for (var, t) in pairs {
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// Writes the variables as one safetensors file (atomically).
    pub fn save_safetensors(&self, path: &Path, dtype: Option<DType>) -> Result<()> {
        let tensors = self
            .tensors()
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(dtype.unwrap_or(t.dtype()))?)))
            .collect::<Result<Vec<_>>>()?;
        crate::io::weights::save_safetensors(path, &tensors, None)
    }
}

impl SimpleBackend for ParamStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut vars = self.lock();
        if let Some(v) = vars.get(name) {
            if v.shape() != &s {
                candle_core::bail!(
                    "parameter '{name}' requested with shape {s:?} but exists with {:?}",
                    v.shape()
                );
            }
            return Ok(v.as_tensor().clone());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(self.seed, name));
        let values = init_values(self.init_for(name, &s, h), &s, &mut rng)?;
        let t = Tensor::from_vec(values, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.lock().get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("parameter '{name}' has no shape hint"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights_in_any_order() -> Result<()> {
        let dev = Device::Cpu;
        let a = ParamStore::new(7);
        let b = ParamStore::new(7);
        let va = a.var_builder(DType::F32, &dev);
        let vb = b.var_builder(DType::F32, &dev);
        let a1 = va.get_with_hints((4, 3), "x.weight", candle_nn::init::DEFAULT_KAIMING_UNIFORM)?;
        let a2 = va.get_with_hints(
            5,
            "y",
            Init::Randn {
                mean: 0.,
                stdev: 1.,
            },
        )?;
        let b2 = vb.get_with_hints(
            5,
            "y",
            Init::Randn {
                mean: 0.,
                stdev: 1.,
            },
        )?;
        let b1 = vb.get_with_hints((4, 3), "x.weight", candle_nn::init::DEFAULT_KAIMING_UNIFORM)?;
        assert_eq!(a1.to_vec2::<f32>()?, b1.to_vec2::<f32>()?);
        assert_eq!(a2.to_vec1::<f32>()?, b2.to_vec1::<f32>()?);
        let c = ParamStore::new(8).var_builder(DType::F32, &dev);
        let c2 = c.get_with_hints(
            5,
            "y",
            Init::Randn {
                mean: 0.,
                stdev: 1.,
            },
        )?;
        assert_ne!(a2.to_vec1::<f32>()?, c2.to_vec1::<f32>()?);
        // Kaiming uniform bound: sqrt(3) * sqrt(2) / sqrt(fan_in = 3).
        let bound = (6f32 / 3.).sqrt();
        assert!(a1
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.abs() <= bound));
        Ok(())
    }

    #[test]
    fn keras_defaults_glorot_uniform_and_zero_biases() -> Result<()> {
        let store = ParamStore::keras_defaults(3);
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let conv = vb.get_with_hints(
            (64, 32, 3, 3),
            "conv.weight",
            candle_nn::init::DEFAULT_KAIMING_UNIFORM,
        )?;
        let bias = vb.get_with_hints(64, "conv.bias", Init::Const(1.0))?;
        let dense = vb.get((16, 3136), "dense.weight")?;
        let scale = vb.get_with_hints(8, "norm.weight", Init::Const(1.0))?;
        let conv = conv.flatten_all()?.to_vec1::<f32>()?;
        let limit = (6f32 / ((64. + 32.) * 9.)).sqrt();
        assert!(conv.iter().all(|v| v.abs() <= limit));
        // Uniform on [-l, l] has standard deviation l / sqrt(3).
        let var = conv.iter().map(|v| v * v).sum::<f32>() / conv.len() as f32;
        assert!((var.sqrt() / (limit / 3f32.sqrt()) - 1.).abs() < 0.05);
        let dense = dense.flatten_all()?.to_vec1::<f32>()?;
        let limit = (6f32 / (16. + 3136.)).sqrt();
        assert!(dense.iter().all(|v| v.abs() <= limit));
        assert!(dense.iter().any(|v| v.abs() > 0.9 * limit));
        assert!(bias.to_vec1::<f32>()?.iter().all(|&v| v == 0.));
        assert!(scale.to_vec1::<f32>()?.iter().all(|&v| v == 1.));
        Ok(())
    }

    #[test]
    fn shape_conflict_is_an_error() {
        let store = ParamStore::new(0);
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        assert!(vb.get(3, "w").is_ok());
        assert!(vb.get(4, "w").is_err());
    }
}
