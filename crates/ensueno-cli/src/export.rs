//! `ensueno export`: copy a trained model folder, optionally converting its
//! weights (e.g. to f16, half the size, for shipping).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Args, ValueEnum};

#[derive(Clone, Copy, ValueEnum)]
enum WeightDType {
    F32,
    F16,
    Bf16,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A model folder (or a training --output folder: its model/).
    #[arg(long)]
    model: PathBuf,
    /// Where to write the copy (must not exist yet).
    #[arg(long, short)]
    output: PathBuf,
    /// Store floating-point weights in this type.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: WeightDType,
}

fn copy_tree(src: &Path, dst: &Path, dtype: DType) -> Result<()> {
    std::fs::create_dir_all(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    for entry in std::fs::read_dir(src).with_context(|| format!("cannot read {}", src.display()))? {
        let entry = entry?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        if from.is_dir() {
            copy_tree(&from, &to, dtype)?;
        } else if from.extension().is_some_and(|e| e == "safetensors") {
            let tensors = ensueno::io::weights::load_safetensors(&from, &candle_core::Device::Cpu)?;
            let mut named: Vec<(String, candle_core::Tensor)> = tensors
                .into_iter()
                .map(|(k, t)| {
                    let t = if t.dtype().is_float() {
                        t.to_dtype(dtype)?
                    } else {
                        t
                    };
                    Ok((k, t))
                })
                .collect::<Result<_>>()?;
            named.sort_by(|a, b| a.0.cmp(&b.0));
            ensueno::io::weights::save_safetensors(&to, &named, None)?;
        } else {
            std::fs::copy(&from, &to).with_context(|| format!("cannot copy {}", from.display()))?;
        }
    }
    Ok(())
}

pub fn run(args: ExportArgs) -> Result<()> {
    let src = ensueno::train::resolve_trained_model(&args.model)?;
    if args.output.exists() {
        bail!(
            "{} already exists: choose a new --output",
            args.output.display()
        );
    }
    let dtype = match args.dtype {
        WeightDType::F32 => DType::F32,
        WeightDType::F16 => DType::F16,
        WeightDType::Bf16 => DType::BF16,
    };
    // Build the copy beside its destination, then rename it into place.
    ensueno::train::checkpoint::write_dir_atomic(&args.output, |tmp| {
        copy_tree(&src, tmp, dtype).map_err(|e| ensueno::Error::invalid(format!("{e:#}")))
    })?;
    eprintln!("exported {} to {}", src.display(), args.output.display());
    Ok(())
}
