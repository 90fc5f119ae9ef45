//! How a registry asks for credentials (`WWW-Authenticate`) and where ours
//! come from (`credentialConfig`: a credential file or a credential server).
//!
//! Parsing is pure code so it can be tested without a registry. Credentials
//! are only ever placed in `Authorization` headers: nothing here formats a
//! password or token into a message.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::config::{CredentialConfig, CredentialMode};
use crate::credentials::{candidate_keys, Credential, Credentials};
use crate::error::{Error, Result};

use super::{redact_url, remote_error};

/// One challenge of a `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// `Bearer realm=..., service=..., scope=...`: get a token from `realm`.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    /// `Basic realm=...`: send the user name and password with each request.
    Basic,
}

/// The first challenge we can answer (Bearer or Basic) among `headers`
/// (each a `WWW-Authenticate` value); `None` when there is none.
pub fn parse_challenges<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<Challenge> {
    for header in headers {
        for (scheme, params) in split_challenges(header) {
            if scheme.eq_ignore_ascii_case("bearer") {
                let get = |k: &str| {
                    params
                        .iter()
                        .find(|(key, _)| key.eq_ignore_ascii_case(k))
                        .map(|(_, v)| v.clone())
                        .filter(|v| !v.is_empty())
                };
                if let Some(realm) = get("realm") {
                    return Some(Challenge::Bearer {
                        realm,
                        service: get("service"),
                        scope: get("scope"),
                    });
                }
            } else if scheme.eq_ignore_ascii_case("basic") {
                return Some(Challenge::Basic);
            }
        }
    }
    None
}

/// Split a header value into challenges: `(scheme, [(param, value)])`.
/// Values may be tokens or quoted strings (with `\` escapes, and commas
/// inside, as in `scope="repository:a/b:pull,push"`).
fn split_challenges(header: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let chars: Vec<char> = header.chars().collect();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && (chars[*i] == ' ' || chars[*i] == '\t' || chars[*i] == ',') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while *i < chars.len() && !matches!(chars[*i], ' ' | '\t' | ',' | '=' | '"') {
            *i += 1;
        }
        chars[start..*i].iter().collect::<String>()
    };
    loop {
        skip_ws(&mut i);
        if i >= chars.len() {
            break;
        }
        let word = token(&mut i);
        if word.is_empty() {
            // A stray character: skip it rather than loop forever.
            i += 1;
            continue;
        }
        // `word=` is a parameter of the current challenge; otherwise `word`
        // starts a new challenge.
        let mut j = i;
        while j < chars.len() && (chars[j] == ' ' || chars[j] == '\t') {
            j += 1;
        }
        if j < chars.len() && chars[j] == '=' && !out.is_empty() {
            i = j + 1;
            while i < chars.len() && (chars[i] == ' ' || chars[i] == '\t') {
                i += 1;
            }
            let value = if i < chars.len() && chars[i] == '"' {
                i += 1;
                let mut v = String::new();
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        i += 1;
                    }
                    v.push(chars[i]);
                    i += 1;
                }
                i += 1; // closing quote (or the end)
                v
            } else {
                token(&mut i)
            };
            if let Some(last) = out.last_mut() {
                last.1.push((word, value));
            }
        } else {
            out.push((word, Vec::new()));
        }
    }
    out
}

/// What [`query_escape`] leaves as it is: RFC 3986's unreserved
/// characters (`A-Z a-z 0-9 - . _ ~`); every other byte becomes `%XX`.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encode a query parameter value (RFC 3986 unreserved kept).
pub fn query_escape(text: &str) -> String {
    utf8_percent_encode(text, QUERY_VALUE).to_string()
}

/// `Basic base64(user:password)`.
pub fn basic_header(credential: &Credential) -> String {
    let pair = format!("{}:{}", credential.username, credential.password);
    format!("Basic {}", BASE64.encode(pair))
}

/// Where credentials for a blob URL come from.
pub trait CredentialSource: Send + Sync {
    /// The credential to use for `blob_url`, if any.
    fn lookup(&self, blob_url: &str) -> io::Result<Option<Credential>>;
}

/// No credentials at all: every request is anonymous.
pub struct Anonymous;

impl CredentialSource for Anonymous {
    fn lookup(&self, _: &str) -> io::Result<Option<Credential>> {
        Ok(None)
    }
}

impl CredentialSource for Credentials {
    fn lookup(&self, blob_url: &str) -> io::Result<Option<Credential>> {
        Ok(Credentials::lookup(self, blob_url).cloned())
    }
}

/// `credentialConfig.mode: http`: `GET <endpoint>?remote_url=<blob url>`,
/// answered with `{traceId, success, data: {auths}}`. Answers are kept per
/// repository for the life of the process.
pub struct CredentialServer {
    agent: ureq::Agent,
    endpoint: String,
    answers: Mutex<HashMap<String, Option<Credential>>>,
}

impl CredentialServer {
    pub fn new(agent: ureq::Agent, endpoint: &str) -> Self {
        CredentialServer {
            agent,
            endpoint: endpoint.to_string(),
            answers: Mutex::new(HashMap::new()),
        }
    }
}

impl CredentialSource for CredentialServer {
    fn lookup(&self, blob_url: &str) -> io::Result<Option<Credential>> {
        let repo = candidate_keys(blob_url).pop().unwrap_or_default();
        if let Some(answer) = self
            .answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&repo)
        {
            return Ok(answer.clone());
        }
        let separator = if self.endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!(
            "{}{separator}remote_url={}",
            self.endpoint,
            query_escape(blob_url)
        );
        let fail = |what: String| {
            remote_error(
                libc::EPERM,
                format!("credential server {}: {what}", redact_url(&self.endpoint)),
            )
        };
        let mut response = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| fail(e.to_string()))?;
        if response.status() != 200 {
            return Err(fail(format!("HTTP {}", response.status().as_u16())));
        }
        let text = response
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_string()
            .map_err(|e| fail(e.to_string()))?;
        let credentials = Credentials::from_http_response(&text, "credential server answer")
            .map_err(|e| fail(e.to_string()))?;
        let answer = Credentials::lookup(&credentials, blob_url).cloned();
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(repo, answer.clone());
        Ok(answer)
    }
}

/// The credential source `credentialConfig` names. A credential file that
/// does not exist gives no credentials (the daemon's default path often
/// does not); one that exists but does not parse is an error.
pub fn credential_source(
    config: &CredentialConfig,
    agent: &ureq::Agent,
) -> Result<Box<dyn CredentialSource>> {
    let Some(path) = &config.path else {
        return Ok(Box::new(Anonymous));
    };
    match config.mode {
        CredentialMode::Http => Ok(Box::new(CredentialServer::new(agent.clone(), path))),
        CredentialMode::File => match Credentials::load(path) {
            Ok(credentials) => Ok(Box::new(credentials)),
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(Box::new(Anonymous))
            }
            Err(e) => Err(e),
        },
    }
}

/// A Bearer token and how long it may be used.
#[derive(Clone)]
pub struct Token {
    pub value: String,
    pub expires: std::time::Instant,
}

/// The lifetime to assume for a token: `expires_in` seconds (60 when
/// absent or absurd), minus a margin so it is not used at the last moment.
pub fn token_lifetime(expires_in: Option<u64>) -> Duration {
    let secs = expires_in
        .filter(|&s| s > 0 && s < 86_400 * 7)
        .unwrap_or(60);
    let margin = (secs / 10).clamp(1, 30);
    Duration::from_secs(secs - margin.min(secs - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_with_commas_in_scope() {
        let h = r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:ns/app:pull,push""#;
        assert_eq!(
            parse_challenges([h]),
            Some(Challenge::Bearer {
                realm: "https://auth.example.com/token".into(),
                service: Some("registry.example.com".into()),
                scope: Some("repository:ns/app:pull,push".into()),
            })
        );
    }

    #[test]
    fn basic_and_unknown_challenges() {
        assert_eq!(
            parse_challenges([r#"Basic realm="Registry Realm""#]),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenges(["Negotiate"]), None);
        assert_eq!(
            parse_challenges([r#"Negotiate, Bearer realm=http://x/t , service = "s""#]),
            Some(Challenge::Bearer {
                realm: "http://x/t".into(),
                service: Some("s".into()),
                scope: None
            })
        );
        // Garbage never panics or loops.
        for junk in [
            "",
            "=",
            "\"",
            "Bearer realm=\"",
            ",,,",
            "Bearer =x",
            "a=b=c",
        ] {
            let _ = parse_challenges([junk]);
        }
    }

    #[test]
    fn basic_headers_decode_back() {
        let credential = Credential {
            username: "user".into(),
            password: "p@ss:wörd".into(),
        };
        let header = basic_header(&credential);
        let encoded = header.strip_prefix("Basic ").unwrap();
        assert_eq!(
            crate::credentials::base64_decode(encoded).unwrap(),
            "user:p@ss:wörd".as_bytes()
        );
        let short = Credential {
            username: "u".into(),
            password: "p".into(),
        };
        assert_eq!(basic_header(&short), "Basic dTpw");
    }

    #[test]
    fn query_escaping() {
        assert_eq!(
            query_escape("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
        assert_eq!(query_escape("a-._~Z9 é"), "a-._~Z9%20%C3%A9");
    }

    #[test]
    fn token_lifetimes() {
        assert_eq!(token_lifetime(None), Duration::from_secs(54));
        assert_eq!(token_lifetime(Some(300)), Duration::from_secs(270));
        assert_eq!(token_lifetime(Some(1)), Duration::from_secs(1));
        assert_eq!(token_lifetime(Some(0)), Duration::from_secs(54));
    }
}
