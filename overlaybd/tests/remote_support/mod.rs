//! Test support for registry blobs: the real `docker-registry` (anonymous,
//! htpasswd Basic, or token auth with a small token issuer), and a
//! fault-injecting HTTP proxy that counts what passes through it.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

pub const USER: &str = "obd-user";
pub const PASSWORD: &str = "s3cret-Pa55";
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A docker-style credential file `dir/cred.json` with [`USER`] and
/// [`PASSWORD`] for the registry on 127.0.0.1:`port`.
pub fn write_credential_file(dir: &Path, port: u16) -> PathBuf {
    let path = dir.join("cred.json");
    std::fs::write(
        &path,
        format!(
            r#"{{"auths":{{"127.0.0.1:{port}":{{"auth":"{}"}}}}}}"#,
            BASE64.encode(format!("{USER}:{PASSWORD}"))
        ),
    )
    .unwrap();
    path
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn require(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: run `bash scripts/test.sh` (it installs the Debian package {package})"
    );
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    Anonymous,
    Basic,
    Token,
}

/// A running `docker-registry serve`, stopped when dropped.
pub struct Registry {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    issuer: Option<Child>,
    pub issuer_port: Option<u16>,
}

impl Registry {
    pub fn start(auth: Auth) -> Registry {
        require(REGISTRY_BIN, "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let mut issuer = None;
        let mut issuer_port = None;
        let auth_yaml = match auth {
            Auth::Anonymous => String::new(),
            Auth::Basic => {
                require("/usr/bin/htpasswd", "apache2-utils");
                let out = Command::new("htpasswd")
                    .args(["-Bbn", USER, PASSWORD])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "htpasswd failed");
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, &out.stdout).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: obd-test\n    path: {}\n",
                    file.display()
                )
            }
            Auth::Token => {
                let (child, tport, cert) = start_issuer(dir.path());
                issuer = Some(child);
                issuer_port = Some(tport);
                format!(
                    "auth:\n  token:\n    realm: http://127.0.0.1:{tport}/token\n    service: obd-test\n    issuer: obd-test-issuer\n    rootcertbundle: {}\n",
                    cert.display()
                )
            }
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: obd-test-secret\n{auth_yaml}",
            storage.display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let registry = Registry {
            child,
            port,
            dir,
            issuer,
            issuer_port,
        };
        registry.wait_ready();
        registry
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut answer = String::new();
                let _ = s.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.1") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        panic!(
            "docker-registry did not start on port {}:\n{log}",
            self.port
        );
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stop serving (for "the registry went away" tests).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
        if let Some(issuer) = &mut self.issuer {
            let _ = issuer.kill();
            let _ = issuer.wait();
        }
    }
}

/// Generate a key and self-signed certificate, start the token issuer
/// (python3 with python3-jwt); (process, port, certificate path).
fn start_issuer(dir: &Path) -> (Child, u16, PathBuf) {
    require("/usr/bin/openssl", "openssl");
    require("/usr/bin/python3", "python3-jwt");
    let key = dir.join("token.key");
    let cert = dir.join("token.crt");
    let status = Command::new("/usr/bin/openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=obd-test-issuer", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "openssl could not make a key pair");
    let script = dir.join("issuer.py");
    std::fs::write(&script, ISSUER).unwrap();
    let mut child = Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(&key)
        .arg(&cert)
        .args([USER, PASSWORD])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().unwrap_or_else(|_| {
        panic!(
            "token issuer did not start (python3-jwt, python3-cryptography installed?): {line:?}"
        )
    });
    (child, port, cert)
}

const ISSUER: &str = r#"
import base64, json, sys, time, uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

key = open(sys.argv[1]).read()
cert = x509.load_pem_x509_certificate(open(sys.argv[2], 'rb').read())
x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
want = 'Basic ' + base64.b64encode(f'{sys.argv[3]}:{sys.argv[4]}'.encode()).decode()

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def do_GET(self):
        if self.headers.get('Authorization') != want:
            self.send_response(401)
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        q = parse_qs(urlparse(self.path).query)
        access = []
        for scope in q.get('scope', []):
            kind, _, rest = scope.partition(':')
            name, _, actions = rest.rpartition(':')
            access.append({'type': kind, 'name': name, 'actions': actions.split(',')})
        now = int(time.time())
        claims = {'iss': 'obd-test-issuer', 'sub': sys.argv[3], 'aud': q.get('service', [''])[0],
                  'exp': now + 300, 'nbf': now - 10, 'iat': now, 'jti': str(uuid.uuid4()),
                  'access': access}
        token = jwt.encode(claims, key, algorithm='RS256', headers={'x5c': [x5c]})
        body = json.dumps({'token': token, 'expires_in': 300}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// What the proxy does to one blob GET.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    Pass,
    /// Answer with this status and no body.
    Status(u16),
    /// Close the connection with a TCP reset before answering.
    Reset,
    /// Say nothing for this long, then close.
    Stall(Duration),
    /// Forward, but cut the body in half.
    Truncate,
    /// Forward, with one byte of the body flipped (a corrupting middlebox
    /// or a bad NIC: the status and length are right, the bytes are not).
    FlipByte,
}

#[derive(Default)]
pub struct Plan {
    /// Faults for the next blob GETs, in order.
    pub queue: VecDeque<Fault>,
    /// Then, when set, this fault for every n-th blob GET.
    pub every: Option<(u64, Fault)>,
    /// Applied to every blob GET once the queue is empty.
    pub always: Option<Fault>,
    /// Every n-th blob GET gets the next fault of this list, in turn.
    pub mix: Option<(u64, Vec<Fault>)>,
    /// Delay before each answer.
    pub latency: Duration,
    /// Bytes per second for bodies (0: unlimited): each connection on its
    /// own, unless `shared_link` is set.
    pub rate: u64,
    /// Model one link: `rate` is shared by all connections (each 16 KiB
    /// piece of any body takes its turn on one schedule), and answers that
    /// pass unharmed are streamed as the upstream sends them instead of
    /// being read whole first (so a large body is not delayed by the
    /// upstream's own time to send it all). `latency` stays per request.
    pub shared_link: bool,
    /// Answer blob GETs with a 307 to `/storage/<path>` on this proxy,
    /// which serves the blob (like a registry in front of blob storage).
    pub redirect: bool,
    /// Faults for the next upload `PUT`s, in order.
    pub upload_faults: VecDeque<UploadFault>,
}

/// What happens to an upload `PUT` (`.../blobs/uploads/...`).
#[derive(Clone, Copy, Debug)]
pub enum UploadFault {
    /// The connection is reset before the registry sees the request.
    LostRequest,
    /// The registry takes the blob; the connection is reset before its
    /// answer reaches the client.
    LostAnswer,
}

#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub blob_gets: AtomicU64,
    pub body_bytes: AtomicU64,
    pub faults: AtomicU64,
    /// Upload `PUT`s (`.../blobs/uploads/...`) seen, whatever became of them.
    pub upload_puts: AtomicU64,
    /// Redirects sent, storage GETs served, and storage GETs that carried
    /// an `Authorization` header.
    pub redirects: AtomicU64,
    pub storage_gets: AtomicU64,
    pub storage_with_auth: AtomicU64,
    /// `Range` headers of the blob GETs, in order.
    pub ranges: Mutex<Vec<String>>,
}

/// An HTTP proxy in front of an upstream (the registry): every request is
/// forwarded on its own connection, and blob GETs can be answered with
/// faults. Runs until dropped.
pub struct Proxy {
    pub port: u16,
    pub plan: Arc<Mutex<Plan>>,
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
}

/// The schedule of the one link of [`Plan::shared_link`]: the instant it is
/// free again.
#[derive(Default)]
struct Link {
    free_at: Mutex<Option<Instant>>,
}

/// A sender that comes back later than this after the link went idle
/// starts a new schedule; sooner, it goes on from where the link stood
/// (so a stream is not slowed by how late `sleep` wakes it).
const LINK_SLACK: Duration = Duration::from_millis(1);

impl Link {
    /// Reserve the link for `bytes` at `rate` bytes/s; the instant they
    /// have crossed it.
    fn reserve(&self, bytes: usize, rate: u64) -> Instant {
        let now = Instant::now();
        let mut free_at = self.free_at.lock().unwrap();
        let start = match *free_at {
            Some(at) if at + LINK_SLACK >= now => at,
            _ => now,
        };
        let end = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        *free_at = Some(end);
        end
    }

    /// Send `piece` when the link has carried it.
    fn send(&self, client: &mut TcpStream, piece: &[u8], rate: u64) -> std::io::Result<()> {
        let end = self.reserve(piece.len(), rate);
        if let Some(wait) = end.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        client.write_all(piece)
    }
}

impl Proxy {
    pub fn start(upstream_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let plan = Arc::new(Mutex::new(Plan::default()));
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s, st) = (plan.clone(), stats.clone(), stop.clone());
        let link = Arc::new(Link::default());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (p, s, l) = (p.clone(), s.clone(), link.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream_port, &p, &s, &l);
                });
            }
        });
        Proxy {
            port,
            plan,
            stats,
            stop,
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.plan.lock().unwrap()
    }

    pub fn blob_gets(&self) -> u64 {
        self.stats.blob_gets.load(Ordering::Relaxed)
    }

    pub fn body_bytes(&self) -> u64 {
        self.stats.body_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn read_head(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            return Ok(Some(lines));
        }
        lines.push(line);
    }
}

fn header<'a>(lines: &'a [String], name: &str) -> Option<&'a str> {
    lines.iter().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Close with an RST instead of a FIN (SO_LINGER with a zero timeout).
fn reset(stream: &TcpStream) {
    let _ = rustix::net::sockopt::set_socket_linger(stream, Some(Duration::ZERO));
}

fn stats_is_storage(head: &[String]) -> bool {
    head.first()
        .and_then(|l| l.split(' ').nth(1))
        .is_some_and(|p| p.starts_with("/storage/"))
}

fn serve(
    client: TcpStream,
    upstream_port: u16,
    plan: &Mutex<Plan>,
    stats: &Stats,
    link: &Link,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    let Some(head) = read_head(&mut reader)? else {
        return Ok(());
    };
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let mut request_line = head.first().cloned().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let mut path = parts.next().unwrap_or("").to_string();
    if let Some(rest) = path.strip_prefix("/storage") {
        stats.storage_gets.fetch_add(1, Ordering::Relaxed);
        if header(&head, "authorization").is_some() {
            stats.storage_with_auth.fetch_add(1, Ordering::Relaxed);
        }
        path = rest.to_string();
        request_line = format!("{method} {path} HTTP/1.1");
    } else if method == "GET"
        && path.contains("/blobs/sha256:")
        && header(&head, "authorization").is_some()
        && plan.lock().unwrap().redirect
    {
        stats.redirects.fetch_add(1, Ordering::Relaxed);
        let answer = format!(
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: /storage{path}?sig=x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        client.write_all(answer.as_bytes())?;
        return client.shutdown(Shutdown::Both);
    }
    let body_len: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; body_len];
    reader.read_exact(&mut body)?;
    if method == "PUT" && path.contains("/blobs/uploads/") {
        stats.upload_puts.fetch_add(1, Ordering::Relaxed);
        let upload_fault = plan.lock().unwrap().upload_faults.pop_front();
        match upload_fault {
            Some(UploadFault::LostRequest) => {
                stats.faults.fetch_add(1, Ordering::Relaxed);
                reset(&client);
                return Ok(());
            }
            Some(UploadFault::LostAnswer) => {
                stats.faults.fetch_add(1, Ordering::Relaxed);
                let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
                let mut out = format!("{request_line}\r\n");
                for line in head.iter().skip(1) {
                    let name = line.split(':').next().unwrap_or("").trim();
                    if !name.eq_ignore_ascii_case("connection") {
                        out.push_str(line);
                        out.push_str("\r\n");
                    }
                }
                out.push_str("Connection: close\r\n\r\n");
                upstream.write_all(out.as_bytes())?;
                upstream.write_all(&body)?;
                let mut answer = Vec::new();
                upstream.read_to_end(&mut answer)?;
                reset(&client);
                return Ok(());
            }
            None => {}
        }
    }
    let is_blob_get = method == "GET" && path.contains("/blobs/sha256:");
    let (fault, latency, rate, shared_link) = {
        let mut plan = plan.lock().unwrap();
        let mut fault = Fault::Pass;
        if is_blob_get {
            let n = stats.blob_gets.fetch_add(1, Ordering::Relaxed) + 1;
            stats
                .ranges
                .lock()
                .unwrap()
                .push(header(&head, "range").unwrap_or("").to_string());
            if let Some(f) = plan.queue.pop_front() {
                fault = f;
            } else if let Some(f) = plan.always {
                fault = f;
            } else if let Some((every, f)) = plan.every {
                if n.is_multiple_of(every) {
                    fault = f;
                }
            } else if let Some((every, faults)) = &plan.mix {
                if n.is_multiple_of(*every) && !faults.is_empty() {
                    fault = faults[(n / every) as usize % faults.len()];
                }
            }
        }
        (fault, plan.latency, plan.rate, plan.shared_link)
    };
    if !matches!(fault, Fault::Pass) {
        stats.faults.fetch_add(1, Ordering::Relaxed);
    }
    match fault {
        Fault::Status(code) => {
            std::thread::sleep(latency);
            let answer = format!(
                "HTTP/1.1 {code} Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            client.write_all(answer.as_bytes())?;
            return client.shutdown(Shutdown::Both);
        }
        Fault::Reset => {
            reset(&client);
            return Ok(());
        }
        Fault::Stall(d) => {
            std::thread::sleep(d);
            return client.shutdown(Shutdown::Both);
        }
        Fault::Pass | Fault::Truncate | Fault::FlipByte => {}
    }
    // Forward on a fresh upstream connection.
    let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
    let mut out = String::new();
    out.push_str(&request_line);
    out.push_str("\r\n");
    for line in head.iter().skip(1) {
        let name = line.split(':').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("connection") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    if stats_is_storage(&head) {
        // Blob storage trusts its signed URL; the registry behind this
        // proxy wants credentials, so the proxy adds them.
        out.push_str(&format!(
            "Authorization: Basic {}\r\n",
            BASE64.encode(format!("{USER}:{PASSWORD}"))
        ));
    }
    out.push_str("Connection: close\r\n\r\n");
    upstream.write_all(out.as_bytes())?;
    upstream.write_all(&body)?;
    if shared_link && matches!(fault, Fault::Pass) {
        return stream_answer(client, upstream, latency, rate, stats, link);
    }
    let mut answer = Vec::new();
    upstream.read_to_end(&mut answer)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .unwrap_or(answer.len());
    let (head_bytes, body) = answer.split_at(split);
    let head_text = String::from_utf8_lossy(head_bytes);
    let mut new_head = String::new();
    for line in head_text.split("\r\n").filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("connection") {
            continue;
        }
        new_head.push_str(line);
        new_head.push_str("\r\n");
    }
    new_head.push_str("Connection: close\r\n\r\n");
    std::thread::sleep(latency);
    client.write_all(new_head.as_bytes())?;
    let mut body = body.to_vec();
    match fault {
        Fault::Truncate => body.truncate(body.len() / 2),
        Fault::FlipByte if !body.is_empty() => {
            let at = body.len() / 2;
            body[at] ^= 0x5a;
        }
        _ => {}
    }
    let started = Instant::now();
    let mut sent = 0u64;
    for piece in body.chunks(16 * 1024) {
        client.write_all(piece)?;
        sent += piece.len() as u64;
        stats
            .body_bytes
            .fetch_add(piece.len() as u64, Ordering::Relaxed);
        if rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    client.flush()?;
    if matches!(fault, Fault::Truncate) {
        reset(&client);
        return Ok(());
    }
    client.shutdown(Shutdown::Write)
}

/// Forward the upstream's answer as it comes ([`Plan::shared_link`]): its
/// head after `latency`, then its body in ≤ 16 KiB pieces over the link.
fn stream_answer(
    mut client: TcpStream,
    upstream: TcpStream,
    latency: Duration,
    rate: u64,
    stats: &Stats,
    link: &Link,
) -> std::io::Result<()> {
    let mut upstream = BufReader::with_capacity(64 * 1024, upstream);
    let Some(head) = read_head(&mut upstream)? else {
        return client.shutdown(Shutdown::Both);
    };
    let mut new_head = String::new();
    for line in &head {
        let name = line.split(':').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("connection") {
            continue;
        }
        new_head.push_str(line);
        new_head.push_str("\r\n");
    }
    new_head.push_str("Connection: close\r\n\r\n");
    std::thread::sleep(latency);
    client.write_all(new_head.as_bytes())?;
    let mut piece = vec![0u8; 16 * 1024];
    loop {
        let n = upstream.read(&mut piece)?;
        if n == 0 {
            break;
        }
        if rate > 0 {
            link.send(&mut client, &piece[..n], rate)?;
        } else {
            client.write_all(&piece[..n])?;
        }
        stats.body_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    client.flush()?;
    client.shutdown(Shutdown::Write)
}

// ---------------------------------------------------------------------------
// Small scripted servers: credential servers, a registry that redirects,
// blob storage that records what it is sent.
// ---------------------------------------------------------------------------

/// One request a [`MiniServer`] received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// The request target, as sent (path and query).
    pub target: String,
    pub authorization: Option<String>,
    pub range: Option<String>,
}

impl Seen {
    /// The percent-decoded value of query parameter `name`.
    pub fn query(&self, name: &str) -> Option<String> {
        let query = self.target.split_once('?')?.1;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == name).then(|| percent_decode(v))
        })
    }
}

/// `%XX` escapes (and `+`) of a query value decoded.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a [`MiniServer`] answers.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Reply {
        self.body = body.into();
        self
    }
    pub fn json(body: &str) -> Reply {
        Reply::new(200)
            .header("Content-Type", "application/json")
            .body(body)
    }
}

pub type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A one-request-per-connection HTTP/1.1 server on 127.0.0.1 or on a unix
/// socket, answering with `handler` and recording every request.
pub struct MiniServer {
    pub port: u16,
    pub socket: Option<PathBuf>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

impl MiniServer {
    pub fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> MiniServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        Self::serve(
            move || listener.accept().map(|(c, _)| c),
            port,
            None,
            handler,
        )
    }

    /// The same on the unix socket `path`.
    pub fn start_unix(
        path: &Path,
        handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> MiniServer {
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        let socket = Some(path.to_path_buf());
        Self::serve(
            move || listener.accept().map(|(c, _)| c),
            0,
            socket,
            handler,
        )
    }

    /// Answer every connection `accept` gives, each on its own thread.
    fn serve<S: Read + Write + Send + 'static>(
        mut accept: impl FnMut() -> std::io::Result<S> + Send + 'static,
        port: u16,
        socket: Option<PathBuf>,
        handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> MiniServer {
        let (seen, stop) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(AtomicBool::new(false)),
        );
        let handler: Handler = Arc::new(handler);
        let (s, st) = (seen.clone(), stop.clone());
        std::thread::spawn(move || loop {
            let conn = accept();
            if st.load(Ordering::Relaxed) {
                break;
            }
            let Ok(conn) = conn else { continue };
            let (h, s) = (handler.clone(), s.clone());
            std::thread::spawn(move || answer(conn, &h, &s));
        });
        MiniServer {
            port,
            socket,
            seen,
            stop,
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for MiniServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        match &self.socket {
            Some(path) => {
                let _ = std::os::unix::net::UnixStream::connect(path);
            }
            None => {
                let _ = TcpStream::connect(("127.0.0.1", self.port));
            }
        }
    }
}

fn answer<S: Read + Write>(mut stream: S, handler: &Handler, seen: &Mutex<Vec<Seen>>) {
    // Read the head a byte at a time: requests here are GETs without bodies.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let lines: Vec<String> = text
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let mut first = lines.first().map(|l| l.split(' ')).into_iter().flatten();
    let request = Seen {
        method: first.next().unwrap_or("").to_string(),
        target: first.next().unwrap_or("").to_string(),
        authorization: header(&lines, "authorization").map(str::to_string),
        range: header(&lines, "range").map(str::to_string),
    };
    seen.lock().unwrap().push(request.clone());
    let reply = handler(&request);
    let mut out = format!("HTTP/1.1 {} Scripted\r\n", reply.status);
    for (name, value) in &reply.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        reply.body.len()
    ));
    let _ = stream.write_all(out.as_bytes());
    let _ = stream.write_all(&reply.body);
    let _ = stream.flush();
}

/// A credential server's answer giving `user`/`password` for the host of
/// `remote_url` (`{traceId, success, data: {auths}}`).
pub fn credential_answer(remote_url: &str, user: &str, password: &str) -> String {
    let host = remote_url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("");
    format!(
        r#"{{"traceId":"t-1","success":true,"data":{{"auths":{{"{host}":{{"username":"{user}","password":"{password}"}}}}}}}}"#
    )
}

/// The bytes `range` (`bytes=a-b`) asks for out of `blob`, as a 206.
pub fn range_reply(blob: &[u8], range: Option<&str>) -> Reply {
    let Some((a, b)) = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
    else {
        return Reply::new(200).body(blob.to_vec());
    };
    let b = b.min(blob.len() - 1);
    Reply::new(206)
        .header("Content-Range", &format!("bytes {a}-{b}/{}", blob.len()))
        .body(blob[a..=b].to_vec())
}

// ---------------------------------------------------------------------------
// TLS: a test CA and a certificate for 127.0.0.1, made with openssl.
// ---------------------------------------------------------------------------

/// `ca.crt`, `server.crt` and `server.key` (for IP 127.0.0.1) in `dir`,
/// plus `client.crt`/`client.key` signed by the same CA.
pub fn make_test_pki(dir: &Path) {
    require("/usr/bin/openssl", "openssl");
    let openssl = |args: &[&str]| {
        let out = Command::new("/usr/bin/openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=obd test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    for who in ["server", "client"] {
        let (key, csr, crt, ext) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.crt"),
            format!("{who}.ext"),
        );
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN=obd test {who}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ]);
    }
}

/// An https server (python3's ssl) on 127.0.0.1 with `dir`'s server.crt:
/// `/auth?remote_url=U` answers credentials for U's host, any other GET
/// answers ranges of `blob`. With `client_ca`, a client certificate signed
/// by it is required. Stopped when dropped.
pub struct TlsServer {
    child: Child,
    pub port: u16,
}

impl TlsServer {
    pub fn start(dir: &Path, blob: &Path, client_ca: Option<&Path>) -> TlsServer {
        require("/usr/bin/python3", "python3");
        let script = dir.join("tls_server.py");
        std::fs::write(&script, TLS_SERVER).unwrap();
        let mut child = Command::new("/usr/bin/python3")
            .arg(&script)
            .arg(dir.join("server.crt"))
            .arg(dir.join("server.key"))
            .arg(blob)
            .args([USER, PASSWORD])
            .arg(
                client_ca
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the TLS test server did not start: {line:?}"));
        TlsServer { child, port }
    }

    pub fn base(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TLS_SERVER: &str = r#"
import json, ssl, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs

cert, key, blob_path, user, password, client_ca = sys.argv[1:7]
blob = open(blob_path, 'rb').read()

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def send(self, code, body, headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        url = urlparse(self.path)
        if url.path == '/auth':
            remote = parse_qs(url.query).get('remote_url', [''])[0]
            host = urlparse(remote).netloc
            body = json.dumps({'traceId': 't', 'success': True, 'data': {'auths': {
                host: {'username': user, 'password': password}}}}).encode()
            self.send(200, body, [('Content-Type', 'application/json')])
            return
        rng = self.headers.get('Range', '')
        if rng.startswith('bytes='):
            a, b = rng[6:].split('-')
            a, b = int(a), min(int(b), len(blob) - 1)
            self.send(206, blob[a:b + 1], [('Content-Range', f'bytes {a}-{b}/{len(blob)}')])
        else:
            self.send(200, blob)

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
if client_ca:
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(client_ca)
server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;
