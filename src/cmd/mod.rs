//! One module per subcommand: its arguments and what it does.

pub mod add;
pub mod apply;
pub mod commit;
pub mod convert;
pub mod create;
pub mod del;
pub mod export;
pub mod import;
pub mod info;
pub mod list;
pub mod push;
pub mod recover;
pub mod resize;
pub mod serve;
pub mod snapshot;
pub mod tcmu;
pub mod trace;
pub mod ublk;
pub mod zfile;

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use overlaybd::io::{LocalFile, ReadAt};
use overlaybd::zfile::{Algorithm, Flavor, ZFileOptions};

use crate::progress;

/// An output file written under a temporary name beside its final path and
/// renamed into place only when complete: a failed or interrupted run
/// leaves nothing half-written, and an existing file is never overwritten.
pub struct Output {
    temp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl Output {
    pub fn create(path: &Path) -> Result<Output> {
        if path.exists() {
            bail!(
                "{} already exists; refusing to overwrite it",
                path.display()
            );
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let temp = tempfile::Builder::new()
            .prefix(".obd-partial-")
            .tempfile_in(dir)
            .with_context(|| format!("cannot create a file in {}", dir.display()))?;
        Ok(Output {
            temp,
            path: path.to_path_buf(),
        })
    }

    pub fn file(&self) -> &File {
        self.temp.as_file()
    }

    pub fn file_mut(&mut self) -> &mut File {
        self.temp.as_file_mut()
    }

    /// A buffered writer over the file.
    pub fn writer(&mut self) -> BufWriter<&mut File> {
        BufWriter::with_capacity(1 << 20, self.temp.as_file_mut())
    }

    /// Path of the partial file, for reading back what was written.
    pub fn temp_path(&self) -> &Path {
        self.temp.path()
    }

    /// Flush to stable storage and move into place.
    pub fn finish(self) -> Result<()> {
        self.temp
            .as_file()
            .sync_all()
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.temp
            .persist_noclobber(&self.path)
            .map_err(|e| e.error)
            .with_context(|| format!("cannot move the output into {}", self.path.display()))?;
        Ok(())
    }
}

/// How a new layer is stored: plain, ZFile-compressed (-z) and/or
/// tar-wrapped (-t). Shared by `commit` and `import`.
#[derive(clap::Args, Clone, Debug)]
pub struct LayerFormat {
    /// Compress the output as a ZFile.
    #[arg(short = 'z', long = "compress")]
    pub compress: bool,
    #[command(flatten)]
    pub zfile: CompressArgs,
    /// Wrap the output in a tar (with the overlaybd.pax header), as
    /// registries store overlaybd layers.
    #[arg(short = 't', long = "tar")]
    pub tar: bool,
}

impl LayerFormat {
    /// The reference convertor's layer format: ZFile (lz4, 4 KiB blocks)
    /// in a tar when `compress`, else a plain layer in a tar.
    pub fn reference(compress: bool) -> LayerFormat {
        LayerFormat {
            compress,
            zfile: CompressArgs {
                algorithm: AlgorithmArg::Lz4,
                block_kib: 4,
            },
            tar: true,
        }
    }

    /// Turn a finished plain layer into the final output at `out`:
    /// compressed and/or tar-wrapped as asked, each stage written under a
    /// temporary name, then moved into place.
    pub fn finish(&self, plain: Output, out: &Path) -> Result<()> {
        let mut current = plain;
        if self.compress {
            let options = self.zfile.options(Flavor::CommitOutput)?;
            let input = LocalFile::open(current.temp_path())?;
            let bar = progress::bytes(input.size(), "compress");
            let mut zipped = Output::create(out)?;
            let oversized =
                overlaybd::zfile::compress(&input, zipped.file_mut(), &options, &mut |n| {
                    bar.inc(n)
                })?;
            bar.finish_and_clear();
            warn_if_reference_cannot_read(oversized, out);
            current = zipped;
        }
        if self.tar {
            let input = LocalFile::open(current.temp_path())?;
            let mut wrapped = Output::create(out)?;
            overlaybd::tar::wrap(&input, wrapped.file_mut())?;
            current = wrapped;
        }
        current.finish()
    }
}

/// ZFile compression options shared by `commit -z`, `zfile` and `import -z`.
#[derive(clap::Args, Clone, Debug)]
pub struct CompressArgs {
    /// Compression algorithm.
    #[arg(long, value_enum, default_value = "lz4")]
    algorithm: AlgorithmArg,
    /// Block size in KiB: 4, 8, 16, 32 or 64.
    #[arg(long = "bs", value_name = "KB", default_value_t = 4)]
    block_kib: u32,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum AlgorithmArg {
    Lz4,
    Zstd,
}

impl CompressArgs {
    pub fn options(&self, flavor: overlaybd::zfile::Flavor) -> Result<ZFileOptions> {
        if ![4, 8, 16, 32, 64].contains(&self.block_kib) {
            bail!(
                "--bs {} is not a ZFile block size; use 4, 8, 16, 32 or 64 (KiB)",
                self.block_kib
            );
        }
        Ok(ZFileOptions {
            algorithm: match self.algorithm {
                AlgorithmArg::Lz4 => Algorithm::Lz4,
                AlgorithmArg::Zstd => Algorithm::Zstd,
            },
            block_size: self.block_kib * 1024,
            flavor,
        })
    }
}

/// Say so when a ZFile just written has blocks the reference overlaybd
/// cannot read (stored in more than 64 KiB: 64 KiB blocks that do not
/// compress). obd reads them; the file is not wrong, only not portable.
pub fn warn_if_reference_cannot_read(oversized_blocks: u64, out: &Path) {
    if oversized_blocks > 0 {
        eprintln!(
            "obd: warning: {}: {oversized_blocks} block(s) did not compress and are stored in more than {} KiB; \
             obd reads them, but the reference overlaybd (C++) cannot (EIO). Use --bs 32 or less for such data.",
            out.display(),
            overlaybd::zfile::REFERENCE_MAX_STORED_BLOCK >> 10
        );
    }
}
