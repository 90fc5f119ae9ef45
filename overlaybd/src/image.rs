//! Opening images: a layer file of any supported kind, a list of layers, or
//! an image config, turned into a [`Stack`].
//!
//! A layer argument is a path to a read-only layer (committed, sealed,
//! ZFile, tar-wrapped: detected from its bytes), a sparse writable data
//! file, or `DATA:INDEX` for a writable layer's two files. Only the top of
//! a stack may be writable.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{GlobalConfig, ImageConfig, Lower, LOCAL_LAYER_NAMES};
use crate::detect::open_layer_blob;
use crate::error::{Error, IoContext, Result};
use crate::io::{LocalFile, ReadAt};
use crate::lsmt::{
    self, ReadOnlyLayer, WritableLayer, FLAG_DATA, FLAG_HEADER, FLAG_SEALED, FLAG_SPARSE,
};
use crate::remote::download::Switchable;
use crate::remote::Remote;
use crate::stack::Stack;
use crate::storage::{Container, Fetch};

/// A layer named on a command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerSpec {
    /// A file whose kind is detected when opened.
    File(PathBuf),
    /// A writable layer's data and index files.
    Writable { data: PathBuf, index: PathBuf },
}

impl LayerSpec {
    /// `DATA:INDEX` names a writable layer; anything else one file.
    pub fn parse(text: &str) -> LayerSpec {
        match text.split_once(':') {
            Some((data, index)) if !data.is_empty() && !index.is_empty() => LayerSpec::Writable {
                data: data.into(),
                index: index.into(),
            },
            _ => LayerSpec::File(text.into()),
        }
    }
}

/// A layer once opened.
pub enum OpenedLayer {
    ReadOnly(ReadOnlyLayer),
    Writable(WritableLayer),
}

/// Open a read-only layer blob (plain, ZFile or tar-wrapped).
pub fn open_read_only(path: &Path) -> Result<ReadOnlyLayer> {
    let file = LocalFile::open(path)?;
    ReadOnlyLayer::open(open_layer_blob(Arc::new(file))?)
}

/// Open a layer of any kind; writable layers are opened for writing only
/// when `writable` is set.
pub fn open_layer(spec: &LayerSpec, writable: bool) -> Result<OpenedLayer> {
    match spec {
        LayerSpec::Writable { data, index } => Ok(OpenedLayer::Writable(WritableLayer::open(
            data,
            Some(index),
            writable,
        )?)),
        LayerSpec::File(path) => {
            // A sparse writable data file has a header with the sparse bit and no trailer.
            if let Some(header) = plain_lsmt_header(path)? {
                if header.has(FLAG_SPARSE) && !header.has(FLAG_SEALED) {
                    return Ok(OpenedLayer::Writable(WritableLayer::open(
                        path, None, writable,
                    )?));
                }
            }
            open_read_only(path)
                .map(OpenedLayer::ReadOnly)
                .map_err(|e| {
                    if let Ok(Some(h)) = plain_lsmt_header(path) {
                        if h.has(FLAG_HEADER) && h.has(FLAG_DATA) && !is_sealed(path) {
                            return Error::Invalid(format!(
                                "{}: this is a writable layer's data file; name it as DATA:INDEX",
                                path.display()
                            ));
                        }
                    }
                    e
                })
        }
    }
}

/// The LSMT header at the start of `path`, if it has one (without unwrapping).
fn plain_lsmt_header(path: &Path) -> Result<Option<lsmt::Header>> {
    let file = LocalFile::open(path)?;
    if file.size() < lsmt::HEADER_SIZE {
        return Ok(None);
    }
    let mut block = vec![0u8; lsmt::HEADER_SIZE as usize];
    file.read_exact_at(&mut block, 0)
        .context(|| path.display().to_string())?;
    Ok(lsmt::Header::parse(&block, &path.display().to_string()).ok())
}

fn is_sealed(path: &Path) -> bool {
    let Ok(file) = LocalFile::open(path) else {
        return false;
    };
    let size = file.size();
    let mut block = vec![0u8; lsmt::HEADER_SIZE as usize];
    size >= 2 * lsmt::HEADER_SIZE
        && file
            .read_exact_at(&mut block, size - lsmt::HEADER_SIZE)
            .is_ok()
        && lsmt::Header::parse(&block, "").is_ok_and(|h| h.has(FLAG_SEALED))
}

/// Open `specs` (bottom → top) as a stack. Only the last may be writable.
pub fn open_stack(specs: &[LayerSpec], writable: bool) -> Result<Stack> {
    let mut lowers = Vec::with_capacity(specs.len());
    let mut top = None;
    for (i, spec) in specs.iter().enumerate() {
        match open_layer(spec, writable)? {
            OpenedLayer::ReadOnly(layer) => lowers.push(layer),
            OpenedLayer::Writable(layer) if i + 1 == specs.len() => top = Some(Arc::new(layer)),
            OpenedLayer::Writable(layer) => {
                return Err(Error::Invalid(format!(
                    "{}: only the top (last) layer of a stack may be writable",
                    layer.name()
                )))
            }
        }
    }
    Stack::new(lowers, top)
}

/// Open the image an image config describes, with the default global
/// config (see [`open_config_global`]).
pub fn open_config(config: &ImageConfig, writable: bool) -> Result<Stack> {
    open_config_global(config, &GlobalConfig::default(), writable)
}

/// Open the image an image config describes. A lower is read from a local
/// file when there is one (`file`, or `dir/overlaybd.commit`, `dir/.commit`,
/// `dir/overlaybd.sealed`), else from `repoBlobUrl/<digest>` through the
/// blob cache `global` describes (built only if some lower needs it).
pub fn open_config_global(
    config: &ImageConfig,
    global: &GlobalConfig,
    writable: bool,
) -> Result<Stack> {
    open_config_inner(
        config,
        writable,
        RemoteSlot::Lazy {
            global,
            built: None,
        },
    )
}

/// As [`open_config_global`], with a [`Remote`] the caller built (its
/// registry client and cache are shared with other images).
pub fn open_config_remote(config: &ImageConfig, remote: &Remote, writable: bool) -> Result<Stack> {
    open_config_inner(config, writable, RemoteSlot::Given(remote))
}

/// The registry side of opening an image, built only when a lower needs it.
enum RemoteSlot<'a> {
    Given(&'a Remote),
    Lazy {
        global: &'a GlobalConfig,
        built: Option<Box<Remote>>,
    },
}

impl RemoteSlot<'_> {
    fn get(&mut self) -> Result<&Remote> {
        match self {
            RemoteSlot::Given(remote) => Ok(remote),
            RemoteSlot::Lazy { global, built } => {
                if built.is_none() {
                    *built = Some(Box::new(Remote::new(global)?));
                }
                Ok(built.as_ref().expect("built above"))
            }
        }
    }
}

fn open_config_inner(
    config: &ImageConfig,
    writable: bool,
    mut remote: RemoteSlot<'_>,
) -> Result<Stack> {
    // Local layers are opened at once; registry blobs first have the ends
    // every layer format keeps its header and trailer in fetched, all
    // blobs together, then are opened in order.
    enum Opening {
        Local(Box<ReadOnlyLayer>),
        Remote(Arc<dyn Fetch>),
    }
    // As the reference: the acceleration layer's trace is replayed, so
    // there is nothing to record into.
    if config.acceleration_layer && config.record_trace_path.is_some() {
        return Err(Error::Invalid(
            "cannot record a trace (recordTracePath) into an image with an acceleration layer"
                .into(),
        ));
    }
    let lowers = config.image_lowers();
    let mut opening = Vec::with_capacity(lowers.len());
    for lower in lowers {
        let candidates = lower.local_candidates();
        let path = candidates.iter().find(|p| p.exists());
        match (path, lower) {
            (_, Lower::Frozen { data, index }) => {
                let layer = WritableLayer::open(data, index.as_deref(), false)?;
                opening.push(Opening::Local(Box::new(ReadOnlyLayer::frozen(&layer)?)));
            }
            (Some(path), _) => opening.push(Opening::Local(Box::new(open_read_only(path)?))),
            (None, Lower::File { file }) => {
                return Err(Error::io(
                    file.display().to_string(),
                    std::io::Error::from_raw_os_error(libc::ENOENT),
                ))
            }
            (None, Lower::Dir { dir }) => {
                return Err(Error::io(
                    format!(
                        "{}: no layer file ({})",
                        dir.display(),
                        LOCAL_LAYER_NAMES.join(", ")
                    ),
                    std::io::Error::from_raw_os_error(libc::ENOENT),
                ))
            }
            (None, Lower::Blob { dir, digest, size }) => opening.push(Opening::Remote(
                open_remote_lower(config, remote.get()?, dir, digest, *size)?,
            )),
        }
    }
    let blobs: Vec<&dyn Fetch> = opening
        .iter()
        .filter_map(|o| match o {
            Opening::Remote(blob) => Some(blob.as_ref()),
            Opening::Local(_) => None,
        })
        .collect();
    fetch_layer_ends(&blobs);
    let mut lowers = Vec::with_capacity(opening.len());
    for layer in opening {
        lowers.push(match layer {
            Opening::Local(layer) => *layer,
            Opening::Remote(blob) => {
                ReadOnlyLayer::open(open_layer_blob(Container::Remote(blob))?)?
            }
        });
    }
    let top = match &config.upper {
        Some(upper) => Some(Arc::new(WritableLayer::open(
            &upper.data,
            upper.index.as_deref(),
            writable,
        )?)),
        None => None,
    };
    Stack::new(lowers, top)
}

/// Bytes read at each end of a registry blob before its layer is opened.
const LAYER_END: u64 = 4096;

/// Read the first and last [`LAYER_END`] bytes of every blob at once, so
/// that opening the layers one after another finds their headers and
/// trailers (and, when it is small, the index before the trailer) in the
/// cache: one round trip for the image instead of two or three per layer.
/// A failure is left for the layer's open to meet and report.
fn fetch_layer_ends(blobs: &[&dyn Fetch]) {
    std::thread::scope(|scope| {
        for &blob in blobs {
            let size = blob.size();
            let len = size.min(LAYER_END);
            let ends = if size > len {
                vec![0, size - len]
            } else {
                vec![0]
            };
            for offset in ends {
                scope.spawn(move || {
                    let mut buf = vec![0u8; len as usize];
                    let _ = blob.read_exact_at(&mut buf, offset);
                });
            }
        }
    });
}

/// A registry lower: the cached blob, behind a switchable source when a
/// background download will replace it with `dir/overlaybd.commit`.
fn open_remote_lower(
    config: &ImageConfig,
    remote: &Remote,
    dir: &Path,
    digest: &str,
    size: u64,
) -> Result<Arc<dyn Fetch>> {
    let blob = remote.open_blob(config, digest, size)?;
    let download = config.effective_download(&remote.global().download);
    if !download.enable {
        return Ok(blob);
    }
    let switchable = Arc::new(Switchable::new(blob.clone() as Arc<dyn Fetch>));
    remote.start_download(download, blob, digest, dir, &switchable);
    Ok(switchable)
}
