//! Raw device events, as `obd trace record` writes them: obd's own format,
//! distinct from the overlaybd layer trace (which names layer files, not
//! devices, and has no time, process or file).
//!
//! JSON lines, UTF-8, one object per line:
//!
//! ```text
//! {"obd_events":1,"device":"/dev/loop0","major":7,"minor":0,"size":67108864,"page_size":4096,"start_unix_ns":1763790000000000000}
//! {"type":"block","t":1200345,"pid":4242,"comm":"cat","offset":1048576,"length":4096,"rwbs":"R"}
//! {"type":"page","t":1200100,"pid":4242,"comm":"cat","ino":12,"index":0,"pages":1}
//! {"type":"inode","ino":12,"path":"/etc/hostname"}
//! ```
//!
//! The first line is the header: format version, the device recorded, its
//! size in bytes, and when recording started (and, for a partition,
//! `disk_offset`: its start on the disk, in bytes). `block` is one request issued
//! to the device (`offset`/`length` in bytes, `rwbs` as the kernel spells it:
//! `R` read, `W` write, `D` discard, `F` flush, with `S`/`M`/`A`... flags);
//! `page` is a page-cache miss of a file on that device (`index` in pages of
//! `page_size`, `pages` = 2^folio order). `t` is nanoseconds since the
//! start. `inode` lines, written when recording ends, name the files the
//! page events refer to. Unknown keys are ignored; readers check the version.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use overlaybd::{Error, Result};
use serde::{Deserialize, Serialize};

pub const VERSION: u32 = 1;
/// Longest line accepted when reading (a corrupt file is not read whole
/// into one string).
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub obd_events: u32,
    pub device: String,
    pub major: u32,
    pub minor: u32,
    /// Device size in bytes.
    pub size: u64,
    pub page_size: u64,
    pub start_unix_ns: u64,
    /// Where the device starts on its disk, in bytes: a partition's start
    /// (block offsets are relative to the device itself). Absent = 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub disk_offset: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockEvent {
    pub t: u64,
    pub pid: u32,
    pub comm: String,
    pub offset: u64,
    pub length: u64,
    pub rwbs: String,
}

impl BlockEvent {
    pub fn is_read(&self) -> bool {
        self.rwbs.starts_with('R') || (self.rwbs.contains('R') && !self.rwbs.contains('W'))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageEvent {
    pub t: u64,
    pub pid: u32,
    pub comm: String,
    pub ino: u64,
    pub index: u64,
    pub pages: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InodeName {
    pub ino: u64,
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Event {
    Block(BlockEvent),
    Page(PageEvent),
    Inode(InodeName),
}

/// A whole event file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFile {
    pub header: Header,
    pub events: Vec<Event>,
}

impl EventFile {
    pub fn blocks(&self) -> impl Iterator<Item = &BlockEvent> {
        self.events.iter().filter_map(|e| match e {
            Event::Block(b) => Some(b),
            _ => None,
        })
    }

    pub fn pages(&self) -> impl Iterator<Item = &PageEvent> {
        self.events.iter().filter_map(|e| match e {
            Event::Page(p) => Some(p),
            _ => None,
        })
    }

    /// Inode → path as recorded.
    pub fn inode_names(&self) -> std::collections::HashMap<u64, PathBuf> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Inode(n) => Some((n.ino, n.path.clone())),
                _ => None,
            })
            .collect()
    }

    /// Does `bytes` look like an event file (for format detection)?
    pub fn sniff(bytes: &[u8]) -> bool {
        bytes.starts_with(b"{\"obd_events\"")
    }

    /// Read and check an event file.
    pub fn read(path: &Path) -> Result<EventFile> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|e| Error::io(&name, e))?;
        Self::parse(BufReader::new(file), &name)
    }

    /// Parse an event file from `reader`; `name` names it in errors.
    pub fn parse(mut reader: impl BufRead, name: &str) -> Result<EventFile> {
        let bad = |line: usize, problem: String| {
            Error::corrupt(name, format!("bad event file: line {line}: {problem}"))
        };
        let mut header: Option<Header> = None;
        let mut events = Vec::new();
        let mut buf = Vec::new();
        let mut line_no = 0;
        loop {
            buf.clear();
            line_no += 1;
            let n = std::io::Read::take(&mut reader, MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(|e| Error::io(name, e))?;
            if n == 0 {
                break;
            }
            if buf.len() > MAX_LINE {
                return Err(bad(line_no, format!("longer than {MAX_LINE} bytes")));
            }
            let text = buf.trim_ascii();
            if text.is_empty() {
                continue;
            }
            match &header {
                None => {
                    let h: Header = serde_json::from_slice(text)
                        .map_err(|e| bad(line_no, format!("not an obd event file header ({e})")))?;
                    if h.obd_events != VERSION {
                        return Err(bad(
                            line_no,
                            format!("format version {} (this obd reads {VERSION})", h.obd_events),
                        ));
                    }
                    header = Some(h);
                }
                Some(_) => {
                    let event: Event =
                        serde_json::from_slice(text).map_err(|e| bad(line_no, e.to_string()))?;
                    events.push(event);
                }
            }
        }
        let header = header.ok_or_else(|| Error::corrupt(name, "bad event file: it is empty"))?;
        Ok(EventFile { header, events })
    }
}

/// Writes an event file under a temporary name; [`EventWriter::finish`]
/// renames it into place.
pub struct EventWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
}

impl EventWriter {
    pub fn create(path: &Path, header: &Header) -> Result<EventWriter> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = PathBuf::from(tmp);
        let file = File::create(&tmp).map_err(|e| Error::io(tmp.display().to_string(), e))?;
        let mut writer = EventWriter {
            out: BufWriter::new(file),
            tmp,
            path: path.to_path_buf(),
        };
        writer.write_json(header)?;
        Ok(writer)
    }

    fn write_json(&mut self, value: &impl Serialize) -> Result<()> {
        let name = || self.tmp.display().to_string();
        serde_json::to_writer(&mut self.out, value)
            .map_err(|e| Error::io(name(), std::io::Error::other(e)))?;
        self.out.write_all(b"\n").map_err(|e| Error::io(name(), e))
    }

    pub fn write(&mut self, event: &Event) -> Result<()> {
        self.write_json(event)
    }

    /// Flush and move the file into place.
    pub fn finish(mut self) -> Result<()> {
        let name = self.tmp.display().to_string();
        self.out.flush().map_err(|e| Error::io(&name, e))?;
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| Error::io(self.path.display().to_string(), e))
    }
}
