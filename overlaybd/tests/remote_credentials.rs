//! Where registry credentials come from (`credentialConfig.mode` file,
//! empty, http, https, uds), where they may go (never to a redirect target
//! or another host), a credential server that fails and recovers, and which
//! TLS certificates are trusted (`certConfig`). Against the real
//! `docker-registry`, python3's TLS server and small scripted servers on
//! 127.0.0.1 and on unix sockets.

mod remote_support;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use overlaybd::config::{CredentialMode, GlobalConfig, DEFAULT_CREDENTIAL_FILE};
use overlaybd::credentials::Credentials;
use overlaybd::remote::auth::{CredentialServer, CredentialSource};
use overlaybd::remote::errno_of;
use overlaybd::remote::registry::{Registry as Client, RegistryOptions};
use remote_support::{
    credential_answer, make_test_pki, range_reply, Auth, MiniServer, Registry, Reply, TlsServer,
    PASSWORD, USER,
};

const REPO: &str = "obd/cred";

fn fast_options() -> RegistryOptions {
    RegistryOptions {
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(2),
        tries: 2,
        backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(20),
        deadline: Duration::from_secs(10),
        ..RegistryOptions::default()
    }
}

fn blob_bytes() -> Vec<u8> {
    (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn credentials_for(port: u16) -> Credentials {
    Credentials::from_json(
        &format!(
            r#"{{"auths":{{"127.0.0.1:{port}":{{"username":"{USER}","password":"{PASSWORD}"}}}}}}"#
        ),
        "test",
    )
    .unwrap()
}

fn basic() -> String {
    format!("Basic {}", BASE64.encode(format!("{USER}:{PASSWORD}")))
}

/// A Basic-auth `docker-registry` holding [`blob_bytes`]; (registry, blob
/// URL, the blob).
fn basic_registry_with_blob(dir: &Path) -> (Registry, String, Vec<u8>) {
    let registry = Registry::start(Auth::Basic);
    let bytes = blob_bytes();
    let path = dir.join("blob");
    std::fs::write(&path, &bytes).unwrap();
    let (digest, _) = overlaybd::remote::sha256_file(&path).unwrap();
    let client = Client::with_credentials(
        RegistryOptions::default(),
        Box::new(credentials_for(registry.port)),
    );
    let repo_url = format!("{}/v2/{REPO}", registry.base());
    client.upload_blob(&repo_url, &digest, &path).unwrap();
    let url = format!("{repo_url}/blobs/{digest}");
    (registry, url, bytes)
}

/// Read all of `url` through a client made from `global`.
fn read_with(global: &GlobalConfig, url: &str, size: usize) -> std::io::Result<Vec<u8>> {
    let client = Client::new(fast_options(), global).map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; size];
    client.read_range(url, size as u64, 0, &mut buf)?;
    Ok(buf)
}

fn global(mode: Option<CredentialMode>, path: Option<String>) -> GlobalConfig {
    let mut global = GlobalConfig::default();
    global.credential_config.mode = mode;
    global.credential_config.path = path;
    global.credential_config.timeout = 5;
    global
}

#[test]
fn file_and_empty_modes_read_the_credential_file() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, url, bytes) = basic_registry_with_blob(dir.path());
    let file = remote_support::write_credential_file(dir.path(), registry.port);
    for mode in [None, Some(CredentialMode::File)] {
        let got = read_with(
            &global(mode, Some(file.display().to_string())),
            &url,
            bytes.len(),
        )
        .unwrap_or_else(|e| panic!("mode {mode:?}: {e}"));
        assert!(got == bytes, "mode {mode:?}: wrong bytes");
    }
    // No path: the default file, which gives no credentials when absent.
    if !Path::new(DEFAULT_CREDENTIAL_FILE).exists() {
        let err = read_with(&global(None, None), &url, bytes.len()).unwrap_err();
        assert_eq!(errno_of(&err), libc::EPERM, "{err}");
    }
}

#[test]
fn http_mode_asks_the_credential_server() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url, bytes) = basic_registry_with_blob(dir.path());
    let server = MiniServer::start(|seen| {
        Reply::json(&credential_answer(
            &seen.query("remote_url").unwrap_or_default(),
            USER,
            PASSWORD,
        ))
    });
    let config = global(
        Some(CredentialMode::Http),
        Some(format!("{}/auth", server.base())),
    );
    assert!(read_with(&config, &url, bytes.len()).unwrap() == bytes);
    let seen = server.seen();
    assert!(!seen.is_empty());
    assert!(seen[0].target.starts_with("/auth?remote_url="), "{seen:?}");
    assert_eq!(seen[0].query("remote_url").as_deref(), Some(url.as_str()));
}

#[test]
fn uds_mode_asks_over_the_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url, bytes) = basic_registry_with_blob(dir.path());
    let socket = dir.path().join("cred.sock");
    let server = MiniServer::start_unix(&socket, |seen| {
        if !seen.target.starts_with("/auth?") {
            return Reply::new(404);
        }
        Reply::json(&credential_answer(
            &seen.query("remote_url").unwrap_or_default(),
            USER,
            PASSWORD,
        ))
    });
    let config = global(
        Some(CredentialMode::Uds),
        Some(socket.display().to_string()),
    );
    assert!(read_with(&config, &url, bytes.len()).unwrap() == bytes);
    let seen = server.seen();
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].query("remote_url").as_deref(), Some(url.as_str()));

    // A socket nobody listens on: a clear error naming it, no password.
    let config = global(
        Some(CredentialMode::Uds),
        Some(dir.path().join("absent.sock").display().to_string()),
    );
    let err = read_with(&config, &url, bytes.len()).unwrap_err();
    let msg = err.to_string();
    assert_eq!(errno_of(&err), libc::EPERM, "{msg}");
    assert!(msg.contains("absent.sock"), "{msg}");
}

#[test]
fn https_mode_with_server_ca_and_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url, bytes) = basic_registry_with_blob(dir.path());
    make_test_pki(dir.path());
    let ca = dir.path().join("ca.crt");
    let server = TlsServer::start(dir.path(), &dir.path().join("blob"), Some(&ca));
    let mut config = global(
        Some(CredentialMode::Https),
        Some(format!("{}/auth", server.base())),
    );
    config.credential_config.server_ca_path = Some(ca.clone());
    config.credential_config.client_cert_path = Some(dir.path().join("client.crt"));
    config.credential_config.client_key_path = Some(dir.path().join("client.key"));
    assert!(read_with(&config, &url, bytes.len()).unwrap() == bytes);

    // Without the client certificate the server refuses the handshake.
    let mut without = config.clone();
    without.credential_config.client_cert_path = None;
    without.credential_config.client_key_path = None;
    let err = read_with(&without, &url, bytes.len()).unwrap_err();
    assert_eq!(errno_of(&err), libc::EPERM, "{err}");

    // Without server_ca_path the test CA is not trusted.
    let mut untrusted = config.clone();
    untrusted.credential_config.server_ca_path = None;
    let err = read_with(&untrusted, &url, bytes.len()).unwrap_err();
    assert!(err.to_string().contains("credential server"), "{err}");

    // mode https wants an https:// URL.
    let plain = global(
        Some(CredentialMode::Https),
        Some("http://127.0.0.1:1/auth".into()),
    );
    let msg = Client::new(fast_options(), &plain)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("is not an https:// URL"), "{msg}");
}

#[test]
fn server_modes_need_a_path_and_errors_hide_passwords() {
    for mode in [
        CredentialMode::Http,
        CredentialMode::Https,
        CredentialMode::Uds,
    ] {
        let msg = Client::new(fast_options(), &global(Some(mode), None))
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("needs credentialConfig.path"), "{msg}");
    }
    // A credential server URL with user info: refused connection, and the
    // message names the server without its password.
    let port = remote_support::free_port();
    let config = global(
        Some(CredentialMode::Http),
        Some(format!(
            "http://admin:hunter2@127.0.0.1:{port}/auth?key=k3y"
        )),
    );
    let client = Client::new(fast_options(), &config).unwrap();
    let registry =
        MiniServer::start(|_| Reply::new(401).header("WWW-Authenticate", "Basic realm=\"r\""));
    let mut buf = [0u8; 4];
    let err = client
        .read_range(
            &format!("{}/v2/a/b/blobs/sha256:00", registry.base()),
            4,
            0,
            &mut buf,
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(!msg.contains("hunter2") && !msg.contains("k3y"), "{msg}");
}

/// Blob storage on its own port, recording what it is sent.
fn storage(bytes: Arc<Vec<u8>>) -> MiniServer {
    MiniServer::start(move |seen| range_reply(&bytes, seen.range.as_deref()))
}

#[test]
fn basic_credentials_never_follow_a_redirect() {
    let bytes = Arc::new(blob_bytes());
    let storage = storage(bytes.clone());
    let target = format!("{}/blob?sig=1", storage.base());
    let front = MiniServer::start(move |seen| {
        if seen.authorization.as_deref() == Some(basic().as_str()) {
            Reply::new(307).header("Location", &target)
        } else {
            Reply::new(401).header("WWW-Authenticate", "Basic realm=\"front\"")
        }
    });
    let client = Client::with_credentials(fast_options(), Box::new(credentials_for(front.port)));
    let url = format!("{}/v2/a/b/blobs/sha256:11", front.base());
    let mut buf = vec![0u8; bytes.len()];
    client
        .read_range(&url, buf.len() as u64, 0, &mut buf)
        .unwrap();
    assert!(buf == *bytes);
    // A second read goes to the cached location, still without credentials.
    client
        .read_range(&url, buf.len() as u64, 0, &mut buf)
        .unwrap();
    let front_seen = front.seen();
    assert!(front_seen
        .iter()
        .any(|s| s.authorization.as_deref() == Some(basic().as_str())));
    let storage_seen = storage.seen();
    assert!(storage_seen.len() >= 2, "{storage_seen:?}");
    assert!(
        storage_seen.iter().all(|s| s.authorization.is_none()),
        "credentials reached the redirect target: {storage_seen:?}"
    );
}

#[test]
fn bearer_credentials_go_only_to_the_realm() {
    let bytes = Arc::new(blob_bytes());
    let storage = storage(bytes.clone());
    let token = MiniServer::start(|seen| {
        if seen.authorization.as_deref() == Some(basic().as_str()) {
            Reply::json(r#"{"token":"tok-123","expires_in":300}"#)
        } else {
            Reply::new(401)
        }
    });
    let realm = format!("{}/token", token.base());
    let target = format!("{}/blob?sig=1", storage.base());
    let front = MiniServer::start(move |seen| {
        if seen.authorization.as_deref() == Some("Bearer tok-123") {
            Reply::new(307).header("Location", &target)
        } else {
            Reply::new(401).header(
                "WWW-Authenticate",
                &format!(r#"Bearer realm="{realm}",service="svc",scope="repository:a/b:pull""#),
            )
        }
    });
    let client = Client::with_credentials(fast_options(), Box::new(credentials_for(front.port)));
    let url = format!("{}/v2/a/b/blobs/sha256:22", front.base());
    let mut buf = vec![0u8; bytes.len()];
    client
        .read_range(&url, buf.len() as u64, 0, &mut buf)
        .unwrap();
    assert!(buf == *bytes);
    let token_seen = token.seen();
    assert_eq!(token_seen.len(), 1, "{token_seen:?}");
    assert_eq!(
        token_seen[0].authorization.as_deref(),
        Some(basic().as_str())
    );
    assert_eq!(
        token_seen[0].query("scope").as_deref(),
        Some("repository:a/b:pull")
    );
    // The registry sees the token, never the password; storage sees nothing.
    assert!(front
        .seen()
        .iter()
        .all(|s| s.authorization.as_deref() != Some(basic().as_str())));
    assert!(storage.seen().iter().all(|s| s.authorization.is_none()));
}

fn plain_agent() -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(overlaybd::remote::tls::default_tls())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[test]
fn a_failing_credential_server_is_asked_again_after_a_pause() {
    let calls = Arc::new(AtomicU64::new(0));
    let c = calls.clone();
    let server = MiniServer::start(move |seen| match c.fetch_add(1, Ordering::SeqCst) {
        0 => Reply::new(500),
        1 => Reply::json(r#"{"traceId":"t-9","success":false}"#),
        _ => Reply::json(&credential_answer(
            &seen.query("remote_url").unwrap_or_default(),
            USER,
            PASSWORD,
        )),
    });
    let source = CredentialServer::new(plain_agent(), &format!("{}/auth", server.base()))
        .with_timing(Duration::from_secs(60), Duration::from_millis(300));
    let url = "http://127.0.0.1:5000/v2/a/b/blobs/sha256:33";

    let err = source.lookup(url).unwrap_err();
    assert!(err.to_string().contains("HTTP 500"), "{err}");
    // Within the pause: the same failure, without asking.
    let err = source.lookup(url).unwrap_err();
    assert!(err.to_string().contains("HTTP 500"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    std::thread::sleep(Duration::from_millis(350));
    let err = source.lookup(url).unwrap_err();
    assert!(err.to_string().contains("traceId t-9"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    std::thread::sleep(Duration::from_millis(350));
    let credential = source.lookup(url).unwrap().unwrap();
    assert_eq!(credential.username, USER);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // A good answer is kept.
    assert!(source.lookup(url).unwrap().is_some());
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Errors never carried the password.
    assert!(!format!("{err:?}").contains(PASSWORD));
}

#[test]
fn a_good_answer_expires() {
    let server = MiniServer::start(|seen| {
        Reply::json(&credential_answer(
            &seen.query("remote_url").unwrap_or_default(),
            USER,
            PASSWORD,
        ))
    });
    let source = CredentialServer::new(plain_agent(), &format!("{}/auth", server.base()))
        .with_timing(Duration::from_millis(200), Duration::from_millis(100));
    let url = "http://127.0.0.1:5000/v2/a/b/blobs/sha256:44";
    source.lookup(url).unwrap().unwrap();
    source.lookup(url).unwrap().unwrap();
    assert_eq!(server.seen().len(), 1);
    std::thread::sleep(Duration::from_millis(250));
    source.lookup(url).unwrap().unwrap();
    assert_eq!(server.seen().len(), 2);
}

#[test]
fn a_registry_read_recovers_once_the_credential_server_does() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url, bytes) = basic_registry_with_blob(dir.path());
    let calls = Arc::new(AtomicU64::new(0));
    let c = calls.clone();
    let socket = dir.path().join("flaky.sock");
    let _server = MiniServer::start_unix(&socket, move |seen| {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::new(503)
        } else {
            Reply::json(&credential_answer(
                &seen.query("remote_url").unwrap_or_default(),
                USER,
                PASSWORD,
            ))
        }
    });
    let source = CredentialServer::unix(&socket, Duration::from_secs(5))
        .with_timing(Duration::from_secs(60), Duration::from_millis(200));
    let client = Client::with_credentials(fast_options(), Box::new(source));
    let mut buf = vec![0u8; bytes.len()];
    let err = client
        .read_range(&url, bytes.len() as u64, 0, &mut buf)
        .unwrap_err();
    assert!(err.to_string().contains("HTTP 503"), "{err}");
    std::thread::sleep(Duration::from_millis(250));
    client
        .read_range(&url, bytes.len() as u64, 0, &mut buf)
        .unwrap();
    assert!(buf == bytes);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[test]
fn cert_config_cas_are_trusted() {
    let dir = tempfile::tempdir().unwrap();
    make_test_pki(dir.path());
    let bytes = blob_bytes();
    let blob = dir.path().join("blob");
    std::fs::write(&blob, &bytes).unwrap();
    let server = TlsServer::start(dir.path(), &blob, None);
    let url = format!("{}/v2/a/b/blobs/sha256:55", server.base());

    // The test CA is in no store: refused.
    let err = read_with(&GlobalConfig::default(), &url, bytes.len()).unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );

    // certConfig.caFile.
    let mut global = GlobalConfig::default();
    global.cert_config.ca_file = Some(dir.path().join("ca.crt"));
    assert!(read_with(&global, &url, bytes.len()).unwrap() == bytes);

    // certConfig.caDir, laid out like docker's certs.d/<host>/ca.crt.
    let certs_d = dir.path().join("certs.d");
    let host_dir = certs_d.join(format!("127.0.0.1:{}", server.port));
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::copy(dir.path().join("ca.crt"), host_dir.join("ca.crt")).unwrap();
    let mut global = GlobalConfig::default();
    global.cert_config.ca_dir = Some(certs_d);
    assert!(read_with(&global, &url, bytes.len()).unwrap() == bytes);

    // A caFile without certificates is a config error, not silence.
    let mut global = GlobalConfig::default();
    global.cert_config.ca_file = Some(dir.path().join("server.ext"));
    let msg = Client::new(fast_options(), &global)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("no PEM certificate"), "{msg}");
}

#[test]
fn cert_config_client_certificate_is_offered() {
    let dir = tempfile::tempdir().unwrap();
    make_test_pki(dir.path());
    let bytes = blob_bytes();
    let blob = dir.path().join("blob");
    std::fs::write(&blob, &bytes).unwrap();
    let ca = dir.path().join("ca.crt");
    let server = TlsServer::start(dir.path(), &blob, Some(&ca));
    let url = format!("{}/v2/a/b/blobs/sha256:66", server.base());

    let mut global = GlobalConfig::default();
    global.cert_config.ca_file = Some(ca.clone());
    assert!(read_with(&global, &url, bytes.len()).is_err());
    global.cert_config.cert_file = Some(dir.path().join("client.crt"));
    global.cert_config.key_file = Some(dir.path().join("client.key"));
    assert!(read_with(&global, &url, bytes.len()).unwrap() == bytes);

    // A key that is not the certificate's is refused when the client is made.
    global.cert_config.key_file = Some(dir.path().join("server.key"));
    let msg = Client::new(fast_options(), &global)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("does not belong to the certificate"), "{msg}");
    // A keyFile alone is a mistake too.
    global.cert_config.cert_file = None;
    let msg = Client::new(fast_options(), &global)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("without certConfig.certFile"), "{msg}");
}
