//! How a registry asks for credentials (`WWW-Authenticate`) and where ours
//! come from (`credentialConfig`: a credential file or a credential server).
//!
//! Parsing is pure code so it can be tested without a registry. Credentials
//! are only ever placed in `Authorization` headers: nothing here formats a
//! password or token into a message.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::config::{CredentialConfig, CredentialMode, DEFAULT_CREDENTIAL_FILE};
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

/// Whether credentials may be sent to `url`: over https to any host, over
/// plain http only to a loopback address (`127.0.0.0/8`, `::1`,
/// `localhost`), where nothing crosses a network. Anything else (another
/// scheme, a URL that does not parse) gets none.
pub fn may_send_credentials(url: &str) -> bool {
    let Ok(url) = url::Url::parse(url) else {
        return false;
    };
    match url.scheme() {
        "https" => url.host().is_some(),
        "http" => match url.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => {
                ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
            Some(url::Host::Domain(name)) => {
                let name = name.trim_end_matches('.');
                name.eq_ignore_ascii_case("localhost")
                    || name.to_ascii_lowercase().ends_with(".localhost")
            }
            None => false,
        },
        _ => false,
    }
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

/// How long a credential server's answer is reused.
pub const CREDENTIAL_TTL: Duration = Duration::from_secs(300);
/// How long after a failed request the credential server is left alone
/// (lookups in that time fail at once with the same error).
pub const CREDENTIAL_BACKOFF: Duration = Duration::from_secs(5);
/// The largest credential server answer read.
const ANSWER_LIMIT: u64 = 1 << 20;

/// How a credential server is reached.
enum Transport {
    /// `GET <endpoint>?remote_url=<blob url>` (`mode: http` or `https`).
    Url {
        client: reqwest::Client,
        endpoint: String,
    },
    /// `GET /auth?remote_url=<blob url>` with `Host: localhost` over the
    /// unix socket `path` (`mode: uds`), as the reference asks it.
    Uds { path: PathBuf, timeout: Duration },
}

/// One repository's last answer.
enum Answer {
    /// A successful answer (which may hold no credential for the
    /// repository), reused until the instant.
    Known(Option<Credential>, Instant),
    /// The last request failed; not asked again before the instant.
    Failed(String, Instant),
}

/// `credentialConfig.mode: http`, `https` or `uds`: the credential server
/// answers `{traceId, success, data: {auths}}` for one blob URL. Successful
/// answers are kept per repository for [`CREDENTIAL_TTL`]; a failure is
/// not kept: the server is asked again on a lookup [`CREDENTIAL_BACKOFF`]
/// later.
pub struct CredentialServer {
    transport: Transport,
    ttl: Duration,
    backoff: Duration,
    answers: Mutex<HashMap<String, Answer>>,
}

impl CredentialServer {
    /// A server at an `http://` or `https://` endpoint, asked with
    /// `client` (on the fetch engine's runtime).
    pub fn new(client: reqwest::Client, endpoint: &str) -> Self {
        Self::with_transport(Transport::Url {
            client,
            endpoint: endpoint.to_string(),
        })
    }

    /// A server listening on the unix socket `path`.
    pub fn unix(path: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self::with_transport(Transport::Uds {
            path: path.into(),
            timeout,
        })
    }

    fn with_transport(transport: Transport) -> Self {
        CredentialServer {
            transport,
            ttl: CREDENTIAL_TTL,
            backoff: CREDENTIAL_BACKOFF,
            answers: Mutex::new(HashMap::new()),
        }
    }

    /// Other answer lifetimes and back-off (tests use short ones).
    pub fn with_timing(mut self, ttl: Duration, backoff: Duration) -> Self {
        self.ttl = ttl;
        self.backoff = backoff;
        self
    }

    /// Where the server is, for messages (no query, no user info).
    fn name(&self) -> String {
        match &self.transport {
            Transport::Url { endpoint, .. } => redact_endpoint(endpoint),
            Transport::Uds { path, .. } => format!("unix:{}", path.display()),
        }
    }

    /// Ask the server about `blob_url`: its whole answer, or why not.
    fn ask(&self, blob_url: &str) -> std::result::Result<Credentials, String> {
        let text = match &self.transport {
            Transport::Url { client, endpoint } => {
                let separator = if endpoint.contains('?') { '&' } else { '?' };
                let url = format!("{endpoint}{separator}remote_url={}", query_escape(blob_url));
                let body = super::registry::block_on(async {
                    let response = client
                        .get(&url)
                        .send()
                        .await
                        .map_err(super::registry::error_text)?;
                    if response.status() != 200 {
                        return Err(format!("HTTP {}", response.status().as_u16()));
                    }
                    super::registry::read_limited(response, ANSWER_LIMIT as usize).await
                })?;
                String::from_utf8(body).map_err(|_| "the answer is not UTF-8 text".to_string())?
            }
            Transport::Uds { path, timeout } => {
                let target = format!("/auth?remote_url={}", query_escape(blob_url));
                let (status, body) =
                    uds_get(path, &target, *timeout, ANSWER_LIMIT).map_err(|e| e.to_string())?;
                if status != 200 {
                    return Err(format!("HTTP {status}"));
                }
                String::from_utf8(body).map_err(|_| "the answer is not UTF-8 text".to_string())?
            }
        };
        Credentials::from_http_response(&text, "answer").map_err(|e| e.to_string())
    }
}

impl CredentialSource for CredentialServer {
    fn lookup(&self, blob_url: &str) -> io::Result<Option<Credential>> {
        let repo = candidate_keys(blob_url).pop().unwrap_or_default();
        let fail = |what: &str| {
            remote_error(
                libc::EPERM,
                format!("credential server {}: {what}", self.name()),
            )
        };
        let now = Instant::now();
        match self
            .answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&repo)
        {
            Some(Answer::Known(answer, until)) if *until > now => return Ok(answer.clone()),
            Some(Answer::Failed(why, until)) if *until > now => {
                return Err(fail(&format!("{why} (asked again after a short pause)")))
            }
            _ => {}
        }
        let result = self.ask(blob_url);
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(credentials) => {
                let answer = Credentials::lookup(&credentials, blob_url).cloned();
                answers.insert(repo, Answer::Known(answer.clone(), now + self.ttl));
                Ok(answer)
            }
            Err(why) => {
                answers.insert(repo, Answer::Failed(why.clone(), now + self.backoff));
                Err(fail(&why))
            }
        }
    }
}

/// `endpoint` without user info, query or fragment, for messages.
fn redact_endpoint(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.to_string()
        }
        Err(_) => redact_url(endpoint).to_string(),
    }
}

/// A small HTTP/1.1 `GET target` over the unix socket `path` (`Host:
/// localhost`, `Connection: close`): the status and the body, at most
/// `limit` bytes of it. Handles `Content-Length`, chunked and
/// read-to-close bodies. `timeout` bounds the connection and each read and
/// write; the whole exchange is also bounded by four times `timeout`.
pub fn uds_get(
    path: &Path,
    target: &str,
    timeout: Duration,
    limit: u64,
) -> io::Result<(u16, Vec<u8>)> {
    let deadline = Instant::now() + timeout * 4;
    let mut stream = UnixStream::connect(path)
        .map_err(|e| io::Error::new(e.kind(), format!("connecting to the socket: {e}")))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: obd\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(DeadlineReader { stream, deadline });
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let status_line = read_line(&mut reader)?;
    let status: u16 = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| bad("the answer is not HTTP/1.x"))?;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut header_bytes = 0usize;
    loop {
        let line = read_line(&mut reader)?;
        if line.is_empty() {
            break;
        }
        header_bytes += line.len();
        if header_bytes > 64 * 1024 {
            return Err(bad("the answer's headers are too large"));
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse().map_err(|_| bad("bad Content-Length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let too_big = || bad("the answer is too large");
    let mut body = Vec::new();
    if chunked {
        loop {
            let size_line = read_line(&mut reader)?;
            let size_text = size_line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size_text, 16).map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                break;
            }
            if body.len() as u64 + size > limit {
                return Err(too_big());
            }
            let start = body.len();
            body.resize(start + size as usize, 0);
            reader.read_exact(&mut body[start..])?;
            read_line(&mut reader)?;
        }
    } else if let Some(length) = length {
        if length > limit {
            return Err(too_big());
        }
        body.resize(length as usize, 0);
        reader.read_exact(&mut body)?;
    } else {
        reader.take(limit + 1).read_to_end(&mut body)?;
        if body.len() as u64 > limit {
            return Err(too_big());
        }
    }
    Ok((status, body))
}

/// One line without its `\r\n`; at most 8 KiB.
fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    reader.take(8 * 1024).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the answer ended early (or has a line over 8 KiB)",
        ));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    String::from_utf8(line)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "the answer is not text"))
}

/// A socket that refuses to read past a deadline, so a server trickling
/// bytes cannot hold a lookup for long.
struct DeadlineReader {
    stream: UnixStream,
    deadline: Instant,
}

impl Read for DeadlineReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if Instant::now() >= self.deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the credential server is too slow",
            ));
        }
        self.stream.read(buf)
    }
}

/// The seconds `credentialConfig.timeout` allows (0: the longest, 60 s).
fn server_timeout(config: &CredentialConfig) -> Duration {
    match config.timeout {
        0 => Duration::from_secs(60),
        secs => Duration::from_secs(secs.min(60)),
    }
}

/// The client for `mode: http` and `https`: the server's timeout for a
/// whole request, redirects not followed, and for https `server_ca_path`
/// (the only CA trusted when set, as with the reference's libcurl) and the
/// client certificate.
fn server_client(config: &CredentialConfig, user_agent: &str) -> Result<reqwest::Client> {
    let roots = match &config.server_ca_path {
        Some(ca) => {
            let mut store = rustls::RootCertStore::empty();
            store.add_parsable_certificates(super::tls::load_pem_certs(ca)?);
            store
        }
        None => super::tls::root_certs(&[]),
    };
    let client_cert = match &config.client_cert_path {
        Some(cert) => Some(super::tls::load_client_cert(
            cert,
            config.client_key_path.as_deref(),
        )?),
        None => None,
    };
    let timeout = server_timeout(config);
    reqwest::Client::builder()
        .use_preconfigured_tls(super::tls::client_config(roots, client_cert)?)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout)
        .timeout(timeout)
        .user_agent(user_agent)
        .build()
        .map_err(|e| {
            Error::Invalid(format!(
                "credential server client: {}",
                super::registry::error_text(e)
            ))
        })
}

/// The credential source `credentialConfig` names:
/// - empty or missing mode, or `file`: the credential file `path`, or
///   [`DEFAULT_CREDENTIAL_FILE`] when none is given. A file that does not
///   exist gives no credentials (the default path often does not); one
///   that exists but does not parse is an error. (The reference, with an
///   empty mode, reads only the legacy `credentialFilePath`; obd also
///   takes `credentialConfig.path` there, as it fills one from the other.)
/// - `http`, `https`: the credential server at the URL `path` (`https`
///   must be an `https://` URL).
/// - `uds`: the credential server on the unix socket `path`.
///
/// The server modes need a `path`; without one the config is refused.
pub fn credential_source(
    config: &CredentialConfig,
    user_agent: &str,
) -> Result<Box<dyn CredentialSource>> {
    let mode = config.mode.unwrap_or(CredentialMode::File);
    let need_path = || {
        config.path.clone().ok_or_else(|| {
            Error::Invalid(format!(
                "credentialConfig.mode {:?} needs credentialConfig.path",
                mode_name(mode)
            ))
        })
    };
    match mode {
        CredentialMode::File => {
            let path = config.path.as_deref().unwrap_or(DEFAULT_CREDENTIAL_FILE);
            match Credentials::load(path) {
                Ok(credentials) => Ok(Box::new(credentials)),
                Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    Ok(Box::new(Anonymous))
                }
                Err(e) => Err(e),
            }
        }
        CredentialMode::Http | CredentialMode::Https => {
            let path = need_path()?;
            let scheme_ok = match mode {
                CredentialMode::Https => path.starts_with("https://"),
                _ => path.starts_with("http://") || path.starts_with("https://"),
            };
            if !scheme_ok {
                return Err(Error::Invalid(format!(
                    "credentialConfig.path {} is not an {}:// URL (credentialConfig.mode {:?})",
                    redact_endpoint(&path),
                    if mode == CredentialMode::Https {
                        "https"
                    } else {
                        "http(s)"
                    },
                    mode_name(mode)
                )));
            }
            let client = server_client(config, user_agent)?;
            Ok(Box::new(CredentialServer::new(client, &path)))
        }
        CredentialMode::Uds => {
            let path = need_path()?;
            Ok(Box::new(CredentialServer::unix(
                path,
                server_timeout(config),
            )))
        }
    }
}

fn mode_name(mode: CredentialMode) -> &'static str {
    match mode {
        CredentialMode::File => "file",
        CredentialMode::Http => "http",
        CredentialMode::Https => "https",
        CredentialMode::Uds => "uds",
    }
}

/// A Bearer token and how long it may be used.
#[derive(Clone)]
pub struct Token {
    pub value: String,
    pub expires: Instant,
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
    fn credentials_only_over_https_or_to_loopback() {
        for yes in [
            "https://registry.example.com/v2/a/blobs/sha256:1",
            "https://10.0.0.1:5000/v2/a/blobs",
            "http://127.0.0.1:5000/v2/a/blobs/sha256:1",
            "http://127.8.9.10/token",
            "http://[::1]:5000/v2/",
            "http://localhost:5000/v2/",
            "http://LOCALHOST./v2/",
            "http://[::ffff:127.0.0.1]/v2/",
        ] {
            assert!(may_send_credentials(yes), "{yes}");
        }
        for no in [
            "http://registry.example.com/v2/a/blobs/sha256:1",
            "http://10.0.0.1:5000/v2/a/blobs",
            "http://192.168.1.2/token",
            "http://[fe80::1]/v2/",
            "http://localhost.example.com/v2/",
            "http://128.0.0.1/v2/",
            "ftp://127.0.0.1/x",
            "not a url",
            "",
        ] {
            assert!(!may_send_credentials(no), "{no}");
        }
    }

    #[test]
    fn token_lifetimes() {
        assert_eq!(token_lifetime(None), Duration::from_secs(54));
        assert_eq!(token_lifetime(Some(300)), Duration::from_secs(270));
        assert_eq!(token_lifetime(Some(1)), Duration::from_secs(1));
        assert_eq!(token_lifetime(Some(0)), Duration::from_secs(54));
    }
}
