//! Opening images: a layer file of any supported kind, a list of layers, or
//! an image config, turned into a [`Stack`].
//!
//! A layer argument is a path to a read-only layer (committed, sealed,
//! ZFile, tar-wrapped: detected from its bytes), a sparse writable data
//! file, or `DATA:INDEX` for a writable layer's two files. Only the top of
//! a stack may be writable.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{ImageConfig, Lower};
use crate::detect::open_layer_blob;
use crate::error::{Error, IoContext, Result};
use crate::io::{LocalFile, ReadAt};
use crate::lsmt::{
    self, ReadOnlyLayer, WritableLayer, FLAG_DATA, FLAG_HEADER, FLAG_SEALED, FLAG_SPARSE,
};
use crate::stack::Stack;

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
    let source = open_layer_blob(Arc::new(file))?;
    ReadOnlyLayer::open(source)
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

/// Open the image an image config describes. Lowers are local files here;
/// a registry blob without a local copy is a clear error until remote
/// layers are supported.
pub fn open_config(config: &ImageConfig, writable: bool) -> Result<Stack> {
    let mut lowers = Vec::with_capacity(config.lowers.len());
    for lower in &config.lowers {
        let candidates = lower.local_candidates();
        let path = candidates.iter().find(|p| p.exists());
        match (path, lower) {
            (Some(path), _) => lowers.push(open_read_only(path)?),
            (None, Lower::File { file }) => {
                return Err(Error::io(
                    file.display().to_string(),
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                ))
            }
            (None, Lower::Blob { dir, digest, .. }) => {
                return Err(Error::Invalid(format!(
                    "layer {digest}: no local copy in {} (overlaybd.commit, .commit or overlaybd.sealed), and fetching registry blobs is not supported yet",
                    dir.display()
                )))
            }
        }
    }
    let top = match &config.upper {
        Some(upper) => Some(Arc::new(WritableLayer::open(
            &upper.data,
            Some(&upper.index),
            writable,
        )?)),
        None => None,
    };
    Stack::new(lowers, top)
}
