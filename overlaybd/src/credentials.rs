//! Registry credentials: the credential file named by
//! `credentialConfig.path` (docker's `auths` layout), or the same `auths`
//! inside a credential server's answer (`credentialConfig.mode: http`).
//!
//! ```json
//! {"auths": {"registry.example.com/team": {"username": "u", "password": "p"},
//!            "registry.example.com":      {"auth": "dTpw"}}}
//! ```
//!
//! Several keys can match one blob (`host`, `host/ns`, `host/ns/repo`); the
//! reference takes the first matching entry in the file, so entries are kept
//! in document order (serde_json's own map would sort them). Passwords never
//! appear in `Debug` output or in error messages.

use std::fmt;
use std::fs;
use std::path::Path;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::config::{non_empty, parse};
use crate::error::{Error, IoContext, Result};

/// A user name and password for one registry (or part of one).
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The `auths` of a credential file, in document order.
///
/// Keys are compared exactly (no scheme stripping, no case folding). An
/// entry with neither `auth` nor `username` carries no credentials and is
/// dropped; when an entry has both, `auth` wins, as in docker. A file
/// without `auths` gives no credentials; other keys are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    entries: Vec<(String, Credential)>,
}

impl Credentials {
    /// Read and check a credential file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).context(|| path.display().to_string())?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parse a credential file; `context` names it in errors.
    pub fn from_json(text: &str, context: &str) -> Result<Self> {
        let file: CredentialFile = parse(text, context, "credential file")?;
        Ok(file.into())
    }

    /// Parse a credential server's answer, `{traceId, success, data: {auths}}`.
    pub fn from_http_response(text: &str, context: &str) -> Result<Self> {
        let answer: HttpAnswer = parse(text, context, "credential server answer")?;
        if !answer.success {
            let trace = answer.trace_id.as_deref().unwrap_or("none");
            return Err(Error::corrupt(
                context,
                format!("the credential server reported failure (traceId {trace})"),
            ));
        }
        Ok(answer.data.unwrap_or_default().into())
    }

    /// The credential for a blob URL: the first entry, in document order,
    /// whose key is one of [`candidate_keys`]`(blob_url)`.
    pub fn lookup(&self, blob_url: &str) -> Option<&Credential> {
        let candidates = candidate_keys(blob_url);
        self.entries
            .iter()
            .find(|(key, _)| candidates.contains(key))
            .map(|(_, credential)| credential)
    }

    /// The keys of the usable entries, in document order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(key, _)| key.as_str())
    }
}

/// The credential keys that match a blob URL, shortest first.
///
/// `https://host/v2/ns/repo/blobs/<digest>` gives `host`, `host/ns`,
/// `host/ns/repo`; a deeper repository gives one key per path component. The
/// repository ends at the last `blobs` component (or the end of the path),
/// so `repoBlobUrl` itself works too. A URL whose path does not start with
/// `/v2/` gives only `host`; one without a host gives nothing.
pub fn candidate_keys(blob_url: &str) -> Vec<String> {
    let rest = blob_url
        .strip_prefix("https://")
        .or_else(|| blob_url.strip_prefix("http://"))
        .unwrap_or(blob_url);
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return Vec::new();
    }
    let mut keys = vec![host.to_string()];
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.first() == Some(&"v2") {
        let end = parts
            .iter()
            .rposition(|p| *p == "blobs")
            .unwrap_or(parts.len());
        let mut key = host.to_string();
        for part in parts.get(1..end).unwrap_or_default() {
            key.push('/');
            key.push_str(part);
            keys.push(key.clone());
        }
    }
    keys
}

/// Decode standard base64 (RFC 4648 alphabet `A-Z a-z 0-9 + /`), with or
/// without `=` padding. `None` for anything else: a character outside the
/// alphabet, a wrong length or padding, or non-zero bits after the last byte.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
    use base64::Engine as _;
    // Padded text must be padded canonically (whole 4-character groups);
    // unpadded text must have no `=` at all. Both engines refuse stray
    // bits after the last byte.
    let engine = if text.ends_with('=') {
        &STANDARD
    } else {
        &STANDARD_NO_PAD
    };
    engine.decode(text).ok()
}

#[derive(Default, Deserialize)]
struct CredentialFile {
    #[serde(default, deserialize_with = "null_as_empty")]
    auths: OrderedAuths,
}

impl From<CredentialFile> for Credentials {
    fn from(file: CredentialFile) -> Self {
        Credentials {
            entries: file.auths.0,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpAnswer {
    #[serde(default)]
    trace_id: Option<String>,
    #[serde(default)]
    success: bool,
    #[serde(default)]
    data: Option<CredentialFile>,
}

/// `auths` as a list, in the order the entries appear in the file.
#[derive(Default)]
struct OrderedAuths(Vec<(String, Credential)>);

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<OrderedAuths, D::Error> {
    Ok(Option::<OrderedAuths>::deserialize(d)?.unwrap_or_default())
}

impl<'de> Deserialize<'de> for OrderedAuths {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct InOrder;

        impl<'de> Visitor<'de> for InOrder {
            type Value = OrderedAuths;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map from registry key to credentials")
            }

            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<OrderedAuths, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let entry: AuthEntry = map.next_value()?;
                    let credential = entry.into_credential().map_err(|problem| {
                        de::Error::custom(format!("auths entry {key:?}: {problem}"))
                    })?;
                    if let Some(credential) = credential {
                        entries.push((key, credential));
                    }
                }
                Ok(OrderedAuths(entries))
            }
        }

        d.deserialize_map(InOrder)
    }
}

/// One `auths` value as written. Other docker keys (`email`,
/// `identitytoken`, ...) are ignored.
#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default, deserialize_with = "non_empty")]
    username: Option<String>,
    #[serde(default, deserialize_with = "non_empty")]
    password: Option<String>,
    #[serde(default, deserialize_with = "non_empty")]
    auth: Option<String>,
}

impl AuthEntry {
    /// Messages never quote the decoded `auth`: it holds the password.
    fn into_credential(self) -> std::result::Result<Option<Credential>, &'static str> {
        let Some(auth) = self.auth else {
            return Ok(self.username.map(|username| Credential {
                username,
                password: self.password.unwrap_or_default(),
            }));
        };
        let decoded = base64_decode(&auth).ok_or("`auth` is not valid base64")?;
        let text =
            String::from_utf8(decoded).map_err(|_| "`auth` does not decode to UTF-8 text")?;
        let (username, password) = text
            .split_once(':')
            .ok_or("`auth` does not decode to `user:password`")?;
        Ok(Some(Credential {
            username: username.to_string(),
            password: password.to_string(),
        }))
    }
}
