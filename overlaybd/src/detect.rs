//! What a layer blob is made of, and the plain LSMT bytes inside it.
//!
//! Registry and local layer blobs come in several wrappings (tar around
//! ZFile around LSMT, or any subset). The reference checks them in a fixed
//! order — tar wrapper, then ZFile, then the LSMT itself — and so does
//! [`open_layer_blob`], so callers above it only ever see LSMT bytes.

use std::fmt;
use std::sync::Arc;

use crate::error::{IoContext, Result};
use crate::io::{ReadAt, Source};
use crate::storage::{Container, LayerData, Stored};
use crate::tar::{self, TarPayload};
use crate::zfile::{HeaderTrailer, ZFileInfo, ZFileReader, HT_SPACE};

/// The wrappings found around a layer's LSMT bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobKind {
    /// No wrapper: the blob is the layer file itself.
    Raw,
    /// A ZFile holding the layer.
    ZFile(ZFileInfo),
    /// A tar whose payload is the layer file.
    TarRaw(TarPayload),
    /// A tar whose payload is a ZFile holding the layer.
    TarZFile(TarPayload, ZFileInfo),
}

impl BlobKind {
    pub fn tar(&self) -> Option<&TarPayload> {
        match self {
            BlobKind::TarRaw(t) | BlobKind::TarZFile(t, _) => Some(t),
            _ => None,
        }
    }

    pub fn zfile(&self) -> Option<&ZFileInfo> {
        match self {
            BlobKind::ZFile(z) | BlobKind::TarZFile(_, z) => Some(z),
            _ => None,
        }
    }
}

impl fmt::Display for BlobKind {
    /// e.g. `tar (pax, payload 1536+667229) > zfile (lz4, 4 KiB blocks, 163 blocks, CRC)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(t) = self.tar() {
            let pax = if t.pax { "pax, " } else { "" };
            parts.push(format!("tar ({pax}payload {}+{})", t.offset, t.size));
        }
        if let Some(z) = self.zfile() {
            let crc = if z.verify { ", CRC" } else { "" };
            parts.push(format!(
                "zfile ({}, {} KiB blocks, {} blocks{crc})",
                z.algorithm,
                z.block_size / 1024,
                z.blocks
            ));
        }
        parts.push("raw".to_string());
        f.write_str(&parts.join(" > "))
    }
}

/// Whether `src` starts with a ZFile header magic.
fn looks_like_zfile(src: &dyn ReadAt) -> Result<bool> {
    if src.size() < HT_SPACE as u64 {
        return Ok(false);
    }
    let mut head = [0u8; 24];
    src.read_exact_at(&mut head, 0)
        .context(|| src.name().to_string())?;
    Ok(HeaderTrailer::has_magic(&head))
}

/// Unwrap a stored blob (tar, then ZFile) and say what was found.
pub fn detect_layer_blob(container: impl Into<Container>) -> Result<(LayerData, BlobKind)> {
    let container = container.into();
    let whole = container.source();
    // The payload window both checks that the payload fits inside the blob
    // and is the source the layer's bytes are read through.
    let (stored, inner, tar): (Stored, Source, _) = match tar::detect(&*whole)? {
        Some(payload) => {
            let window = Arc::new(payload.window(whole)?);
            let stored = Stored {
                container,
                base: payload.offset,
                len: payload.size,
            };
            (stored, window, Some(payload))
        }
        None => (Stored::whole(container), whole, None),
    };
    let (data, zfile) = if looks_like_zfile(&*inner)? {
        let reader = Arc::new(ZFileReader::open(inner)?);
        let info = reader.info().clone();
        (LayerData::ZFile { reader, stored }, Some(info))
    } else {
        (
            LayerData::Plain {
                stored,
                source: inner,
            },
            None,
        )
    };
    let kind = match (tar, zfile) {
        (None, None) => BlobKind::Raw,
        (None, Some(z)) => BlobKind::ZFile(z),
        (Some(t), None) => BlobKind::TarRaw(t),
        (Some(t), Some(z)) => BlobKind::TarZFile(t, z),
    };
    Ok((data, kind))
}

/// The plain layer (LSMT) bytes of a blob, whatever wraps them.
pub fn open_layer_blob(container: impl Into<Container>) -> Result<LayerData> {
    detect_layer_blob(container).map(|(data, _)| data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{Bytes, Source};
    use crate::zfile::{compress, Algorithm, Flavor, ZFileOptions};
    use std::io::Cursor;

    fn zfile_of(data: &[u8]) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        let opts = ZFileOptions {
            algorithm: Algorithm::Lz4,
            block_size: 4096,
            flavor: Flavor::CommitOutput,
        };
        compress(
            &Bytes::new(data.to_vec(), "in"),
            &mut out,
            &opts,
            &mut |_| {},
        )
        .unwrap();
        out.into_inner()
    }

    fn source(data: Vec<u8>, name: &str) -> Source {
        Arc::new(Bytes::new(data, name))
    }

    fn read_all(data: &LayerData) -> Vec<u8> {
        let src = data.source();
        let mut v = vec![0u8; src.size() as usize];
        src.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn raw_stays_raw() {
        let data = b"LSMT\0\x01\x02 not really".to_vec();
        let (plain, kind) = detect_layer_blob(source(data.clone(), "r")).unwrap();
        assert_eq!(kind, BlobKind::Raw);
        assert_eq!(read_all(&plain), data);
        assert_eq!(kind.to_string(), "raw");
    }

    #[test]
    fn zfile_is_decompressed() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i / 7) as u8).collect();
        let (plain, kind) = detect_layer_blob(source(zfile_of(&data), "z")).unwrap();
        assert!(matches!(kind, BlobKind::ZFile(_)));
        assert_eq!(read_all(&plain), data);
        assert_eq!(
            kind.to_string(),
            "zfile (lz4, 4 KiB blocks, 3 blocks, CRC) > raw"
        );
    }

    #[test]
    fn broken_zfile_is_an_error_not_raw() {
        let mut z = zfile_of(&[1u8; 5000]);
        z[40] ^= 1; // header index field: digest no longer matches
        let err = open_layer_blob(source(z, "bad")).err().unwrap();
        assert!(err.to_string().contains("digest"), "{err}");
    }
}
