//! The snapshot socket of a serving daemon: how `obd snapshot` asks the
//! process serving a device for a live snapshot, and `obd resize` for a
//! larger size (ublk devices only). A ublk daemon's is
//! `<run dir>/ublk/<id>.sock`; a vhost-user-blk daemon's (`obd serve`) is
//! `<run dir>/vhost/<hash>.sock`, named by a hash of its vhost-user
//! socket's path, so the user names that daemon by the socket the VMM
//! uses. One JSON line asks, one JSON line answers; only root can connect
//! (the socket is 0600).
//!
//! What the daemon does, in order, while new requests wait and none is in
//! flight ([`LiveStack::replace`]): flush the writable layer, create the
//! new one, rewrite the image config (written whole, synced, renamed into
//! place) so the old upper is the top lower and the new files the upper,
//! then serve the new stack. A crash at any point leaves a config naming
//! files that hold every acknowledged write: the old one until the rename,
//! the new one after.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use overlaybd::config::ImageConfig;
use overlaybd::live::{snapshot_stack, LiveStack, NewUpper};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How long a snapshot waits for the requests in flight to end.
const QUIET_WITHIN: Duration = Duration::from_secs(30);

/// What a client asks for.
#[derive(Debug, Serialize, Deserialize)]
pub enum Ask {
    Snapshot(Request),
    /// Grow the image and the device to `size` bytes.
    Resize {
        size: u64,
    },
}

/// Which kind of device the daemon serves (what a resize must tell).
#[derive(Clone, Copy, Debug)]
pub enum Front {
    Ublk(u32),
    VhostUserBlk,
}

/// A snapshot request: where the new writable layer goes (default: next
/// to the current one, numbered).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Request {
    pub data: Option<PathBuf>,
    pub index: Option<PathBuf>,
}

/// A writable layer's files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerFiles {
    pub data: PathBuf,
    pub index: Option<PathBuf>,
}

/// The answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Answer {
    Done {
        /// The old upper, now the top lower.
        frozen: LayerFiles,
        /// The new upper.
        upper: LayerFiles,
        config: PathBuf,
    },
    /// A resize: the sizes before and after.
    Resized {
        old: u64,
        new: u64,
    },
    Failed(String),
}

/// The snapshot socket of the daemon serving /dev/ublkb`dev_id`.
pub fn socket_path(dev_id: u32) -> PathBuf {
    ublk_target::state::dir().join(format!("{dev_id}.sock"))
}

/// The snapshot socket of the daemon serving vhost-user-blk on
/// `vhost_socket`, in the run dir next to the ublk one (`/run/obd/vhost`).
/// The same socket named another way (a relative path, a symlinked
/// directory) gives the same name.
pub fn vhost_socket_path(vhost_socket: &Path) -> PathBuf {
    let canonical = canonical_socket(vhost_socket);
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    ublk_target::state::dir()
        .with_file_name("vhost")
        .join(format!("{}.sock", &hex::encode(digest)[..16]))
}

/// `path` with its directory resolved (the socket itself may not exist
/// yet).
fn canonical_socket(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => fs::canonicalize(dir)
            .map(|dir| dir.join(name))
            .unwrap_or(absolute),
        _ => absolute,
    }
}

/// Start answering snapshot requests on the socket `path` for the device
/// whose stack is `live` and whose image config is `config`, on a thread
/// of its own.
pub fn listen(path: PathBuf, live: Arc<LiveStack>, config: PathBuf, front: Front) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    let _ = fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| path.display().to_string())?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        .with_context(|| path.display().to_string())?;
    std::thread::Builder::new()
        .name("obd-snapshot".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = answer(stream, &live, &config, front) {
                    eprintln!("obd: snapshot socket: {e:#}");
                }
            }
        })
        .context("cannot start the snapshot socket's thread")?;
    Ok(())
}

/// Remove a snapshot socket (its daemon is ending).
pub fn remove(path: &Path) {
    let _ = fs::remove_file(path);
}

fn answer(stream: UnixStream, live: &LiveStack, config: &Path, front: Front) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let (what, result) = match serde_json::from_str::<Ask>(&line) {
        Ok(Ask::Snapshot(request)) => ("snapshot", take(live, config, &request)),
        Ok(Ask::Resize { size }) => ("resize", resize(live, front, size)),
        Err(e) => ("request", Err(anyhow!("unreadable request: {e}"))),
    };
    let answer = result.unwrap_or_else(|e| Answer::Failed(format!("{e:#}")));
    match &answer {
        Answer::Done { frozen, upper, .. } => eprintln!(
            "obd: snapshot: {} is now a read-only lower; writes go to {}",
            frozen.data.display(),
            upper.data.display()
        ),
        Answer::Resized { old, new } => {
            eprintln!("obd: resize: the image and the device grew from {old} to {new} bytes")
        }
        Answer::Failed(reason) => eprintln!("obd: {what} failed: {reason}"),
    }
    let mut stream = stream;
    writeln!(stream, "{}", serde_json::to_string(&answer)?)?;
    Ok(())
}

/// Grow the image to `size` bytes, then the device. The kernel's support
/// is checked first, so an unsupported resize changes nothing.
fn resize(live: &LiveStack, front: Front, size: u64) -> Result<Answer> {
    let Front::Ublk(id) = front else {
        bail!("a vhost-user-blk disk cannot be resized online yet; nothing was changed");
    };
    let old = live.current().virtual_size();
    if size < old {
        bail!("the image is {old} bytes and cannot shrink to {size}; nothing was changed");
    }
    if size == old {
        return Ok(Answer::Resized { old, new: size });
    }
    if live.current().top().is_none() {
        bail!("the image has no writable layer (`upper`), so it cannot grow; nothing was changed");
    }
    if !ublk_target::device::can_update_size(id).map_err(|e| anyhow!(e))? {
        bail!(
            "this kernel's ublk driver ({}) cannot resize a live device (no UBLK_F_UPDATE_SIZE; \
             Linux 6.16 or later has it); nothing was changed: the image and /dev/ublkb{id} keep \
             {old} bytes",
            kernel_release()
        );
    }
    live.grow(size)
        .with_context(|| format!("cannot grow the image; /dev/ublkb{id} keeps {old} bytes"))?;
    ublk_target::device::update_size(id, size).map_err(|e| {
        anyhow!("{e}; the image grew to {size} bytes but /dev/ublkb{id} keeps {old} until it is added again")
    })?;
    if let Some(mut record) = ublk_target::state::DeviceRecord::load(id) {
        record.size = size;
        if let Err(e) = record.save() {
            eprintln!("obd: cannot update the record of /dev/ublkb{id}: {e}");
        }
    }
    Ok(Answer::Resized { old, new: size })
}

fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| format!("Linux {}", r.trim()))
        .unwrap_or_else(|_| "this kernel".into())
}

/// Take the snapshot (see the module doc).
fn take(live: &LiveStack, config_path: &Path, request: &Request) -> Result<Answer> {
    let config = ImageConfig::load(config_path)?;
    let Some(old) = config.upper.as_ref() else {
        bail!("the image has no writable layer (`upper`) to snapshot");
    };
    let frozen = LayerFiles {
        data: old.data.clone(),
        index: old.index.clone(),
    };
    let upper = match (&request.data, &request.index) {
        (Some(data), index) => {
            if index.is_some() != old.index.is_some() {
                bail!(
                    "the new writable layer must be of the current one's kind ({})",
                    if old.index.is_some() {
                        "data and index files"
                    } else {
                        "one sparse file, no index"
                    }
                );
            }
            LayerFiles {
                data: data.clone(),
                index: index.clone(),
            }
        }
        (None, Some(_)) => bail!("an index for the new writable layer needs its data file too"),
        (None, None) => next_to(&frozen)?,
    };
    let text =
        fs::read_to_string(config_path).with_context(|| config_path.display().to_string())?;
    let rewritten = rewrite_config(&text, &frozen, &upper)
        .with_context(|| format!("{}: cannot rewrite it", config_path.display()))?;
    live.replace(QUIET_WITHIN, |stack| {
        let next = snapshot_stack(
            stack,
            &NewUpper {
                data: &upper.data,
                index: upper.index.as_deref(),
            },
        )?;
        if let Err(e) = write_synced(config_path, &rewritten) {
            let _ = fs::remove_file(&upper.data);
            if let Some(index) = &upper.index {
                let _ = fs::remove_file(index);
            }
            return Err(overlaybd::error::Error::Invalid(format!(
                "{}: cannot write the new config: {e:#}",
                config_path.display()
            )));
        }
        Ok((next, ()))
    })?;
    Ok(Answer::Done {
        frozen,
        upper,
        config: config_path.to_path_buf(),
    })
}

/// The config with `frozen` appended to `lowers` and `upper` naming the new
/// files; every other key is kept as it was.
fn rewrite_config(text: &str, frozen: &LayerFiles, upper: &LayerFiles) -> Result<String> {
    let mut json: serde_json::Value = serde_json::from_str(text)?;
    let object = json
        .as_object_mut()
        .ok_or_else(|| anyhow!("not a JSON object"))?;
    let files = |layer: &LayerFiles| {
        let mut files = serde_json::Map::new();
        files.insert("data".into(), layer.data.display().to_string().into());
        if let Some(index) = &layer.index {
            files.insert("index".into(), index.display().to_string().into());
        }
        files
    };
    let lowers = object
        .entry("lowers")
        .or_insert_with(|| serde_json::Value::Array(Vec::new()));
    if lowers.is_null() {
        *lowers = serde_json::Value::Array(Vec::new());
    }
    lowers
        .as_array_mut()
        .ok_or_else(|| anyhow!("`lowers` is not a list"))?
        .push(serde_json::Value::Object(files(frozen)));
    let upper_entry = object
        .entry("upper")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    let upper_object = upper_entry
        .as_object_mut()
        .ok_or_else(|| anyhow!("`upper` is not an object"))?;
    upper_object.remove("index");
    upper_object.extend(files(upper));
    let text = serde_json::to_string_pretty(&json)?;
    // What is written must load.
    ImageConfig::from_json(&text, "the rewritten config")?;
    Ok(text)
}

/// Write `path` whole: a synced temporary file renamed over it, then the
/// directory synced.
fn write_synced(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let temp = dir.join(format!(
        ".{}.snapshot-{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut file = fs::File::create(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// The first free numbered name next to the current upper: `upper.data`
/// (and `upper.index`) → `upper-1.data` (`upper-1.index`), then `-2`...
fn next_to(current: &LayerFiles) -> Result<LayerFiles> {
    for n in 1..10_000 {
        let data = numbered(&current.data, n)?;
        let index = current.index.as_ref().map(|i| numbered(i, n)).transpose()?;
        if !data.exists() && !index.as_ref().is_some_and(|i| i.exists()) {
            return Ok(LayerFiles { data, index });
        }
    }
    bail!(
        "no free numbered name next to {}; give --data (and --index)",
        current.data.display()
    )
}

/// `dir/stem[-k].ext` → `dir/stem-n.ext`.
fn numbered(path: &Path, n: u32) -> Result<PathBuf> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| anyhow!("{}: not a file name obd can number", path.display()))?;
    let base = match stem.rsplit_once('-') {
        Some((base, k)) if !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => stem,
    };
    let name = match path.extension().and_then(|e| e.to_str()) {
        Some(ext) => format!("{base}-{n}.{ext}"),
        None => format!("{base}-{n}"),
    };
    Ok(path.with_file_name(name))
}

/// Ask the daemon listening on the snapshot socket `path` for a snapshot;
/// `device` names its device in errors, `served_by` the command that
/// serves such a device.
pub fn request(path: &Path, device: &str, served_by: &str, request: &Ask) -> Result<Answer> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        anyhow!(
            "cannot reach the daemon of {device} at {}: {e} (is the device served by {served_by}, and is its daemon running?)",
            path.display()
        )
    })?;
    writeln!(stream, "{}", serde_json::to_string(request)?)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        bail!("the daemon of {device} closed the socket without an answer");
    }
    Ok(serde_json::from_str(&line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_names_go_next_to_the_current_ones() {
        assert_eq!(
            numbered(Path::new("/x/upper.data"), 1).unwrap(),
            PathBuf::from("/x/upper-1.data")
        );
        assert_eq!(
            numbered(Path::new("/x/upper-1.data"), 2).unwrap(),
            PathBuf::from("/x/upper-2.data")
        );
        assert_eq!(
            numbered(Path::new("/x/my-disk"), 3).unwrap(),
            PathBuf::from("/x/my-disk-3")
        );
    }

    #[test]
    fn a_vhost_socket_named_two_ways_has_one_snapshot_socket() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let plain = dir.path().join("vm.sock");
        let roundabout = dir.path().join("sub/../vm.sock");
        assert_eq!(vhost_socket_path(&plain), vhost_socket_path(&roundabout));
        assert_ne!(
            vhost_socket_path(&plain),
            vhost_socket_path(&dir.path().join("vm2.sock"))
        );
        let name = vhost_socket_path(&plain);
        assert_eq!(name.parent().unwrap().file_name().unwrap(), "vhost");
    }

    #[test]
    fn the_rewritten_config_keeps_every_other_key() {
        let text = r#"{"lowers":[{"file":"/l0"}],"upper":{"data":"/u.data","index":"/u.index","target":"/t"},"resultFile":"/r"}"#;
        let frozen = LayerFiles {
            data: "/u.data".into(),
            index: Some("/u.index".into()),
        };
        let upper = LayerFiles {
            data: "/u-1.data".into(),
            index: Some("/u-1.index".into()),
        };
        let out = rewrite_config(text, &frozen, &upper).unwrap();
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["lowers"][1]["data"], "/u.data");
        assert_eq!(json["lowers"][1]["index"], "/u.index");
        assert_eq!(json["upper"]["data"], "/u-1.data");
        assert_eq!(json["upper"]["index"], "/u-1.index");
        assert_eq!(json["upper"]["target"], "/t");
        assert_eq!(json["resultFile"], "/r");
        // Sparse: no index anywhere.
        let sparse = LayerFiles {
            data: "/s.data".into(),
            index: None,
        };
        let next = LayerFiles {
            data: "/s-1.data".into(),
            index: None,
        };
        let out = rewrite_config(r#"{"upper":{"data":"/s.data"}}"#, &sparse, &next).unwrap();
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["lowers"][0]["data"], "/s.data");
        assert!(json["lowers"][0].get("index").is_none());
        assert_eq!(json["upper"]["data"], "/s-1.data");
    }
}
