//! The layer stack: up to 255 read-only layers, bottom → top, and an
//! optional writable layer on top, merged into one virtual block device.
//!
//! The stack answers one question fast — for a logical range, which pieces
//! come from which layer at which file offset, and which are zeros — as a
//! [`Plan`]. [`Stack::access`] turns each piece into an [`Access`]: where
//! its bytes are stored and whether they must be decoded, as types. Executing
//! that is separate: [`Stack::read`] does it with synchronous reads, and
//! front ends do it their own way (io_uring, a thread pool).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use crate::error::{Error, Result};
use crate::index::{IntervalMap, Piece, SECTOR};
use crate::lsmt::{ReadOnlyLayer, WritableLayer};
use crate::storage::{Access, At};

/// At most this many read-only layers in one stack.
pub const MAX_LAYERS: usize = 255;

/// Where one piece of a read comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceSource {
    /// Reads as zeros (unmapped, or discarded).
    Zero,
    /// Bytes of layer `layer` (0 = bottom; `lowers.len()` = the writable
    /// top) at byte `position` of its layer file.
    Layer { layer: usize, position: u64 },
}

/// One piece of a plan: `length` bytes from `source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanPiece {
    pub length: u64,
    pub source: PieceSource,
}

/// The pieces that make up a logical range, in order.
pub type Plan = Vec<PlanPiece>;

/// Called with the pieces of every plan the stack makes (see
/// [`Stack::set_read_observer`]); it must be quick and must not block.
pub type ReadObserver = Arc<dyn Fn(&[PlanPiece]) + Send + Sync>;

pub struct Stack {
    lowers: Vec<ReadOnlyLayer>,
    /// All lower layers' indexes merged; each extent tagged with its layer.
    lower_map: IntervalMap,
    top: Option<Arc<WritableLayer>>,
    /// Grows with the writable layer ([`Stack::grow`]), never shrinks.
    virtual_size: AtomicU64,
    /// Set at most once; one atomic load per plan when unset.
    observer: OnceLock<ReadObserver>,
    /// Orders writes to a sparse top: shared for writes of whole
    /// [`SPARSE_UNIT`]s, exclusive for one that fills a unit around itself.
    sparse_units: RwLock<()>,
}

/// The unit a sparse layer's file is allocated in, as far as obd relies on
/// it: what a reopen sees of a sparse layer is the file's allocated extents
/// (`SEEK_DATA`), which come in whole file system blocks.
pub const SPARSE_UNIT: u64 = 4096;

/// Bytes to store in the writable layer.
#[derive(Clone, Copy)]
enum Store<'a> {
    Bytes(&'a [u8]),
    Zeros(u64),
}

impl Store<'_> {
    fn len(&self) -> u64 {
        match self {
            Store::Bytes(b) => b.len() as u64,
            Store::Zeros(n) => *n,
        }
    }

    fn write_to(&self, top: &WritableLayer, offset: u64) -> Result<()> {
        match *self {
            Store::Bytes(b) => top.write(b, offset),
            Store::Zeros(n) => top.store_zeros(offset, n),
        }
    }

    /// Put this store's bytes for `[at, at + out.len())`, clipped to where
    /// the store (at `offset`) has bytes, into `out`.
    fn overlay(&self, offset: u64, out: &mut [u8], at: u64) {
        let from = offset.max(at);
        let to = (offset + self.len()).min(at + out.len() as u64);
        if from >= to {
            return;
        }
        let dst = &mut out[(from - at) as usize..(to - at) as usize];
        match *self {
            Store::Bytes(b) => {
                dst.copy_from_slice(&b[(from - offset) as usize..(to - offset) as usize])
            }
            Store::Zeros(_) => dst.fill(0),
        }
    }
}

impl Stack {
    /// Merge `lowers` (bottom → top) under an optional writable `top`.
    pub fn new(lowers: Vec<ReadOnlyLayer>, top: Option<Arc<WritableLayer>>) -> Result<Stack> {
        if lowers.len() > MAX_LAYERS {
            return Err(Error::Invalid(format!(
                "{} layers given; a stack holds at most {MAX_LAYERS}",
                lowers.len()
            )));
        }
        if lowers.is_empty() && top.is_none() {
            return Err(Error::Invalid("a stack needs at least one layer".into()));
        }
        let mut lower_map = IntervalMap::new();
        for (i, layer) in lowers.iter().enumerate() {
            for entry in &layer.entries {
                lower_map.insert(entry.offset, entry.extent(i as u8));
            }
        }
        // The topmost layer that states a size wins.
        let lower_size = lowers
            .iter()
            .rev()
            .map(|l| l.virtual_size())
            .find(|&s| s != 0)
            .unwrap_or(0);
        let virtual_size = match &top {
            Some(t) if t.virtual_size() != 0 => t.virtual_size(),
            // A writable layer created with size 0 takes the lowers' size
            // into its headers when first stacked, as in the reference.
            Some(t) if lower_size != 0 => {
                t.grow(lower_size)?;
                lower_size
            }
            _ => lower_size,
        };
        if virtual_size == 0 {
            return Err(Error::Invalid(
                "no layer of the stack states a virtual size".into(),
            ));
        }
        Ok(Stack {
            lowers,
            lower_map,
            top,
            virtual_size: AtomicU64::new(virtual_size),
            observer: OnceLock::new(),
            sparse_units: RwLock::new(()),
        })
    }

    /// Have `observer` see the pieces of every plan made from now on — the
    /// reads the stack serves, whichever front end executes them (trace
    /// recording uses this). At most one observer per stack; a second call
    /// is an error. An observer that stops caring should turn itself into a
    /// cheap no-op.
    pub fn set_read_observer(&self, observer: ReadObserver) -> Result<()> {
        self.observer
            .set(observer)
            .map_err(|_| Error::Invalid("this stack already has a read observer".into()))
    }

    pub fn virtual_size(&self) -> u64 {
        self.virtual_size.load(Ordering::Acquire)
    }

    /// Grow the image to `new_size` bytes, online: the writable layer's
    /// virtual size grows (and is written to its files), and reads past
    /// the lower layers' end are zeros. A stack without a writable layer
    /// cannot grow (its size is its layers'), nor can any stack shrink.
    pub fn grow(&self, new_size: u64) -> Result<()> {
        let Some(top) = &self.top else {
            return Err(Error::Invalid(
                "a read-only image cannot grow: it has no writable layer".into(),
            ));
        };
        let old = self.virtual_size();
        if new_size < old {
            return Err(Error::Invalid(format!(
                "the image cannot shrink from {old} to {new_size} bytes"
            )));
        }
        top.grow(new_size)?;
        self.virtual_size.store(new_size, Ordering::Release);
        Ok(())
    }

    pub fn lowers(&self) -> &[ReadOnlyLayer] {
        &self.lowers
    }

    pub fn top(&self) -> Option<&Arc<WritableLayer>> {
        self.top.as_ref()
    }

    /// Number of extents in the merged lower index.
    pub fn merged_extents(&self) -> usize {
        self.lower_map.len()
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        if !offset.is_multiple_of(SECTOR) || !length.is_multiple_of(SECTOR) {
            return Err(Error::Invalid(format!(
                "I/O at {offset}+{length} is not 512-byte aligned"
            )));
        }
        let size = self.virtual_size();
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(Error::Invalid(format!(
                "I/O at {offset}+{length} passes the end of the image ({size} bytes)"
            )));
        }
        Ok(())
    }

    /// The plan for `[offset, offset + length)` (512-aligned, inside the
    /// image), appended to `out`. Adjacent zero pieces are merged.
    pub fn plan(&self, offset: u64, length: u64, out: &mut Plan) -> Result<()> {
        self.check_range(offset, length)?;
        let first = out.len();
        let sector = offset / SECTOR;
        let sectors = length / SECTOR;
        let mut pieces = Vec::new();
        match &self.top {
            Some(top) => {
                let mut top_pieces = Vec::new();
                top.lookup(sector, sectors, &mut top_pieces);
                let top_index = self.lowers.len();
                for piece in top_pieces {
                    match piece.mapping {
                        Some(_) => push_piece(out, &piece, Some(top_index)),
                        None => {
                            pieces.clear();
                            self.lower_map
                                .lookup(piece.offset, piece.length, &mut pieces);
                            for p in &pieces {
                                push_piece(out, p, None);
                            }
                        }
                    }
                }
            }
            None => {
                self.lower_map.lookup(sector, sectors, &mut pieces);
                for p in &pieces {
                    push_piece(out, p, None);
                }
            }
        }
        if let Some(observer) = self.observer.get() {
            // A leading zero piece may have merged into the caller's last one.
            observer(&out[first..]);
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` (both 512-aligned).
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut plan = Vec::new();
        self.plan(offset, buf.len() as u64, &mut plan)?;
        let mut done = 0usize;
        for piece in plan {
            let chunk = &mut buf[done..done + piece.length as usize];
            self.read_piece(chunk, piece.source)?;
            done += piece.length as usize;
        }
        Ok(())
    }

    /// How the `len` bytes of plan piece `source` are obtained: zeros, bytes
    /// stored in a local file or a blob that may fetch, or ZFile blocks to
    /// decode. Front ends execute this their own way; [`Stack::read_piece`]
    /// does it synchronously.
    pub fn access(&self, source: PieceSource, len: u64) -> Result<Access<'_>> {
        let PieceSource::Layer { layer, position } = source else {
            return Ok(Access::Zero);
        };
        if let Some(lower) = self.lowers.get(layer) {
            return lower
                .data()
                .access(position, len)
                .map_err(|e| Error::io(lower.source().name().to_string(), e));
        }
        match &self.top {
            Some(top) if layer == self.lowers.len() => Ok(Access::Plain(At::File {
                file: top.data_file(),
                offset: position,
            })),
            _ => Err(Error::Invalid(format!(
                "plan names layer {layer}, which does not exist"
            ))),
        }
    }

    /// Execute one plan piece synchronously.
    pub fn read_piece(&self, buf: &mut [u8], source: PieceSource) -> Result<()> {
        let access = self.access(source, buf.len() as u64)?;
        access
            .read(buf)
            .map_err(|e| Error::io(self.layer_name(source), e))
    }

    fn layer_name(&self, source: PieceSource) -> String {
        match source {
            PieceSource::Layer { layer, .. } => match self.lowers.get(layer) {
                Some(lower) => lower.source().name().to_string(),
                None => self
                    .top
                    .as_ref()
                    .map_or_else(String::new, |t| t.name().to_string()),
            },
            PieceSource::Zero => String::new(),
        }
    }

    fn writable(&self) -> Result<&WritableLayer> {
        self.top
            .as_deref()
            .ok_or_else(|| Error::Invalid("the image is read-only (no writable layer)".into()))
    }

    /// Write to the writable top layer.
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let top = self.writable()?;
        if top.is_sparse() {
            return self.store_sparse(top, offset, Store::Bytes(buf));
        }
        top.write(buf, offset)
    }

    /// Whether storing `[offset, offset + len)` first reads what the stack
    /// holds around it (part of a [`SPARSE_UNIT`] of a sparse top: see
    /// [`Stack::write`]), which may mean a registry fetch; front ends that
    /// must not wait on the network run such writes elsewhere.
    pub fn store_reads_around(&self, offset: u64, len: u64) -> bool {
        self.top.as_ref().is_some_and(|top| top.is_sparse())
            && (!offset.is_multiple_of(SPARSE_UNIT)
                || !(offset + len).is_multiple_of(SPARSE_UNIT)
                    && offset + len != self.virtual_size())
    }

    /// Store into a sparse top. A store that covers part of a
    /// [`SPARSE_UNIT`] would, once the layer is reopened, leave the rest
    /// of that unit reading as zeros (the unit is allocated) instead of
    /// what the layers below hold. So the unit is first read as the stack
    /// shows it now and written whole, with the new bytes in place; the
    /// exclusive lock keeps a concurrent store to the same unit from being
    /// undone by it. (Such stores are rare: 512-byte or 1 KiB writes, a
    /// partition table, a file system with 1 KiB blocks.)
    fn store_sparse(&self, top: &WritableLayer, offset: u64, store: Store<'_>) -> Result<()> {
        let len = store.len();
        let end = offset + len;
        let size = self.virtual_size();
        let head = offset / SPARSE_UNIT * SPARSE_UNIT;
        let tail = (end.div_ceil(SPARSE_UNIT) * SPARSE_UNIT).min(size);
        if head == offset && tail == end {
            let _shared = self.sparse_units.read().unwrap_or_else(|e| e.into_inner());
            return store.write_to(top, offset);
        }
        let _alone = self.sparse_units.write().unwrap_or_else(|e| e.into_inner());
        let mut unit = vec![0u8; SPARSE_UNIT as usize];
        let mut partial = vec![head];
        let last_unit = (tail - 1) / SPARSE_UNIT * SPARSE_UNIT;
        if last_unit != head {
            partial.push(last_unit);
        }
        let mut middle = (offset, end);
        for &at in &partial {
            let unit_end = (at + SPARSE_UNIT).min(size);
            if at >= offset && unit_end <= end {
                continue; // Covered whole by the store.
            }
            let unit = &mut unit[..(unit_end - at) as usize];
            self.read(unit, at)?;
            store.overlay(offset, unit, at);
            top.write(unit, at)?;
            if at < offset {
                middle.0 = middle.0.max(unit_end);
            } else {
                middle.1 = middle.1.min(at);
            }
        }
        if middle.0 < middle.1 {
            match store {
                Store::Bytes(b) => top.write(
                    &b[(middle.0 - offset) as usize..(middle.1 - offset) as usize],
                    middle.0,
                ),
                Store::Zeros(_) => top.store_zeros(middle.0, middle.1 - middle.0),
            }?;
        }
        Ok(())
    }

    /// Discard (zero) a range in the writable top layer. It reads as zeros
    /// from then on, across reopening too: a sparse top layer has no index
    /// to say "zeroed", so where a lower layer holds data under the range,
    /// zeros are stored instead of a hole (which would read through).
    pub fn discard(&self, offset: u64, length: u64) -> Result<()> {
        self.check_range(offset, length)?;
        let top = self.writable()?;
        top.discard(offset, length)?;
        if top.is_sparse() {
            let mut pieces = Vec::new();
            self.lower_map
                .lookup(offset / SECTOR, length / SECTOR, &mut pieces);
            for piece in pieces {
                if piece.mapping.is_some_and(|m| !m.zeroed) {
                    let zeros = Store::Zeros(piece.length * SECTOR);
                    self.store_sparse(top, piece.offset * SECTOR, zeros)?;
                }
            }
        }
        Ok(())
    }

    /// Persist the writable top layer (no-op for a read-only image).
    pub fn flush(&self) -> Result<()> {
        match &self.top {
            Some(top) => top.flush(),
            None => Ok(()),
        }
    }
}

/// Append a lookup piece as plan pieces; `layer` overrides the extent's own tag.
fn push_piece(out: &mut Plan, piece: &Piece, layer: Option<usize>) {
    let length = piece.length * SECTOR;
    let source = match piece.mapping {
        Some(m) if !m.zeroed => PieceSource::Layer {
            layer: layer.unwrap_or(m.layer as usize),
            position: m.moffset * SECTOR,
        },
        _ => PieceSource::Zero,
    };
    if let (Some(last), PieceSource::Zero) = (out.last_mut(), source) {
        if last.source == PieceSource::Zero {
            last.length += length;
            return;
        }
    }
    out.push(PlanPiece { length, source });
}
