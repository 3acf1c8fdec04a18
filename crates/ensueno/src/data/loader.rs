//! Seeded shuffling, batching and random horizontal flips.
//!
//! Everything random here is a pure function of `(seed, epoch[, index])`, so a
//! run resumed at epoch `e` sees exactly the batches and flips an
//! uninterrupted run would have seen.
//!
//! Seeding: `mix(a, b) = splitmix64(a ^ splitmix64(b))`, with SplitMix64 the
//! finaliser of Steele, Lea & Flood, "Fast splittable pseudorandom number
//! generators" (2014). The permutation of epoch `e` is a Fisher-Yates shuffle
//! (`rand`'s `SliceRandom::shuffle`) driven by
//! `ChaCha8Rng::seed_from_u64(mix(seed, e))`. Sample `i` is flipped in epoch
//! `e` when the top bit of `mix(mix(seed ^ FLIP_SALT, e), i)` is set; the salt
//! keeps flips independent of the shuffle under the same seed.

use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// SplitMix64's output function: a bijective 64-bit mixer.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Combines a seed with a counter (epoch, index) into a new seed.
pub fn mix(seed: u64, counter: u64) -> u64 {
    splitmix64(seed ^ splitmix64(counter))
}

const FLIP_SALT: u64 = 0x666c_6970_735f_5f5f; // "flips___"

/// The batches of every epoch of a dataset of `len` samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataLoader {
    len: usize,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    seed: u64,
}

impl DataLoader {
    /// `drop_last` leaves out the last, smaller batch. A zero batch size is an error.
    pub fn new(
        len: usize,
        batch_size: usize,
        shuffle: bool,
        drop_last: bool,
        seed: u64,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::invalid("batch size must be at least 1"));
        }
        Ok(Self {
            len,
            batch_size,
            shuffle,
            drop_last,
            seed,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        if self.drop_last {
            self.len / self.batch_size
        } else {
            self.len.div_ceil(self.batch_size)
        }
    }

    /// The batches of `epoch` (0-based): the sample indices of each batch.
    /// The order depends only on `(seed, epoch)`; without shuffling it is `0..len`.
    pub fn epoch(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(mix(self.seed, epoch as u64));
            order.shuffle(&mut rng);
        }
        order
            .chunks(self.batch_size)
            .take(self.num_batches())
            .map(|c| c.to_vec())
            .collect()
    }
}

/// Random horizontal flips (probability 1/2 per sample and epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augment {
    pub hflip: bool,
    pub seed: u64,
}

impl Augment {
    /// Whether sample `index` is flipped in `epoch`.
    pub fn flips(&self, index: usize, epoch: usize) -> bool {
        self.hflip && mix(mix(self.seed ^ FLIP_SALT, epoch as u64), index as u64) >> 63 == 1
    }

    /// Flips the images whose dataset indices say so (see [`Augment::flips`]).
    ///
    /// # Shapes
    /// `images`: `(B, C, H, W)`, any dtype; `indices`: the `B` dataset indices
    /// of the batch's samples. Returns the same shape.
    pub fn apply(&self, images: &Tensor, indices: &[usize], epoch: usize) -> Result<Tensor> {
        let (b, c, h, w) = images.dims4()?;
        if indices.len() != b {
            return Err(Error::Shape {
                what: "augment: images for the batch indices".into(),
                expected: format!("({}, C, H, W)", indices.len()),
                got: format!("({b}, {c}, {h}, {w})"),
            });
        }
        let mask: Vec<u8> = indices
            .iter()
            .map(|&i| self.flips(i, epoch) as u8)
            .collect();
        if mask.iter().all(|&m| m == 0) {
            return Ok(images.clone());
        }
        let device = images.device();
        let reversed: Vec<u32> = (0..w as u32).rev().collect();
        let reversed = Tensor::from_vec(reversed, w, device)?;
        let flipped = images.contiguous()?.index_select(&reversed, 3)?;
        let mask = Tensor::from_vec(mask, (b, 1, 1, 1), device)?.broadcast_as((b, c, h, w))?;
        Ok(mask.where_cond(&flipped, images)?)
    }
}
