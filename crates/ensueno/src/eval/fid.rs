//! The Fréchet distance between two feature sets, each summarised by a
//! Gaussian (mean and covariance): the measure behind FID.
//!
//! Paper: Heusel, Ramsauer, Unterthiner, Nessler, Hochreiter, "GANs Trained by
//! a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", 2017,
//! arXiv:1706.08500. Reference implementation: `pytorch-fid`
//! (`fid_score.calculate_frechet_distance`, `scipy.linalg.sqrtm(S1 @ S2)`).
//!
//! `d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`. The trace of the
//! non-symmetric square root equals that of the symmetric
//! `(S1^{1/2} S2 S1^{1/2})^{1/2}` (same eigenvalues), which needs only
//! symmetric eigen-decompositions: stable, real, and free of the complex
//! round-off that `sqrtm` produces on nearly singular covariances. Tiny
//! negative eigenvalues from round-off are clamped at 0. Everything is f64.

use candle_core::{DType, Tensor};
use nalgebra::{DMatrix, SymmetricEigen};

use crate::{Error, Result};

/// Mean and unbiased covariance of a feature set.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStats {
    /// Per-dimension mean, `dim` values.
    pub mean: Vec<f64>,
    /// Covariance, `dim x dim` row-major, normalised by `count - 1`.
    pub cov: Vec<f64>,
    /// Feature width.
    pub dim: usize,
    /// Number of samples the statistics were computed from.
    pub count: usize,
}

impl FeatureStats {
    /// Statistics of `f` (rows are samples).
    ///
    /// # Shapes
    /// `f (N, D)` with `N >= 2`, `D >= 1`; any float dtype, read as f64.
    pub fn from_features(f: &Tensor) -> Result<Self> {
        let (n, d) = match f.dims() {
            [n, d] if *n >= 2 && *d >= 1 => (*n, *d),
            _ => {
                return Err(Error::Shape {
                    what: "feature set".into(),
                    expected: "(N >= 2, D >= 1)".into(),
                    got: format!("{:?}", f.dims()),
                })
            }
        };
        let values = f.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "feature set contains NaN or infinite values",
            ));
        }
        let x = DMatrix::from_row_slice(n, d, &values);
        let mean: Vec<f64> = x.row_mean().iter().copied().collect();
        let mut centred = x;
        for (j, m) in mean.iter().enumerate() {
            centred.column_mut(j).add_scalar_mut(-m);
        }
        let cov = centred.tr_mul(&centred) / (n as f64 - 1.0);
        // Row-major; the matrix is symmetric but transpose anyway so the
        // layout matches the documentation exactly.
        let cov: Vec<f64> = cov.transpose().as_slice().to_vec();
        Ok(Self {
            mean,
            cov,
            dim: d,
            count: n,
        })
    }

    fn check(&self, what: &str) -> Result<()> {
        if self.dim == 0 || self.mean.len() != self.dim || self.cov.len() != self.dim * self.dim {
            return Err(Error::Shape {
                what: format!("{what} feature statistics"),
                expected: format!(
                    "mean of {} values and a {}x{} covariance",
                    self.dim, self.dim, self.dim
                ),
                got: format!(
                    "mean of {} values and {} covariance values",
                    self.mean.len(),
                    self.cov.len()
                ),
            });
        }
        Ok(())
    }

    /// The squared Fréchet distance between the Gaussians `N(self.mean,
    /// self.cov)` and `N(other.mean, other.cov)` (what is reported as FID).
    /// Never negative up to round-off (identical statistics give ~1e-12).
    pub fn frechet_distance(&self, other: &Self) -> Result<f64> {
        self.check("first")?;
        other.check("second")?;
        if self.dim != other.dim {
            return Err(Error::Shape {
                what: "feature sets of a Fréchet distance".into(),
                expected: format!("equal widths (first is {})", self.dim),
                got: format!("{}", other.dim),
            });
        }
        let d = self.dim;
        let s1 = DMatrix::from_row_slice(d, d, &self.cov);
        let s2 = DMatrix::from_row_slice(d, d, &other.cov);
        let root1 = sqrt_psd(&s1);
        let middle = &root1 * &s2 * &root1;
        let middle = (&middle + middle.transpose()) * 0.5;
        let tr_root: f64 = SymmetricEigen::new(middle)
            .eigenvalues
            .iter()
            .map(|&l| l.max(0.0).sqrt())
            .sum();
        let mean_term: f64 = self
            .mean
            .iter()
            .zip(&other.mean)
            .map(|(a, b)| (a - b) * (a - b))
            .sum();
        Ok(mean_term + s1.trace() + s2.trace() - 2.0 * tr_root)
    }
}

/// The square root of a symmetric positive semi-definite matrix, through its
/// eigen-decomposition, with round-off negative eigenvalues taken as 0.
fn sqrt_psd(s: &DMatrix<f64>) -> DMatrix<f64> {
    let sym = (s + s.transpose()) * 0.5;
    let eig = SymmetricEigen::new(sym);
    let roots = eig.eigenvalues.map(|l| l.max(0.0).sqrt());
    let v = &eig.eigenvectors;
    v * DMatrix::from_diagonal(&roots) * v.transpose()
}

/// The Fréchet distance between Gaussians fitted to two feature sets (rows
/// are samples), as in Heusel et al. 2017 (FID), computed in f64.
///
/// # Shapes
/// `a (N, D)`, `b (M, D)` with `N, M >= 2`; otherwise [`Error::Shape`].
pub fn frechet_distance(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (da, db) = (a.dims(), b.dims());
    if da.len() == 2 && db.len() == 2 && da[1] != db[1] {
        return Err(Error::Shape {
            what: "feature sets of a Fréchet distance".into(),
            expected: format!("equal widths (first is {:?})", da),
            got: format!("{:?}", db),
        });
    }
    FeatureStats::from_features(a)?.frechet_distance(&FeatureStats::from_features(b)?)
}
