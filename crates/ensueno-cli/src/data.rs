//! `ensueno data`: get datasets.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Download a dataset (mnist, fashion-mnist) from its canonical mirrors and verify it.
    Fetch {
        /// mnist or fashion-mnist.
        name: String,
        /// Where to put it (default: the cache that --data and ENSUENO_DATA fall back to).
        #[arg(long)]
        dest: Option<PathBuf>,
    },
}

pub fn run(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Fetch { name, dest } => {
            let mut last = String::new();
            let dir = ensueno::data::fetch(&name, dest.as_deref(), &mut |file, done, total| {
                if file != last {
                    match total {
                        Some(t) => eprintln!("{file}: {t} bytes"),
                        None => eprintln!("{file}"),
                    }
                    last = file.to_string();
                }
                let _ = done;
            })?;
            println!("{}", dir.display());
            Ok(())
        }
    }
}
