//! The two JSON configs overlaybd reads: the per-device image config
//! (`config.v1.json`, written by the containerd snapshotter) and the daemon's
//! global config (`/etc/overlaybd/overlaybd.json`).
//!
//! They are typed here so the rest of the engine never touches JSON, and so a
//! bad file fails when it is loaded, with the file, line, column and problem,
//! rather than later as a puzzling I/O error.
//!
//! Rules that keep existing files loading:
//! - Unknown keys are ignored, as the reference tools ignore them: files
//!   written for other reference versions (`gzipCacheConfig`,
//!   `registryFsVersion`, `enableThread`, ...) still load. The price is that a
//!   misspelt key is silently ignored and its default used.
//! - An empty string or `null` means "not set": the snapshotter writes
//!   `"resultFile": ""`, `"upper": {}` and `"lowers": null` for absent values.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeOwned, IgnoredAny, Unexpected};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, IoContext, Result};

/// Where the daemon looks for its global config.
pub const GLOBAL_CONFIG_PATH: &str = "/etc/overlaybd/overlaybd.json";

/// File names under a lower's `dir` that hold an already-downloaded layer,
/// in the order they are tried.
pub const LOCAL_LAYER_NAMES: [&str; 3] = ["overlaybd.commit", ".commit", "overlaybd.sealed"];

// ---------------------------------------------------------------------------
// Image config
// ---------------------------------------------------------------------------

/// One device's `config.v1.json`.
///
/// Relative local paths (`file`, `dir`, the upper's `index`, `data` and
/// `target`, `resultFile`, `recordTracePath`) are resolved against the
/// directory holding the config file by [`ImageConfig::load`];
/// [`ImageConfig::from_json`] leaves them as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    /// `https://host/v2/<repo>/blobs`: where [`Lower::Blob`] layers are fetched.
    #[serde(
        default,
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub repo_blob_url: Option<String>,
    /// Read-only layers, bottom → top.
    #[serde(default, deserialize_with = "lowers")]
    pub lowers: Vec<Lower>,
    /// The writable layer; `None` for a read-only device (`"upper": {}`).
    #[serde(
        default,
        deserialize_with = "upper_or_none",
        skip_serializing_if = "Option::is_none"
    )]
    pub upper: Option<UpperConfig>,
    /// Receives `success` or `failed:<reason>` once the device is up (or not).
    #[serde(
        default,
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub result_file: Option<PathBuf>,
    /// Trace file: empty → record reads into it, non-empty → replay it.
    #[serde(
        default,
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub record_trace_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub acceleration_layer: bool,
    /// Per-image background-download settings; see
    /// [`ImageConfig::effective_download`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<DownloadOverride>,
}

/// A read-only layer of an image.
///
/// A lower with both `file` and `dir` is a local file: `file` wins, as in
/// the reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawLower", into = "RawLower")]
pub enum Lower {
    /// A local layer file (LSMT, maybe ZFile-compressed, maybe tar-wrapped).
    File { file: PathBuf },
    /// A registry blob, read from `dir` when a downloaded copy is there
    /// (see [`LOCAL_LAYER_NAMES`]), else from `repoBlobUrl/<digest>`.
    Blob {
        dir: PathBuf,
        digest: String,
        size: u64,
    },
    /// A layer that only exists in `dir` (one of [`LOCAL_LAYER_NAMES`]):
    /// the acceleration layer `ctr record-trace` makes has only `dir`.
    Dir { dir: PathBuf },
    /// A writable layer that is written no more, read as a lower (obd's
    /// extension: `data`, and `index` unless it is sparse). `obd snapshot`
    /// leaves the device's old upper here until `obd commit` makes a
    /// committed layer of it.
    Frozen {
        data: PathBuf,
        index: Option<PathBuf>,
    },
}

impl Lower {
    /// The paths where a downloaded copy of a [`Lower::Blob`] may be, in
    /// lookup order; the file itself for a [`Lower::File`].
    pub fn local_candidates(&self) -> Vec<PathBuf> {
        match self {
            Lower::File { file } => vec![file.clone()],
            Lower::Frozen { data, .. } => vec![data.clone()],
            Lower::Blob { dir, .. } | Lower::Dir { dir } => {
                LOCAL_LAYER_NAMES.iter().map(|n| dir.join(n)).collect()
            }
        }
    }
}

/// The writable top layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpperConfig {
    /// The index file; none for a sparse writable layer (obd's extension:
    /// `upper` with only `data`, naming a file made by `obd create -s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<PathBuf>,
    pub data: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsize: Option<u64>,
}

/// `download` in an image config: each key present replaces the global one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DownloadOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_extra: Option<u64>,
    #[serde(default, rename = "maxMBps", skip_serializing_if = "Option::is_none")]
    pub max_mbps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub try_cnt: Option<u32>,
    #[serde(
        default,
        deserialize_with = "non_zero_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub block_size: Option<u64>,
}

impl ImageConfig {
    /// Read and check `path`, resolving relative local paths against its
    /// directory.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).context(|| path.display().to_string())?;
        let mut config = Self::from_json(&text, &path.display().to_string())?;
        config.resolve_paths(path.parent().unwrap_or(Path::new("")));
        Ok(config)
    }

    /// Parse and check an image config; `context` names it in errors.
    pub fn from_json(text: &str, context: &str) -> Result<Self> {
        let config: Self = parse(text, context, "image config")?;
        if config.lowers.is_empty() && config.upper.is_none() {
            return Err(Error::corrupt(
                context,
                "the image config has no layers: `lowers` is empty and there is no `upper`",
            ));
        }
        Ok(config)
    }

    /// The lowers that make up the image: all of them, except the last when
    /// `accelerationLayer` is set. That one is the acceleration layer
    /// `ctr record-trace` adds: a directory holding a trace to prefetch
    /// with, not a layer (as in the reference, which drops it from the
    /// stack).
    pub fn image_lowers(&self) -> &[Lower] {
        match self.lowers.split_last() {
            Some((_, image)) if self.acceleration_layer => image,
            _ => &self.lowers,
        }
    }

    /// The trace an acceleration layer carries, `<its dir>/trace`, when
    /// `accelerationLayer` is set and the last lower has a `dir`.
    pub fn acceleration_trace(&self) -> Option<PathBuf> {
        if !self.acceleration_layer {
            return None;
        }
        match self.lowers.last()? {
            Lower::Dir { dir } | Lower::Blob { dir, .. } => Some(dir.join("trace")),
            Lower::File { .. } | Lower::Frozen { .. } => None,
        }
    }

    /// The URL of a registry blob: `repoBlobUrl/<digest>`.
    pub fn blob_url(&self, digest: &str) -> Result<String> {
        let base = self.repo_blob_url.as_deref().ok_or_else(|| {
            Error::Invalid(format!(
                "layer {digest} is a registry blob but the image config has no repoBlobUrl"
            ))
        })?;
        Ok(format!("{}/{digest}", base.trim_end_matches('/')))
    }

    /// The download settings for this image: the global ones with every key
    /// this image's `download` sets replaced.
    pub fn effective_download(&self, global: &DownloadConfig) -> DownloadConfig {
        let Some(o) = &self.download else {
            return global.clone();
        };
        DownloadConfig {
            enable: o.enable.unwrap_or(global.enable),
            delay: o.delay.unwrap_or(global.delay),
            delay_extra: o.delay_extra.unwrap_or(global.delay_extra),
            max_mbps: o.max_mbps.unwrap_or(global.max_mbps),
            try_cnt: o.try_cnt.unwrap_or(global.try_cnt),
            block_size: o.block_size.unwrap_or(global.block_size),
        }
    }

    /// Write `success` or `failed:<reason>` to `resultFile`, if one is set.
    /// The file is replaced atomically (write then rename) so a poller never
    /// sees it half written.
    pub fn write_result(&self, outcome: std::result::Result<(), String>) -> Result<()> {
        let Some(path) = &self.result_file else {
            return Ok(());
        };
        let text = match outcome {
            Ok(()) => "success".to_string(),
            Err(reason) => format!("failed:{reason}"),
        };
        let Some(name) = path.file_name() else {
            return Err(Error::Invalid(format!(
                "resultFile {} does not name a file",
                path.display()
            )));
        };
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        fs::write(&tmp, text).context(|| tmp.display().to_string())?;
        fs::rename(&tmp, path).context(|| path.display().to_string())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let mut paths: Vec<&mut PathBuf> = Vec::new();
        for lower in &mut self.lowers {
            match lower {
                Lower::File { file } => paths.push(file),
                Lower::Blob { dir, .. } | Lower::Dir { dir } => paths.push(dir),
                Lower::Frozen { data, index } => {
                    paths.push(data);
                    paths.extend(index.as_mut());
                }
            }
        }
        if let Some(upper) = &mut self.upper {
            if let Some(index) = &mut upper.index {
                paths.push(index);
            }
            paths.push(&mut upper.data);
            paths.extend(upper.target.as_mut());
        }
        paths.extend(self.result_file.as_mut());
        paths.extend(self.record_trace_path.as_mut());
        for path in paths {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }
}

/// A lower as written: which keys are set decides the kind.
#[derive(Default, Serialize, Deserialize)]
struct RawLower {
    #[serde(
        default,
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    file: Option<PathBuf>,
    #[serde(
        default,
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    dir: Option<PathBuf>,
    #[serde(
        default,
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(
        default,
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    data: Option<PathBuf>,
    #[serde(
        default,
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    index: Option<PathBuf>,
    /// TurboOCI (data left in the original gzip layer): refused until
    /// supported, never ignored.
    #[serde(default, rename = "gzipIndex", skip_serializing_if = "Option::is_none")]
    gzip_index: Option<serde_json::Value>,
    #[serde(
        default,
        rename = "targetFile",
        skip_serializing_if = "Option::is_none"
    )]
    target_file: Option<serde_json::Value>,
    #[serde(
        default,
        rename = "targetDigest",
        skip_serializing_if = "Option::is_none"
    )]
    target_digest: Option<serde_json::Value>,
}

impl TryFrom<RawLower> for Lower {
    type Error = String;

    fn try_from(raw: RawLower) -> std::result::Result<Self, String> {
        let turbo_oci: Vec<&str> = [
            ("gzipIndex", raw.gzip_index.is_some()),
            ("targetFile", raw.target_file.is_some()),
            ("targetDigest", raw.target_digest.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect();
        if !turbo_oci.is_empty() {
            return Err(format!(
                "a TurboOCI lower ({}) keeps its data in the original gzip layer, which obd \
                 cannot serve yet; use an image converted to overlaybd layers",
                turbo_oci.join(", ")
            ));
        }
        if let Some(file) = raw.file {
            return Ok(Lower::File { file });
        }
        match (raw.data, raw.index) {
            (Some(data), index) => return Ok(Lower::Frozen { data, index }),
            (None, Some(_)) => {
                return Err("a frozen writable lower with an `index` needs its `data` too".into())
            }
            (None, None) => {}
        }
        // A zero size is what Go's omitempty leaves out, so it counts as unset.
        let size = raw.size.filter(|&s| s != 0);
        match (raw.dir, raw.digest, size) {
            (Some(dir), Some(digest), Some(size)) => Ok(Lower::Blob { dir, digest, size }),
            (Some(dir), None, None) => Ok(Lower::Dir { dir }),
            (dir, digest, size) => {
                let missing: Vec<&str> = [
                    ("`dir`", dir.is_none()),
                    ("`digest`", digest.is_none()),
                    ("a non-zero `size`", size.is_none()),
                ]
                .into_iter()
                .filter_map(|(name, absent)| absent.then_some(name))
                .collect();
                Err(format!(
                    "a lower layer needs either `file`, `dir` alone (a layer file in it), \
                     or `dir`, `digest` and `size`; this one has no `file` and is missing {}",
                    missing.join(", ")
                ))
            }
        }
    }
}

impl From<Lower> for RawLower {
    fn from(lower: Lower) -> Self {
        match lower {
            Lower::File { file } => RawLower {
                file: Some(file),
                ..RawLower::default()
            },
            Lower::Blob { dir, digest, size } => RawLower {
                dir: Some(dir),
                digest: Some(digest),
                size: Some(size),
                ..RawLower::default()
            },
            Lower::Dir { dir } => RawLower {
                dir: Some(dir),
                ..RawLower::default()
            },
            Lower::Frozen { data, index } => RawLower {
                data: Some(data),
                index,
                ..RawLower::default()
            },
        }
    }
}

/// `lowers` as written (`null` means none); errors name the lower's index,
/// since serde can only point at the end of the list.
fn lowers<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<Lower>, D::Error> {
    let raw = Option::<Vec<RawLower>>::deserialize(d)?.unwrap_or_default();
    raw.into_iter()
        .enumerate()
        .map(|(i, raw)| {
            Lower::try_from(raw).map_err(|p| de::Error::custom(format!("lowers[{i}]: {p}")))
        })
        .collect()
}

/// `upper` as written: absent, `null` or `{}` mean a read-only device.
#[derive(Deserialize)]
struct RawUpper {
    #[serde(default, deserialize_with = "non_empty")]
    index: Option<PathBuf>,
    #[serde(default, deserialize_with = "non_empty")]
    data: Option<PathBuf>,
    #[serde(default, deserialize_with = "non_empty")]
    target: Option<PathBuf>,
    #[serde(default)]
    vsize: Option<u64>,
}

fn upper_or_none<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<UpperConfig>, D::Error> {
    let Some(raw) = Option::<RawUpper>::deserialize(d)? else {
        return Ok(None);
    };
    match (raw.index, raw.data) {
        (index, Some(data)) => Ok(Some(UpperConfig {
            index,
            data,
            target: raw.target,
            vsize: raw.vsize,
        })),
        (None, None) if raw.target.is_none() && raw.vsize.is_none() => Ok(None),
        _ => Err(de::Error::custom(
            "`upper` needs `data` (and `index`, unless the data file is a sparse \
             writable layer), or neither, for a read-only device",
        )),
    }
}

// ---------------------------------------------------------------------------
// Global config
// ---------------------------------------------------------------------------

/// The daemon's `overlaybd.json`. Every key is optional; absent keys take
/// the defaults below. Keys without a default in the format spec are
/// `Option`s, `None` when absent, and the code using them decides.
///
/// Legacy top-level keys are still read, each only when its new key is
/// absent from the file: `registryCacheDir` → `cacheConfig.cacheDir`,
/// `registryCacheSizeGB` → `cacheConfig.cacheSizeGB`, `credentialFilePath`
/// → `credentialConfig.path`, `logLevel` → `logConfig.logLevel`, `logPath` →
/// `logConfig.logPath`. An empty legacy string or a zero legacy cache size
/// counts as not set (they were the reference's defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct GlobalConfig {
    pub log_config: LogConfig,
    pub cache_config: CacheConfig,
    pub credential_config: CredentialConfig,
    /// The reference's I/O engine number, as written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<u32>,
    pub download: DownloadConfig,
    pub p2p_config: P2pConfig,
    pub exporter_config: ExporterConfig,
    pub prefetch_config: PrefetchConfig,
    pub cert_config: CertConfig,
    pub enable_audit: bool,
    #[serde(
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub audit_path: Option<PathBuf>,
    #[serde(
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub user_agent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct LogConfig {
    pub log_level: u32,
    #[serde(
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub log_path: Option<PathBuf>,
    #[serde(rename = "logSizeMB")]
    pub log_size_mb: u64,
    pub log_rotate_num: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            log_level: 1,
            log_path: None,
            log_size_mb: 10,
            log_rotate_num: 3,
        }
    }
}

/// The local cache of registry blobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct CacheConfig {
    pub cache_type: String,
    pub cache_dir: PathBuf,
    #[serde(rename = "cacheSizeGB")]
    pub cache_size_gb: u64,
    /// obd's own key: the capacity in MiB, for caches smaller than a GiB
    /// (small hosts, tests). When set, it replaces `cacheSizeGB`.
    #[serde(rename = "cacheSizeMB", skip_serializing_if = "Option::is_none")]
    pub cache_size_mb: Option<u64>,
    /// Missing ranges are fetched in chunks of this many bytes, aligned.
    #[serde(deserialize_with = "non_zero")]
    pub refill_size: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            cache_type: "file".to_string(),
            cache_dir: PathBuf::from("/opt/overlaybd/registry_cache"),
            cache_size_gb: 4,
            cache_size_mb: None,
            refill_size: 262_144,
        }
    }
}

/// The credential file read when `credentialConfig.mode` is empty or
/// missing and no path is given (the reference's `credentialFilePath`
/// default).
pub const DEFAULT_CREDENTIAL_FILE: &str = "/opt/overlaybd/cred.json";

/// `credentialConfig`: where registry credentials come from.
///
/// The keys after `path` are the reference's own, in its snake_case:
/// `timeout` (seconds, for the credential server modes) and, for
/// `mode: https`, `client_cert_path`, `client_key_path` (when empty the key
/// is looked for in the certificate file, as libcurl does) and
/// `server_ca_path` (when set, the only CA trusted for the server).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CredentialConfig {
    /// `None` when empty or missing: the credential file `path`, or
    /// [`DEFAULT_CREDENTIAL_FILE`].
    #[serde(
        deserialize_with = "credential_mode",
        skip_serializing_if = "Option::is_none"
    )]
    pub mode: Option<CredentialMode>,
    /// A credential file ([`CredentialMode::File`]), a URL
    /// ([`CredentialMode::Http`], [`CredentialMode::Https`]) or a unix
    /// socket ([`CredentialMode::Uds`]).
    #[serde(
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub path: Option<String>,
    /// Seconds a credential server may take to answer (the reference's
    /// default is 1; 0 means the longest wait, 60 s).
    pub timeout: u64,
    #[serde(
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub client_cert_path: Option<PathBuf>,
    #[serde(
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub client_key_path: Option<PathBuf>,
    #[serde(
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub server_ca_path: Option<PathBuf>,
}

impl Default for CredentialConfig {
    fn default() -> Self {
        CredentialConfig {
            mode: None,
            path: None,
            timeout: 1,
            client_cert_path: None,
            client_key_path: None,
            server_ca_path: None,
        }
    }
}

/// The `credentialConfig.mode` values the reference accepts (besides empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialMode {
    /// Read a credential file (see [`crate::credentials`]).
    File,
    /// `GET <path>?remote_url=<blob url>` returns the credentials.
    Http,
    /// As [`CredentialMode::Http`], over TLS (`path` is an `https://` URL).
    Https,
    /// As [`CredentialMode::Http`], over the unix socket `path`:
    /// `GET /auth?remote_url=<blob url>` with `Host: localhost`.
    Uds,
}

impl CredentialMode {
    pub const ACCEPTED: &'static str =
        "`file`, `http`, `https`, `uds`, or empty for the credential file";
}

/// `mode` as written: `""` and `null` mean "not set"; anything but the
/// accepted modes is an error naming them.
fn credential_mode<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<CredentialMode>, D::Error> {
    let Some(text) = Option::<String>::deserialize(d)?.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    match text.as_str() {
        "file" => Ok(Some(CredentialMode::File)),
        "http" => Ok(Some(CredentialMode::Http)),
        "https" => Ok(Some(CredentialMode::Https)),
        "uds" => Ok(Some(CredentialMode::Uds)),
        _ => Err(de::Error::custom(format!(
            "credentialConfig.mode {text:?} is not a credential mode: use {}",
            CredentialMode::ACCEPTED
        ))),
    }
}

/// Background download of whole blobs into each lower's `dir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DownloadConfig {
    pub enable: bool,
    /// Seconds after the device opens before downloading starts...
    pub delay: u64,
    /// ...plus a random number of seconds below this.
    pub delay_extra: u64,
    #[serde(rename = "maxMBps")]
    pub max_mbps: u64,
    pub try_cnt: u32,
    #[serde(deserialize_with = "non_zero")]
    pub block_size: u64,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            enable: false,
            delay: 300,
            delay_extra: 30,
            max_mbps: 100,
            try_cnt: 5,
            block_size: 262_144,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct P2pConfig {
    pub enable: bool,
    /// Reads go to `<address>/<blob url>`.
    #[serde(
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub address: Option<String>,
}

/// The Prometheus metrics endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ExporterConfig {
    pub enable: bool,
    pub uri_prefix: String,
    pub port: u16,
    /// As written; the spec does not state its unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_interval: Option<u64>,
}

impl Default for ExporterConfig {
    fn default() -> Self {
        ExporterConfig {
            enable: false,
            uri_prefix: "/metrics".to_string(),
            port: 9863,
            update_interval: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PrefetchConfig {
    /// Number of replay workers.
    #[serde(deserialize_with = "non_zero")]
    pub concurrency: u32,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig { concurrency: 16 }
    }
}

/// TLS settings for registry requests.
///
/// `certFile` and `keyFile` are the reference's: a client certificate
/// (PEM, with its chain) and its private key, offered to every registry
/// that asks for one. `caFile` and `caDir` are obd's: CA certificates
/// (PEM) trusted on top of the bundled Mozilla roots and the system store,
/// for every registry. `caDir` reads each `*.crt` and `*.pem` in the
/// directory and in its subdirectories one level down (the layout of
/// docker's `certs.d/<host>/ca.crt`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct CertConfig {
    #[serde(
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub cert_file: Option<PathBuf>,
    #[serde(
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub key_file: Option<PathBuf>,
    #[serde(
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub ca_file: Option<PathBuf>,
    #[serde(
        deserialize_with = "non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub ca_dir: Option<PathBuf>,
}

impl GlobalConfig {
    /// Keys set here that obd reads but does not act on, each with what obd
    /// does instead: every daemon that loads a global config names them
    /// once at start, so that a setting that does nothing is no silent
    /// surprise.
    pub fn ignored_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        if self.cache_config.cache_type != "file" {
            keys.push(format!(
                "cacheConfig.cacheType \"{}\": the registry cache is always obd's file cache",
                self.cache_config.cache_type
            ));
        }
        if let Some(engine) = self.io_engine {
            keys.push(format!(
                "ioEngine {engine}: layer files are read by each device's worker threads"
            ));
        }
        keys
    }

    /// Read and check `path`. Paths inside are taken as written.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).context(|| path.display().to_string())?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parse and check a global config; `context` names it in errors.
    pub fn from_json(text: &str, context: &str) -> Result<Self> {
        let mut config: Self = parse(text, context, "global config")?;
        // A second, small pass over the same text finds the legacy keys and
        // which new keys are present, so the typed structs above stay plain.
        let legacy: LegacyKeys = parse(text, context, "global config")?;
        legacy.apply(&mut config);
        Ok(config)
    }
}

/// The legacy top-level keys, and which keys the new sections set.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LegacyKeys {
    #[serde(default, deserialize_with = "non_empty")]
    registry_cache_dir: Option<PathBuf>,
    #[serde(default, rename = "registryCacheSizeGB")]
    registry_cache_size_gb: Option<u64>,
    #[serde(default, deserialize_with = "non_empty")]
    credential_file_path: Option<String>,
    #[serde(default)]
    log_level: Option<u32>,
    #[serde(default, deserialize_with = "non_empty")]
    log_path: Option<PathBuf>,
    #[serde(default)]
    log_config: HashMap<String, IgnoredAny>,
    #[serde(default)]
    cache_config: HashMap<String, IgnoredAny>,
    #[serde(default)]
    credential_config: HashMap<String, IgnoredAny>,
}

impl LegacyKeys {
    fn apply(self, config: &mut GlobalConfig) {
        fn fill<T>(
            present: &HashMap<String, IgnoredAny>,
            key: &str,
            legacy: Option<T>,
            field: &mut T,
        ) {
            if let Some(value) = legacy.filter(|_| !present.contains_key(key)) {
                *field = value;
            }
        }
        let log = &mut config.log_config;
        fill(
            &self.log_config,
            "logLevel",
            self.log_level,
            &mut log.log_level,
        );
        fill(
            &self.log_config,
            "logPath",
            self.log_path.map(Some),
            &mut log.log_path,
        );
        let cache = &mut config.cache_config;
        fill(
            &self.cache_config,
            "cacheDir",
            self.registry_cache_dir,
            &mut cache.cache_dir,
        );
        let size = self.registry_cache_size_gb.filter(|&s| s != 0);
        fill(
            &self.cache_config,
            "cacheSizeGB",
            size,
            &mut cache.cache_size_gb,
        );
        let cred = &mut config.credential_config;
        fill(
            &self.credential_config,
            "path",
            self.credential_file_path.map(Some),
            &mut cred.path,
        );
    }
}

// ---------------------------------------------------------------------------
// Shared serde helpers
// ---------------------------------------------------------------------------

/// Parse JSON into `T`, turning serde's error into one naming `context`,
/// the line and column, and the problem.
///
/// The top level must be an object: serde would also fill a struct from a
/// JSON array, by position, which no config file means.
pub(crate) fn parse<T: DeserializeOwned>(text: &str, context: &str, what: &str) -> Result<T> {
    let value = serde_json::from_str(text).map_err(|e| {
        let message = e.to_string();
        let location = format!(" at line {} column {}", e.line(), e.column());
        let problem = message.strip_suffix(&location).unwrap_or(&message);
        Error::corrupt(
            context,
            format!(
                "not a valid {what}: line {}, column {}: {problem}",
                e.line(),
                e.column()
            ),
        )
    })?;
    if !text.trim_start().starts_with('{') {
        return Err(Error::corrupt(
            context,
            format!("not a valid {what}: the top level must be a JSON object"),
        ));
    }
    Ok(value)
}

/// A string where `""` and `null` mean "not set".
pub(crate) fn non_empty<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: From<String>,
{
    Ok(Option::<String>::deserialize(d)?
        .filter(|s| !s.is_empty())
        .map(T::from))
}

/// A size or count that the code using it divides by or loops on.
fn non_zero<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default + PartialEq,
{
    let value = T::deserialize(d)?;
    if value == T::default() {
        return Err(de::Error::invalid_value(
            Unexpected::Unsigned(0),
            &"a non-zero number",
        ));
    }
    Ok(value)
}

fn non_zero_opt<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    match Option::<u64>::deserialize(d)? {
        Some(0) => Err(de::Error::invalid_value(
            Unexpected::Unsigned(0),
            &"a non-zero number",
        )),
        value => Ok(value),
    }
}

fn is_false(b: &bool) -> bool {
    !b
}
