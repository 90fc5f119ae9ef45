//! Which certificates registry (and credential server) connections trust,
//! and which client certificate they offer.
//!
//! Trusted roots: Mozilla's, compiled in (`webpki-root-certs`), plus the
//! system CA bundle when there is one (`SSL_CERT_FILE`, else the first of
//! the usual distribution paths, `/etc/ssl/certs/ca-certificates.crt` on
//! Debian), plus the CA files `certConfig` names, all in one rustls
//! `RootCertStore`. The `rustls::ClientConfig` made here (ring, TLS 1.2 and
//! 1.3, ALPN `h2` then `http/1.1`) is handed to reqwest as it is
//! (`use_preconfigured_tls`), so HTTP/2 is used where the server offers it.
//!
//! Why not `rustls-platform-verifier` or `rustls-native-certs`: they pull
//! in more crates to end up reading the same PEM bundle on Linux, and
//! cannot take `certConfig`'s extra CAs. Reading the bundle with the PEM
//! parser of `rustls-pki-types` costs one data-only crate
//! (`webpki-root-certs`) and lets `certConfig` add its CAs to the same
//! store.
//!
//! A client certificate and key are checked against each other here, with
//! rustls, when the config is loaded, so a mismatch is a config error and
//! not a failure on the first connection.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::config::CertConfig;
use crate::error::{Error, IoContext, Result};

/// Where distributions keep their CA bundle, in the order they are tried.
pub const SYSTEM_BUNDLES: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL, CentOS
    "/etc/ssl/certs/ca-bundle.crt",       // older Fedora, the reference's first choice
    "/etc/ssl/ca-bundle.pem",             // openSUSE
    "/etc/ssl/cert.pem",                  // Alpine, macOS
];

/// The system CA bundle: `SSL_CERT_FILE` when it is set and exists, else
/// the first of [`SYSTEM_BUNDLES`] that exists.
pub fn system_bundle() -> Option<PathBuf> {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    from_env
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

/// The certificates of a PEM file; an error when it holds none (a CA file
/// that silently adds nothing would be hard to find).
pub fn load_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let name = path.display().to_string();
    let pem = fs::read(path).context(|| name.clone())?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::corrupt(&name, format!("not a valid PEM file: {e:?}")))?;
    if certs.is_empty() {
        return Err(Error::corrupt(&name, "the file holds no PEM certificate"));
    }
    Ok(certs)
}

/// The `*.crt` and `*.pem` files in `dir` and in its subdirectories one
/// level down, sorted.
pub fn ca_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let name = dir.display().to_string();
    let is_ca = |p: &Path| {
        p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("crt" | "pem"))
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).context(|| name.clone())? {
        let path = entry.context(|| name.clone())?.path();
        if path.is_dir() {
            let sub = path.display().to_string();
            for inner in fs::read_dir(&path).context(|| sub.clone())? {
                let inner = inner.context(|| sub.clone())?.path();
                if is_ca(&inner) {
                    files.push(inner);
                }
            }
        } else if is_ca(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Mozilla's roots, the system bundle's and `extra`, in one store.
/// A system bundle that cannot be read is skipped (the compiled-in roots
/// still work), as is any certificate that is not a usable trust anchor.
pub fn root_certs(extra: &[CertificateDer<'static>]) -> RootCertStore {
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned());
    if let Some(bundle) = system_bundle() {
        if let Ok(system) = load_pem_certs(&bundle) {
            store.add_parsable_certificates(system);
        }
    }
    store.add_parsable_certificates(extra.iter().cloned());
    store
}

/// The CA certificates `certConfig` adds (`caFile`, then `caDir`).
pub fn extra_cas(config: &CertConfig) -> Result<Vec<CertificateDer<'static>>> {
    let mut files = Vec::new();
    files.extend(config.ca_file.clone());
    if let Some(dir) = &config.ca_dir {
        files.extend(ca_files_in(dir)?);
    }
    let mut certs = Vec::new();
    for file in files {
        certs.extend(load_pem_certs(&file)?);
    }
    Ok(certs)
}

/// A client certificate chain and its private key.
pub struct ClientCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// A client certificate chain from `cert` and its key from `key` (or from
/// `cert` when `key` is `None`), checked to belong together.
pub fn load_client_cert(cert: &Path, key: Option<&Path>) -> Result<ClientCert> {
    let chain = load_pem_certs(cert)?;
    let key_path = key.unwrap_or(cert);
    let key_name = key_path.display().to_string();
    let pem = fs::read(key_path).context(|| key_name.clone())?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|_| Error::corrupt(&key_name, "the file holds no PEM private key"))?;
    check_key_pair(&chain, &key).map_err(|problem| {
        Error::Invalid(format!(
            "client certificate {} and key {key_name}: {problem}",
            cert.display()
        ))
    })?;
    Ok(ClientCert { chain, key })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether rustls accepts `key` for the first certificate of `chain`, as
/// it will when a TLS connection is made.
fn check_key_pair(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> std::result::Result<(), String> {
    rustls::sign::CertifiedKey::from_der(chain.to_vec(), key.clone_key(), &provider())
        .map(|_| ())
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                "the key does not belong to the certificate".to_string()
            }
            e => format!("the key cannot be used ({e})"),
        })
}

/// A client TLS config trusting `roots` and offering `client_cert`, with
/// ALPN for HTTP/2 and HTTP/1.1.
pub fn client_config(
    roots: RootCertStore,
    client_cert: Option<ClientCert>,
) -> Result<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Invalid(format!("TLS settings: {e}")))?
        .with_root_certificates(roots);
    let mut config = match client_cert {
        Some(ClientCert { chain, key }) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| Error::Invalid(format!("client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The TLS settings for registry requests: trusted roots ([`root_certs`]
/// with `certConfig`'s CAs) and `certConfig`'s client certificate.
pub fn registry_tls(config: &CertConfig) -> Result<ClientConfig> {
    let client_cert = match (&config.cert_file, &config.key_file) {
        (Some(cert), key) => Some(load_client_cert(cert, key.as_deref())?),
        (None, Some(key)) => {
            return Err(Error::Invalid(format!(
                "certConfig.keyFile {} is set without certConfig.certFile",
                key.display()
            )))
        }
        (None, None) => None,
    };
    client_config(root_certs(&extra_cas(config)?), client_cert)
}

/// The default TLS settings: [`root_certs`], no client certificate.
pub fn default_tls() -> ClientConfig {
    client_config(root_certs(&[]), None).expect("rustls's default protocol versions")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_roots_are_trust_anchors() {
        let store = root_certs(&[]);
        assert!(store.len() >= webpki_root_certs::TLS_SERVER_ROOT_CERTS.len() * 9 / 10);
        assert_eq!(
            default_tls().alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        fs::write(&path, "not a certificate\n").unwrap();
        let msg = load_pem_certs(&path).unwrap_err().to_string();
        assert!(msg.contains("no PEM certificate"), "{msg}");
        let missing = load_pem_certs(&dir.path().join("absent.pem"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("absent.pem"), "{missing}");
    }
}
