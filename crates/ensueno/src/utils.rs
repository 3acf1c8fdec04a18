//! Small helpers shared by models and pipelines: device choice, seeded noise.

use candle_core::{DType, Device, Shape, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::Result;

/// The best device this build can use: CUDA when compiled with the `cuda`
/// feature and a GPU answers, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        if let Ok(d) = Device::new_cuda(0) {
            return d;
        }
    }
    Device::Cpu
}

/// A seeded source of standard-normal noise.
///
/// ChaCha8 is specified bit for bit, so a seed gives the same numbers on every
/// platform and every build of ensueno (unlike `StdRng`, whose algorithm may
/// change between `rand` releases). Noise is drawn on the CPU in f32 and then
/// moved, so CPU and GPU runs start from the same latents.
#[derive(Debug, Clone)]
pub struct NoiseGenerator {
    rng: ChaCha8Rng,
}

impl NoiseGenerator {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// A tensor of `shape` filled with N(0, 1) samples.
    pub fn randn<S: Into<Shape>>(
        &mut self,
        shape: S,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.elem_count();
        let data: Vec<f32> = (0..n)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect();
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }
}
