//! One OCI layer tarball applied to an ext4, by the image-spec rules:
//!
//! - entries apply in archive order; an entry over an existing name
//!   replaces it, except a directory over a directory, which takes the new
//!   owner, mode, time and xattrs and keeps its contents;
//! - `DIR/.wh.NAME` removes NAME (and all under it) as the lower layers
//!   left it; `DIR/.wh..wh..opq` removes all of DIR's lower contents.
//!   Entries of this same layer survive both, wherever they come in the
//!   archive; a whiteout of a name that does not exist does nothing (the
//!   spec allows it, and real layers have them);
//! - missing parent directories are made 0755 root:root; a parent that is
//!   a symlink is followed inside the image (as containerd does: `..`
//!   stops at the root, absolute targets start from it); a parent that is
//!   another kind of file is an error;
//! - hard links name an inode already in the file system (this layer's or
//!   a lower one's); symlink targets are stored verbatim.
//!
//! Names are cleaned lexically (`./a//b` = `a/b`, `a/../b` = `b`); a name
//! that climbs above the root is an error, never a write outside it. The
//! tar is read once, front to back, with file data copied through a
//! 1 MiB buffer: memory stays bounded by the set of names this layer
//! touched (needed for the rules above), not by file sizes.

use std::cell::Cell;
use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::rc::Rc;

use tar::EntryType;

use crate::fs::{file_type, Attrs, Ext4, Ino, Special, Xattr, ROOT, S_IFDIR, S_IFLNK};
use crate::{pax, Error, Result};

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// Counts of what one layer did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub files: u64,
    pub file_bytes: u64,
    pub whiteouts: u64,
}

/// The layer file at `path`, decompressed if it is gzip or zstd (told by
/// its first bytes, not its name).
pub fn open_layer(path: &Path) -> Result<Box<dyn Read>> {
    let file = File::open(path).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    decompress(file, &path.display().to_string())
}

/// `raw` as a tar stream: gunzipped or un-zstd'ed when its first bytes say
/// it is compressed, as it is otherwise.
pub fn decompress(raw: impl Read + 'static, name: &str) -> Result<Box<dyn Read>> {
    let mut reader = BufReader::with_capacity(1 << 20, raw);
    let head = reader
        .fill_buf()
        .map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(reader))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(reader)
                .map_err(|e| Error::Layer(format!("{name}: zstd: {e}")))?,
        )
    } else {
        Box::new(reader)
    })
}

/// Apply the tar stream `layer` to `fs`.
pub fn apply(fs: &mut Ext4, layer: impl Read) -> Result<Stats> {
    let eof = Rc::new(Cell::new(false));
    let watched = EofWatch {
        inner: layer,
        eof: eof.clone(),
    };
    let mut archive = tar::Archive::new(watched);
    let mut applier = Applier::new(fs);
    // Raw entries: long names and pax headers are read here (see `pax`).
    let entries = archive
        .entries()
        .map_err(|e| Error::Layer(format!("not a tar archive: {e}")))?
        .raw(true);
    let mut pending = Pending::default();
    let mut global: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::Layer(format!("reading the tar: {e}")))?;
        match entry.header().entry_type() {
            EntryType::XHeader => {
                if pending.pax.is_some() {
                    return Err(Error::Layer("two pax headers for one entry".into()));
                }
                pending.pax = Some(owned_records(&read_meta(&mut entry)?)?);
            }
            EntryType::XGlobalHeader => {
                global.extend(owned_records(&read_meta(&mut entry)?)?);
            }
            EntryType::GNULongName => pending.long_name = Some(trim_nul(read_meta(&mut entry)?)),
            EntryType::GNULongLink => pending.long_link = Some(trim_nul(read_meta(&mut entry)?)),
            _ => {
                let meta = std::mem::take(&mut pending);
                let header = read_header(&mut entry, meta, &global)?;
                applier.entry(&mut entry, header)?;
            }
        }
    }
    if eof.get() || !pending.is_empty() {
        return Err(Error::Layer(
            "the tar ends early (no end-of-archive blocks): truncated?".into(),
        ));
    }
    Ok(applier.stats)
}

/// What the metadata entries before an entry said about it.
#[derive(Default)]
struct Pending {
    pax: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.pax.is_none() && self.long_name.is_none() && self.long_link.is_none()
    }
}

/// Longest pax header or GNU long name accepted (the data is held in memory).
const MAX_META: u64 = 1 << 20;

fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<u8>> {
    if entry.size() > MAX_META {
        return Err(Error::Layer(format!(
            "a {} byte tar metadata entry (the limit is {MAX_META})",
            entry.size()
        )));
    }
    let mut data = Vec::with_capacity(entry.size() as usize);
    entry
        .read_to_end(&mut data)
        .map_err(|e| Error::Layer(format!("reading a tar metadata entry: {e}")))?;
    if data.len() as u64 != entry.size() {
        return Err(Error::Layer(
            "the tar ends inside a metadata entry: truncated?".into(),
        ));
    }
    Ok(data)
}

fn owned_records(data: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    Ok(pax::records(data)
        .map_err(Error::Layer)?
        .into_iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect())
}

fn trim_nul(mut name: Vec<u8>) -> Vec<u8> {
    while name.last() == Some(&0) {
        name.pop();
    }
    name
}

/// Notes when the stream under the tar reader ends: a complete archive
/// stops at its end-of-archive block before that.
struct EofWatch<R> {
    inner: R,
    eof: Rc<Cell<bool>>,
}

impl<R: Read> Read for EofWatch<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof.set(true);
        }
        Ok(n)
    }
}

/// A cleaned path: its components, none empty, `.` or `..`.
type Components = Vec<Vec<u8>>;

/// Lexical cleaning of a tar member name; `..` above the root is an error.
pub fn clean(raw: &[u8]) -> Result<Components> {
    let mut out: Components = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err(Error::Layer(format!(
                        "{:?} climbs above the root",
                        String::from_utf8_lossy(raw)
                    )));
                }
            }
            name if name.len() > 255 => {
                return Err(Error::Layer(format!(
                    "a name in {:?} is {} bytes; ext4 names hold at most 255",
                    String::from_utf8_lossy(raw),
                    name.len()
                )))
            }
            name => out.push(name.to_vec()),
        }
    }
    let length = out.iter().map(|c| c.len() + 1).sum::<usize>();
    if length > MAX_PATH {
        return Err(Error::Layer(format!(
            "a {length} byte path: longer than Linux's {MAX_PATH} (PATH_MAX)"
        )));
    }
    Ok(out)
}

/// Longest cleaned path accepted (Linux's PATH_MAX, the NUL included);
/// it also bounds how deep directories nest, so removing a tree by
/// recursion stays shallow.
const MAX_PATH: usize = 4096;

fn joined(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.join(&b'/')
}

fn child_path(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}

fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// What a tar header (with its pax records) says about an entry.
struct Header {
    path: Vec<u8>,
    kind: EntryType,
    attrs: Attrs,
    xattrs: Vec<Xattr>,
    link: Option<Vec<u8>>,
    device: Option<(u32, u32)>,
    size: u64,
}

fn bad(path: &[u8], what: impl std::fmt::Display) -> Error {
    Error::Layer(format!("{}: {what}", show(path)))
}

fn read_header<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    meta: Pending,
    global: &[(Vec<u8>, Vec<u8>)],
) -> Result<Header> {
    let header = entry.header();
    let mut path = meta
        .long_name
        .unwrap_or_else(|| header.path_bytes().into_owned());
    let mut link = meta
        .long_link
        .or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
    let kind = header.entry_type();
    // A numeric field left empty (all NUL or spaces) reads as 0, as GNU
    // tar and Go's archive/tar read it; anything else must parse.
    let old = header.as_old();
    let number = |field: &[u8], parsed: std::io::Result<u64>| -> Result<u64> {
        if field.iter().all(|&b| b == 0 || b == b' ') {
            return Ok(0);
        }
        parsed.map_err(|e| bad(&path, e))
    };
    let mode = number(&old.mode, header.mode().map(u64::from))? as u32;
    let mut uid = number(&old.uid, header.uid())?;
    let mut gid = number(&old.gid, header.gid())?;
    let mut mtime = number(&old.mtime, header.mtime())? as i64;
    let device = match kind {
        EntryType::Char | EntryType::Block => {
            let major = header.device_major().map_err(|e| bad(&path, e))?;
            let minor = header.device_minor().map_err(|e| bad(&path, e))?;
            Some((major.unwrap_or(0), minor.unwrap_or(0)))
        }
        _ => None,
    };
    let size = entry.size();
    let mut xattrs: Vec<Xattr> = Vec::new();
    let local = meta.pax.unwrap_or_default();
    for (key, value) in global.iter().chain(local.iter()) {
        let key = key.as_slice();
        let number = |what: &str| -> Result<i64> {
            let text = std::str::from_utf8(value).unwrap_or("");
            // Seconds may carry a fraction; ext4 gets whole seconds here.
            let whole = text.split('.').next().unwrap_or("");
            whole
                .parse()
                .map_err(|_| bad(&path, format!("pax {what} {text:?} is not a number")))
        };
        match key {
            b"path" => path = value.clone(),
            b"linkpath" => link = Some(value.clone()),
            b"uid" => {
                uid = u64::try_from(number("uid")?).map_err(|_| bad(&path, "negative uid"))?
            }
            b"gid" => {
                gid = u64::try_from(number("gid")?).map_err(|_| bad(&path, "negative gid"))?
            }
            b"mtime" => mtime = number("mtime")?,
            b"size" if u64::try_from(number("size")?).ok() != Some(size) => {
                return Err(bad(
                    &path,
                    "a pax size record differing from the header is not supported",
                ));
            }
            _ if key.starts_with(b"SCHILY.xattr.") => {
                let name = key[b"SCHILY.xattr.".len()..].to_vec();
                xattrs.retain(|(n, _)| *n != name);
                xattrs.push((name, value.clone()));
            }
            _ if key.starts_with(b"GNU.sparse.") => {
                return Err(bad(&path, "sparse tar entries are not supported"))
            }
            _ => {}
        }
    }
    let uid =
        u32::try_from(uid).map_err(|_| bad(&path, format!("uid {uid} does not fit 32 bits")))?;
    let gid =
        u32::try_from(gid).map_err(|_| bad(&path, format!("gid {gid} does not fit 32 bits")))?;
    Ok(Header {
        path,
        kind,
        attrs: Attrs {
            mode: (mode & 0o7777) as u16,
            uid,
            gid,
            mtime,
        },
        xattrs,
        link,
        device,
        size,
    })
}

/// The state of applying one layer.
pub struct Applier<'a> {
    fs: &'a mut Ext4,
    /// Paths this layer made (whiteouts and opaque markers spare them).
    made: HashSet<Vec<u8>>,
    /// Directories holding something this layer made.
    above_made: HashSet<Vec<u8>>,
    stats: Stats,
}

impl<'a> Applier<'a> {
    pub fn new(fs: &'a mut Ext4) -> Applier<'a> {
        Applier {
            fs,
            made: HashSet::new(),
            above_made: HashSet::new(),
            stats: Stats::default(),
        }
    }

    fn mark_made(&mut self, path: &[u8]) {
        let mut end = 0;
        while let Some(slash) = path[end..].iter().position(|&b| b == b'/') {
            end += slash;
            self.above_made.insert(path[..end].to_vec());
            end += 1;
        }
        self.made.insert(path.to_vec());
    }

    /// The directory `parents` names and its path with symlinks resolved.
    /// Missing directories are made (0755 root:root) when `make` is set;
    /// otherwise a missing one gives `None`. A symlink on the way is
    /// followed inside the image's root (`..` stops at the root, an
    /// absolute target starts from it), as containerd's applier does.
    fn resolve_dir(
        &mut self,
        parents: &[Vec<u8>],
        whole: &[u8],
        make: bool,
    ) -> Result<Option<(Ino, Components)>> {
        const MAX_SYMLINKS: u32 = 40;
        let mut resolved: Vec<(Ino, Vec<u8>)> = Vec::new();
        let mut todo: VecDeque<Vec<u8>> = parents.iter().cloned().collect();
        let mut followed = 0;
        while let Some(name) = todo.pop_front() {
            match name.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    resolved.pop();
                    continue;
                }
                _ => {}
            }
            let dir = resolved.last().map_or(ROOT, |(ino, _)| *ino);
            let ino = match self.fs.lookup(dir, &name)? {
                Some(ino) => ino,
                None if make => self.fs.mkdir(
                    dir,
                    &name,
                    &Attrs {
                        mode: 0o755,
                        ..Attrs::default()
                    },
                )?,
                None => return Ok(None),
            };
            match file_type(self.fs.mode(ino)?) {
                S_IFDIR if resolved.len() >= MAX_PATH / 2 => {
                    return Err(bad(whole, "its parents nest too deep"));
                }
                S_IFDIR => resolved.push((ino, name)),
                S_IFLNK => {
                    followed += 1;
                    if followed > MAX_SYMLINKS {
                        return Err(bad(whole, "too many symlinks in its parents (a loop?)"));
                    }
                    let target = self.fs.read_link(ino)?;
                    if target.starts_with(b"/") {
                        resolved.clear();
                    }
                    for part in target.split(|&b| b == b'/').rev() {
                        todo.push_front(part.to_vec());
                    }
                }
                _ if make => {
                    return Err(bad(
                        whole,
                        format!("its parent {} is not a directory", show(&name)),
                    ))
                }
                _ => return Ok(None),
            }
        }
        let dir = resolved.last().map_or(ROOT, |(ino, _)| *ino);
        Ok(Some((
            dir,
            resolved.into_iter().map(|(_, name)| name).collect(),
        )))
    }

    /// The inode an existing cleaned path names (its last component not
    /// followed if it is a symlink), without making anything.
    fn find(&mut self, parts: &[Vec<u8>], whole: &[u8]) -> Result<Option<Ino>> {
        let Some((name, parents)) = parts.split_last() else {
            return Ok(None);
        };
        match self.resolve_dir(parents, whole, false)? {
            Some((dir, _)) => self.fs.lookup(dir, name),
            None => Ok(None),
        }
    }

    /// Remove what lower layers left at `path` (inode `ino`, `name` in
    /// `dir`), sparing what this layer made and the directories above it.
    fn remove_lower(&mut self, dir: Ino, name: &[u8], ino: Ino, path: &[u8]) -> Result<()> {
        if self.made.contains(path) {
            return Ok(());
        }
        if path == b"lost+found" {
            // e2fsck's directory, not the image's.
            return Ok(());
        }
        if self.above_made.contains(path) {
            for (child, child_ino) in self.fs.list(ino)? {
                let child_path = child_path(path, &child);
                self.remove_lower(ino, &child, child_ino, &child_path)?;
            }
            return Ok(());
        }
        self.fs.remove(dir, name, ino)
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, header: Header) -> Result<()> {
        self.stats.entries += 1;
        let parts = clean(&header.path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Ok(()); // the layer's root ("./")
        };
        let (dir, resolved) = self
            .resolve_dir(parents, &header.path, true)?
            .expect("resolve_dir makes what is missing");
        let dir_path = joined(&resolved);
        if name.as_slice() == OPAQUE {
            self.stats.whiteouts += 1;
            for (child, child_ino) in self.fs.list(dir)? {
                let path = child_path(&dir_path, &child);
                self.remove_lower(dir, &child, child_ino, &path)?;
            }
            return Ok(());
        }
        if let Some(victim) = name.strip_prefix(WHITEOUT) {
            self.stats.whiteouts += 1;
            if victim.is_empty() || victim == b"." || victim == b".." {
                return Err(bad(&header.path, "a whiteout must name an entry"));
            }
            if let Some(ino) = self.fs.lookup(dir, victim)? {
                let path = child_path(&dir_path, victim);
                self.remove_lower(dir, victim, ino, &path)?;
            }
            return Ok(());
        }
        let path = child_path(&dir_path, name);
        let existing = self.fs.lookup(dir, name)?;
        if header.kind == EntryType::Directory {
            if let Some(ino) = existing {
                if file_type(self.fs.mode(ino)?) == S_IFDIR {
                    self.fs.set_xattrs(ino, &header.xattrs)?;
                    self.fs.set_attrs(ino, &header.attrs)?;
                    self.mark_made(&path);
                    return Ok(());
                }
            }
        }
        if let Some(ino) = existing {
            if path == b"lost+found" {
                return Err(bad(&header.path, "lost+found belongs to the file system"));
            }
            self.fs.remove(dir, name, ino)?;
        }
        let ino = match header.kind {
            EntryType::Directory => self.fs.mkdir(dir, name, &header.attrs)?,
            EntryType::Regular | EntryType::Continuous => {
                let (ino, size) = self.fs.create_file(dir, name, &header.attrs, entry)?;
                if size != header.size {
                    return Err(bad(
                        &header.path,
                        format!(
                            "the tar ends inside it ({size} of {} bytes): truncated?",
                            header.size
                        ),
                    ));
                }
                self.stats.files += 1;
                self.stats.file_bytes += size;
                ino
            }
            EntryType::Symlink => {
                let target = header
                    .link
                    .as_deref()
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| bad(&header.path, "symlink without a target"))?;
                self.fs.symlink(dir, name, target, &header.attrs)?
            }
            EntryType::Link => {
                let target = header
                    .link
                    .as_deref()
                    .ok_or_else(|| bad(&header.path, "hard link without a target"))?;
                let target_parts = clean(target)?;
                let ino = self.find(&target_parts, &header.path)?.ok_or_else(|| {
                    bad(
                        &header.path,
                        format!("hard link to {}, which does not exist", show(target)),
                    )
                })?;
                if file_type(self.fs.mode(ino)?) == S_IFDIR {
                    return Err(bad(
                        &header.path,
                        format!("hard link to {}, a directory", show(target)),
                    ));
                }
                self.fs.hard_link(dir, name, ino)?;
                self.mark_made(&path);
                return Ok(());
            }
            EntryType::Char | EntryType::Block => {
                let (major, minor) = header.device.unwrap_or((0, 0));
                let kind = if header.kind == EntryType::Char {
                    Special::Char { major, minor }
                } else {
                    Special::Block { major, minor }
                };
                self.fs.mknod(dir, name, kind, &header.attrs)?
            }
            EntryType::Fifo => self.fs.mknod(dir, name, Special::Fifo, &header.attrs)?,
            other => {
                return Err(bad(
                    &header.path,
                    format!(
                        "tar entry type {:?} is not supported",
                        other.as_byte() as char
                    ),
                ))
            }
        };
        if !header.xattrs.is_empty() {
            self.fs.set_xattrs(ino, &header.xattrs)?;
        }
        self.mark_made(&path);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_names() {
        assert_eq!(
            clean(b"./a//b/").unwrap(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        assert_eq!(clean(b"a/../b").unwrap(), vec![b"b".to_vec()]);
        assert!(clean(b"./").unwrap().is_empty());
        assert!(clean(b"../etc/passwd").is_err());
        assert!(clean(b"a/../../b").is_err());
        assert!(clean(&[b'x'; 256]).is_err());
        assert!(clean("a/".repeat(2048).as_bytes()).is_ok());
        assert!(clean("a/".repeat(2049).as_bytes()).is_err());
    }
}
