//! serde defaults shared by the model configs (diffusers' constructor defaults).

pub(crate) fn d_1() -> usize {
    1
}

pub(crate) fn d_3() -> usize {
    3
}

pub(crate) fn d_4() -> usize {
    4
}

pub(crate) fn d_32() -> usize {
    32
}

pub(crate) fn d_64() -> usize {
    64
}

pub(crate) fn d_true() -> bool {
    true
}

pub(crate) fn d_one_f() -> f64 {
    1.0
}

pub(crate) fn d_norm_eps() -> f64 {
    1e-5
}

pub(crate) fn d_silu() -> String {
    "silu".to_string()
}

pub(crate) fn d_default() -> String {
    "default".to_string()
}

pub(crate) fn d_positional() -> String {
    "positional".to_string()
}

/// Fails with "`model` config: NAME must be > 0" for the first zero size.
pub(crate) fn check_positive(model: &str, sizes: &[(&str, usize)]) -> crate::Result<()> {
    match sizes.iter().find(|(_, v)| *v == 0) {
        Some((name, _)) => Err(crate::Error::invalid(format!(
            "{model} config: {name} must be > 0"
        ))),
        None => Ok(()),
    }
}
