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
    /// Bytes per second for bodies (0: unlimited).
    pub rate: u64,
    /// Answer blob GETs with a 307 to `/storage/<path>` on this proxy,
    /// which serves the blob (like a registry in front of blob storage).
    pub redirect: bool,
}

#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub blob_gets: AtomicU64,
    pub body_bytes: AtomicU64,
    pub faults: AtomicU64,
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

impl Proxy {
    pub fn start(upstream_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let plan = Arc::new(Mutex::new(Plan::default()));
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s, st) = (plan.clone(), stats.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (p, s) = (p.clone(), s.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream_port, &p, &s);
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
    let is_blob_get = method == "GET" && path.contains("/blobs/sha256:");
    let (fault, latency, rate) = {
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
        (fault, plan.latency, plan.rate)
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
