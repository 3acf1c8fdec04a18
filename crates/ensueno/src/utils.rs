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

/// Keeps freed memory in the process instead of returning it to the kernel
/// at once. The training and sampling loops allocate and free the same
/// multi-megabyte buffers thousands of times; glibc serves such sizes with
/// fresh `mmap`s, and the page faults and TLB shootdowns of mapping and
/// unmapping them cost a quarter of a small UNet's training step on the CPU
/// (measured with `examples/t2i_step`). Call once, early, from a binary.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it is called before
    // any thread is started.
    unsafe {
        // 32 MiB is the largest mmap threshold glibc accepts on 64-bit.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}
