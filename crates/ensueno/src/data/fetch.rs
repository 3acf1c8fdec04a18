//! Downloads of the standard idx datasets (MNIST, Fashion-MNIST) from their
//! canonical mirrors into a cache folder.
//!
//! Files are checked by the SHA-256 of their *decompressed* contents: mirrors
//! and distributions recompress the `.gz` files (the gzip bytes differ
//! between them) but the idx data inside is the same everywhere. A file is
//! written under a temporary name in the destination folder and renamed only
//! once it is complete and verified, so an interrupted download never leaves
//! a file that looks valid.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Error, Result};

/// The datasets [`fetch`] knows.
pub const KNOWN_DATASETS: &[&str] = &["mnist", "fashion-mnist"];

/// One idx file of a dataset: its name (`.gz`), the SHA-256 and length of its
/// decompressed contents.
#[derive(Debug, Clone, Copy)]
pub struct IdxFileSum {
    pub file: &'static str,
    pub sha256: &'static str,
    pub len: u64,
}

const MNIST_MIRRORS: &[&str] = &[
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
];

const FASHION_MIRRORS: &[&str] = &[
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
];

// Computed from the canonical files (`zcat FILE | sha256sum`); the same sums
// are published by many projects that pin MNIST.
const MNIST_FILES: [IdxFileSum; 4] = [
    IdxFileSum {
        file: "train-images-idx3-ubyte.gz",
        sha256: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        len: 47_040_016,
    },
    IdxFileSum {
        file: "train-labels-idx1-ubyte.gz",
        sha256: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        len: 60_008,
    },
    IdxFileSum {
        file: "t10k-images-idx3-ubyte.gz",
        sha256: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        len: 7_840_016,
    },
    IdxFileSum {
        file: "t10k-labels-idx1-ubyte.gz",
        sha256: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        len: 10_008,
    },
];

const FASHION_FILES: [IdxFileSum; 4] = [
    IdxFileSum {
        file: "train-images-idx3-ubyte.gz",
        sha256: "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        len: 47_040_016,
    },
    IdxFileSum {
        file: "train-labels-idx1-ubyte.gz",
        sha256: "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        len: 60_008,
    },
    IdxFileSum {
        file: "t10k-images-idx3-ubyte.gz",
        sha256: "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        len: 7_840_016,
    },
    IdxFileSum {
        file: "t10k-labels-idx1-ubyte.gz",
        sha256: "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        len: 10_008,
    },
];

/// The canonical mirrors (tried in order) and files of a known dataset.
pub fn known(name: &str) -> Result<(&'static [&'static str], &'static [IdxFileSum; 4])> {
    match name {
        "mnist" => Ok((MNIST_MIRRORS, &MNIST_FILES)),
        "fashion-mnist" => Ok((FASHION_MIRRORS, &FASHION_FILES)),
        _ => Err(Error::UnknownName {
            kind: "dataset",
            name: name.to_string(),
            expected: KNOWN_DATASETS.join(", "),
        }),
    }
}

/// The root of the fetch cache: `$XDG_CACHE_HOME/ensueno/data`, else
/// `$HOME/.cache/ensueno/data`. Dataset `name` goes to `<root>/<name>`.
pub fn default_cache_dir() -> Result<PathBuf> {
    let absolute = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    let cache = absolute("XDG_CACHE_HOME")
        .or_else(|| absolute("HOME").map(|h| h.join(".cache")))
        .ok_or_else(|| {
            Error::invalid(
                "no cache folder: neither XDG_CACHE_HOME nor HOME is set to an absolute path; \
                 pass --data PATH or set ENSUENO_DATA",
            )
        })?;
    Ok(cache.join("ensueno").join("data"))
}

/// Downloads the four idx `.gz` files of `name` into `dest` (default:
/// `default_cache_dir()/<name>`), trying the canonical mirrors in order, and
/// returns the folder. Files already there and valid are kept.
///
/// `progress(file, bytes_so_far, total)` is called as bytes arrive (`total`
/// from the server's Content-Length), and once with the full length for a
/// file that was already present.
pub fn fetch(
    name: &str,
    dest: Option<&Path>,
    progress: &mut dyn FnMut(&str, u64, Option<u64>),
) -> Result<PathBuf> {
    let (mirrors, _) = known(name)?;
    fetch_from_mirrors(name, dest, mirrors, progress)
}

/// [`fetch`] with other mirrors (base URLs ending in `/`), for private
/// mirrors and tests.
pub fn fetch_from_mirrors(
    name: &str,
    dest: Option<&Path>,
    mirrors: &[&str],
    progress: &mut dyn FnMut(&str, u64, Option<u64>),
) -> Result<PathBuf> {
    let (_, files) = known(name)?;
    let dest = match dest {
        Some(d) => d.to_path_buf(),
        None => default_cache_dir()?.join(name),
    };
    std::fs::create_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(20))
        .timeout_read(Duration::from_secs(60))
        .user_agent(concat!("ensueno/", env!("CARGO_PKG_VERSION")))
        .build();
    for sum in files {
        let target = dest.join(sum.file);
        if target.is_file() && verify_file(&target, sum).is_ok() {
            let len = std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0);
            progress(sum.file, len, Some(len));
            continue;
        }
        let mut failures = Vec::new();
        let mut done = false;
        for base in mirrors {
            let url = format!("{base}{}", sum.file);
            match download(&agent, &url, &dest, &target, sum, progress) {
                Ok(()) => {
                    done = true;
                    break;
                }
                Err(e) => failures.push(format!("{url}: {e}")),
            }
        }
        if !done {
            return Err(Error::invalid(format!(
                "could not download {} of {name} ({}); without network, pass --data PATH or set \
                 ENSUENO_DATA to a folder holding the four idx files",
                sum.file,
                failures.join("; ")
            )));
        }
    }
    Ok(dest)
}

/// Checks that the idx files of `name` in `dir` are all there and intact.
pub fn verify(name: &str, dir: &Path) -> Result<()> {
    let (_, files) = known(name)?;
    for sum in files {
        verify_file(&dir.join(sum.file), sum)?;
    }
    Ok(())
}

fn download(
    agent: &ureq::Agent,
    url: &str,
    dest: &Path,
    target: &Path,
    sum: &IdxFileSum,
    progress: &mut dyn FnMut(&str, u64, Option<u64>),
) -> std::result::Result<(), String> {
    let response = agent.get(url).call().map_err(|e| e.to_string())?;
    let total = response
        .header("Content-Length")
        .and_then(|v| v.parse::<u64>().ok());
    let mut reader = response.into_reader();
    let mut tmp = tempfile::Builder::new()
        .prefix(".ensueno-")
        .suffix(".part")
        .tempfile_in(dest)
        .map_err(|e| format!("cannot write in {}: {e}", dest.display()))?;
    let mut buf = vec![0u8; 1 << 16];
    let mut so_far = 0u64;
    progress(sum.file, 0, total);
    loop {
        let n = reader.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        tmp.write_all(&buf[..n])
            .map_err(|e| format!("cannot write in {}: {e}", dest.display()))?;
        so_far += n as u64;
        progress(sum.file, so_far, total);
    }
    tmp.flush().map_err(|e| e.to_string())?;
    if let Some(t) = total.filter(|&t| t != so_far) {
        return Err(format!("download cut short ({so_far} of {t} bytes)"));
    }
    verify_file(tmp.path(), sum).map_err(|e| e.to_string())?;
    tmp.persist(target)
        .map_err(|e| format!("cannot rename into {}: {}", target.display(), e.error))?;
    Ok(())
}

/// Checks the decompressed length and SHA-256 of one file (gzip or raw).
fn verify_file(path: &Path, sum: &IdxFileSum) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = std::io::BufReader::new(file);
    let mut magic = [0u8; 2];
    let head = reader.read(&mut magic).map_err(|e| Error::io(path, e))?;
    let chained = std::io::Cursor::new(magic[..head].to_vec()).chain(reader);
    let mut source: Box<dyn Read> = if magic[..head] == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(chained))
    } else {
        Box::new(chained)
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = source.read(&mut buf).map_err(|e| {
            Error::invalid(format!(
                "{}: cannot decompress ({e}); truncated gzip?",
                path.display()
            ))
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    let digest = to_hex(&hasher.finish());
    if len != sum.len || digest != sum.sha256 {
        return Err(Error::invalid(format!(
            "{}: checksum mismatch ({len} bytes with SHA-256 {digest} after decompression; \
             expected {} bytes with {})",
            path.display(),
            sum.len,
            sum.sha256
        )));
    }
    Ok(())
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (FIPS 180-4), streaming. Small enough to keep here rather than
/// add a dependency for four checksums.
struct Sha256 {
    state: [u32; 8],
    block: [u8; 64],
    filled: usize,
    total: u64,
}

// First 32 bits of the fractional parts of the cube roots of the first 64 primes.
const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

impl Sha256 {
    fn new() -> Self {
        Self {
            // First 32 bits of the fractional parts of the square roots of the first 8 primes.
            state: [
                0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
                0x5be0cd19,
            ],
            block: [0; 64],
            filled: 0,
            total: 0,
        }
    }

    fn update(&mut self, mut data: &[u8]) {
        self.total = self.total.wrapping_add(data.len() as u64);
        while !data.is_empty() {
            let take = (64 - self.filled).min(data.len());
            self.block[self.filled..self.filled + take].copy_from_slice(&data[..take]);
            self.filled += take;
            data = &data[take..];
            if self.filled == 64 {
                let block = self.block;
                self.compress(&block);
                self.filled = 0;
            }
        }
    }

    fn finish(mut self) -> [u8; 32] {
        let bits = self.total.wrapping_mul(8);
        let mut pad = vec![0x80u8];
        let rem = (self.filled + 1) % 64;
        pad.resize(1 + if rem <= 56 { 56 - rem } else { 120 - rem }, 0);
        pad.extend_from_slice(&bits.to_be_bytes());
        let total = self.total;
        self.update(&pad);
        self.total = total;
        debug_assert_eq!(self.filled, 0);
        let mut out = [0u8; 32];
        for (chunk, word) in out.chunks_exact_mut(4).zip(self.state) {
            chunk.copy_from_slice(&word.to_be_bytes());
        }
        out
    }

    fn compress(&mut self, block: &[u8; 64]) {
        let mut w = [0u32; 64];
        for (i, chunk) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = self.state;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = h
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            h = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (s, v) in self.state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
            *s = s.wrapping_add(v);
        }
    }
}

/// SHA-256 of `data` as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    to_hex(&h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_vectors() {
        // FIPS 180-4 examples, plus lengths around the padding boundary.
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        let mut h = Sha256::new();
        for _ in 0..1000 {
            h.update(&[b'a'; 1000]);
        }
        assert_eq!(
            to_hex(&h.finish()),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }
}
