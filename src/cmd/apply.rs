//! `obd apply`: an OCI layer tarball into a committed overlaybd layer.
//!
//! The lower layers (if any) and a temporary sparse writable layer are
//! stacked; the ext4 in that stack is changed through libext2fs (see the
//! ext4-apply crate), and the writable layer is then committed as
//! `obd commit` would. The writable layer lives in a temporary directory
//! beside OUTPUT and is removed whatever happens.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use ext4_apply::{BlockDevice, Ext4, StackDevice};
use overlaybd::image::open_read_only;
use overlaybd::lsmt::{CommitOptions, CreateOptions, WritableLayer};
use overlaybd::stack::Stack;
use sha2::{Digest, Sha256};

use super::{LayerFormat, Output};
use crate::progress;

/// Apply one OCI image layer (tar, tar+gzip or tar+zstd) onto the ext4 of
/// a stack of layers and write the change as a new committed layer (like
/// overlaybd-apply followed by overlaybd-commit).
///
/// LOWER layers are listed bottom → top. The first layer of an image has
/// none and is made with --mkfs, which creates the file system (--size
/// GiB of virtual disk; 64 as the reference). Whiteouts (.wh.NAME) and
/// opaque directories (.wh..wh..opq) are applied as the OCI image spec
/// says; owners, modes, times, xattrs, hard links, devices and FIFOs are
/// kept. Nothing is mounted and no root rights are needed.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
obd apply --mkfs base.tar.gz base.lsmt\n  \
obd apply app.tar.zst app.lsmt base.lsmt\n  \
obd apply -z -t top.tar top.blob base.lsmt app.lsmt\n  \
obd apply --mkfs --size 8 small.tar small.lsmt --uuid 00000001-0000-4000-8000-000000000001\n  \
obd apply --checksum sha256:<diff_id> app.tar.gz app.lsmt base.lsmt\n  \
curl -sL https://example.com/layer.tar.gz | obd apply - app.lsmt base.lsmt\n\
Then: obd export --output disk.raw base.lsmt app.lsmt top.blob; e2fsck -fn disk.raw")]
pub struct Args {
    /// The OCI layer: a tar, optionally gzip or zstd compressed (told by
    /// its content); `-` reads it from standard input (a pipe is fine: the
    /// layer is read once, front to back).
    layer: PathBuf,
    /// The layer file to write (must not exist).
    out: PathBuf,
    /// Layers below, bottom → top (committed, ZFile or tar-wrapped).
    #[arg(value_name = "LOWER")]
    lowers: Vec<PathBuf>,
    /// Make a new ext4 file system first (for an image's first layer; no
    /// LOWER layers then).
    #[arg(long)]
    mkfs: bool,
    /// Virtual disk size in GiB for --mkfs.
    #[arg(long, value_name = "GIB", default_value_t = 64, requires = "mkfs")]
    size: u64,
    /// UUID of the new layer (default: all zeros).
    #[arg(long)]
    uuid: Option<String>,
    /// Parent UUID stored in the new layer (default: the top LOWER's UUID).
    #[arg(short = 'p', long = "parent-uuid")]
    parent_uuid: Option<String>,
    /// SHA-256 of the uncompressed tar (the layer's diff_id in the image
    /// config): nothing is written unless the layer has it.
    #[arg(long, value_name = "sha256:HEX")]
    checksum: Option<String>,
    #[command(flatten)]
    format: LayerFormat,
}

pub fn run(args: Args) -> Result<()> {
    if args.out.exists() {
        bail!(
            "{} already exists; refusing to overwrite it",
            args.out.display()
        );
    }
    match (args.mkfs, args.lowers.is_empty()) {
        (true, false) => bail!("--mkfs makes a first layer: give no LOWER layers with it"),
        (false, true) => {
            bail!("no LOWER layers: the first layer of an image needs --mkfs")
        }
        _ => {}
    }
    let mkfs_size = if args.mkfs {
        Some(
            args.size
                .checked_mul(1 << 30)
                .filter(|&s| s >= ext4_apply::fs::MIN_FS_SIZE)
                .with_context(|| format!("--size {} GiB is not a usable size", args.size))?,
        )
    } else {
        None
    };
    let expect = args.checksum.as_deref().map(parse_digest).transpose()?;
    apply_layer(&Job {
        layer: &args.layer,
        out: &args.out,
        lowers: &args.lowers,
        mkfs_size,
        uuid: args.uuid.clone(),
        parent_uuid: args.parent_uuid.clone(),
        expect,
        format: &args.format,
    })
}

/// One OCI layer to apply: what `obd apply` and `obd convert` share.
pub struct Job<'a> {
    /// The layer tarball (`-` for standard input).
    pub layer: &'a Path,
    /// The layer file to write.
    pub out: &'a Path,
    /// Layers below, bottom → top.
    pub lowers: &'a [PathBuf],
    /// Make a new file system of this many bytes first (no lowers then).
    pub mkfs_size: Option<u64>,
    pub uuid: Option<String>,
    /// Default: the top lower's UUID.
    pub parent_uuid: Option<String>,
    /// The SHA-256 the uncompressed tar must have (its diff_id).
    pub expect: Option<[u8; 32]>,
    pub format: &'a LayerFormat,
}

/// Apply `job.layer` onto the stack `job.lowers` and write the change as
/// the committed layer `job.out`. Nothing is written to `job.out` unless
/// the whole layer was applied (and had the expected digest).
pub fn apply_layer(job: &Job) -> Result<()> {
    let lowers = job
        .lowers
        .iter()
        .map(|path| open_read_only(path).with_context(|| format!("opening {}", path.display())))
        .collect::<Result<Vec<_>>>()?;
    let fs_size = match job.mkfs_size {
        Some(size) => size,
        None => lowers
            .iter()
            .rev()
            .map(|l| l.virtual_size())
            .find(|&s| s != 0)
            .context("no LOWER layer states a virtual size")?,
    };
    let parent_uuid = job
        .parent_uuid
        .clone()
        .or_else(|| lowers.last().map(|l| l.header.uuid.clone()));

    let dir = match job.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let work = tempfile::Builder::new()
        .prefix(".obd-apply-")
        .tempdir_in(&dir)
        .with_context(|| format!("cannot make a work directory in {}", dir.display()))?;
    let upper = WritableLayer::create(
        &work.path().join("upper.data"),
        None,
        &CreateOptions {
            virtual_size: fs_size,
            parent_uuid,
            sparse: true,
        },
    )?;
    let stack = Stack::new(lowers, Some(Arc::new(upper)))?;
    // The upper layer is scratch: committed into OUT (which is synced), then
    // deleted, so it is never synced itself.
    let device = Arc::new(StackDevice::new(stack, false));

    let got = apply_into(&device, job.layer, job.mkfs_size, job.expect.is_some())?;
    if let (Some(want), Some(got)) = (job.expect, got) {
        if got != want {
            bail!(
                "{}: the uncompressed tar has sha256:{}, not sha256:{} \
                 (--checksum, or the diff_id in the image config)",
                job.layer.display(),
                hex::encode(got),
                hex::encode(want)
            );
        }
    }
    let top = device
        .stack()
        .top()
        .context("the stack lost its writable layer")?;
    commit(top, job)
}

/// Change the ext4 on `device` by the layer at `layer` (making it first
/// when `mkfs` gives a size). Returns the SHA-256 of the uncompressed tar
/// when `hash` asks for it.
fn apply_into(
    device: &Arc<StackDevice>,
    layer: &Path,
    mkfs: Option<u64>,
    hash: bool,
) -> Result<Option<[u8; 32]>> {
    let (input, size): (Box<dyn Read>, u64) = if layer == Path::new("-") {
        (Box::new(std::io::stdin()), 0)
    } else {
        let file = File::open(layer).with_context(|| format!("opening {}", layer.display()))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        (Box::new(file), size)
    };
    let bar = progress::bytes(size, "apply");
    let counted = Counted {
        inner: input,
        bar: bar.clone(),
    };
    let mut tar = Hashed {
        inner: ext4_apply::decompress(counted, &layer.display().to_string())?,
        sha256: hash.then(Sha256::new),
    };
    let as_device: Arc<dyn BlockDevice> = device.clone();
    let mut fs = match mkfs {
        Some(size) => Ext4::mkfs(as_device, size)?,
        None => Ext4::open(as_device)?,
    };
    ext4_apply::apply(&mut fs, &mut tar)
        .with_context(|| format!("applying {}", layer.display()))?;
    fs.close()?;
    if hash {
        // The tar's padding after its end-of-archive block counts too.
        std::io::copy(&mut tar, &mut std::io::sink())
            .with_context(|| format!("reading {} to its end", layer.display()))?;
    }
    bar.finish_and_clear();
    Ok(tar.sha256.map(|h| h.finalize().into()))
}

/// `sha256:HEX` or `HEX` as 32 bytes.
fn parse_digest(text: &str) -> Result<[u8; 32]> {
    let hex_part = text.strip_prefix("sha256:").unwrap_or(text);
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out)
        .ok()
        .with_context(|| format!("--checksum {text:?} is not sha256:<64 hex digits>"))?;
    Ok(out)
}

/// The uncompressed tar, hashed as it is read (when asked).
struct Hashed {
    inner: Box<dyn Read>,
    sha256: Option<Sha256>,
}

impl Read for Hashed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(sha256) = &mut self.sha256 {
            sha256.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// The layer file, moving the progress bar as it is read.
struct Counted {
    inner: Box<dyn Read>,
    bar: indicatif::ProgressBar,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

fn commit(top: &WritableLayer, job: &Job) -> Result<()> {
    let total = top
        .snapshot()
        .iter()
        .map(|(_, e)| if e.zeroed { 0 } else { e.length * 512 })
        .sum();
    let bar = progress::bytes(total, "commit");
    let mut plain = Output::create(job.out)?;
    {
        let mut writer = plain.writer();
        let options = CommitOptions {
            uuid: job.uuid.clone(),
            parent_uuid: None,
            message: String::new(),
        };
        top.commit(&mut writer, &options, &mut |n| bar.inc(n))?;
        std::io::Write::flush(&mut writer).context("writing the committed layer")?;
    }
    bar.finish_and_clear();
    job.format.finish(plain, job.out)
}
