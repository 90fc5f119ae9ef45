//! Which certificates registry (and credential server) connections trust,
//! and which client certificate they offer.
//!
//! Trusted roots: Mozilla's, compiled in (`webpki-root-certs`), plus the
//! system CA bundle when there is one (`SSL_CERT_FILE`, else the first of
//! the usual distribution paths, `/etc/ssl/certs/ca-certificates.crt` on
//! Debian), plus the CA files `certConfig` names. They are handed to ureq
//! as one list of certificates (`RootCerts::Specific`).
//!
//! Why not ureq's `platform-verifier` feature: it pulls in
//! `rustls-platform-verifier` and `rustls-native-certs` (and their
//! `openssl-probe`, `security-framework`... trees) to end up reading the
//! same PEM bundle on Linux, and it cannot take extra CAs through ureq's
//! API. Reading the bundle with the PEM parser ureq already has costs one
//! data-only crate (`webpki-root-certs`, needed because ureq's bundled
//! `webpki-roots` are trust anchors, not certificates, and cannot be mixed
//! with the others) and lets `certConfig` add its CAs to the same list.
//!
//! A client certificate and key are checked against each other here, with
//! rustls, when the config is loaded: ureq would otherwise panic on the
//! first TLS connection if they did not match.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ureq::tls::{parse_pem, Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

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
pub fn load_pem_certs(path: &Path) -> Result<Vec<Certificate<'static>>> {
    let name = path.display().to_string();
    let pem = fs::read(path).context(|| name.clone())?;
    let mut certs = Vec::new();
    for item in parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(cert)) => certs.push(cert),
            Ok(_) => {}
            Err(e) => {
                return Err(Error::corrupt(&name, format!("not a valid PEM file: {e}")));
            }
        }
    }
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

/// Mozilla's roots, the system bundle's and `extra`, in that order.
/// A system bundle that cannot be read is skipped: the compiled-in roots
/// still work.
pub fn root_certs(extra: &[Certificate<'static>]) -> RootCerts {
    let mut certs: Vec<Certificate<'static>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .map(|der| Certificate::from_der(der.as_ref()))
        .collect();
    if let Some(bundle) = system_bundle() {
        if let Ok(system) = load_pem_certs(&bundle) {
            certs.extend(system);
        }
    }
    certs.extend_from_slice(extra);
    RootCerts::Specific(Arc::new(certs))
}

/// The CA certificates `certConfig` adds (`caFile`, then `caDir`).
pub fn extra_cas(config: &CertConfig) -> Result<Vec<Certificate<'static>>> {
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

/// A client certificate chain from `cert` and its key from `key` (or from
/// `cert` when `key` is `None`), checked to belong together.
pub fn load_client_cert(cert: &Path, key: Option<&Path>) -> Result<ClientCert> {
    let chain = load_pem_certs(cert)?;
    let key_path = key.unwrap_or(cert);
    let key_name = key_path.display().to_string();
    let pem = fs::read(key_path).context(|| key_name.clone())?;
    let no_key = || Error::corrupt(&key_name, "the file holds no PEM private key");
    let private_key: PrivateKey<'static> = PrivateKey::from_pem(&pem).map_err(|_| no_key())?;
    check_key_pair(&chain, &pem).map_err(|problem| {
        Error::Invalid(format!(
            "client certificate {} and key {key_name}: {problem}",
            cert.display()
        ))
    })?;
    Ok(ClientCert::new_with_certs(&chain, private_key))
}

/// Whether rustls accepts the first private key of `key_pem` for the first
/// certificate of `chain`, as it will when a TLS connection is made.
fn check_key_pair(
    chain: &[Certificate<'static>],
    key_pem: &[u8],
) -> std::result::Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("the key cannot be read ({e:?})"))?;
    let chain: Vec<CertificateDer<'static>> = chain
        .iter()
        .map(|c| CertificateDer::from(c.der().to_vec()))
        .collect();
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain, key, &provider)
        .map(|_| ())
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                "the key does not belong to the certificate".to_string()
            }
            e => format!("the key cannot be used ({e})"),
        })
}

/// The TLS settings for registry requests: trusted roots ([`root_certs`]
/// with `certConfig`'s CAs) and `certConfig`'s client certificate.
pub fn registry_tls(config: &CertConfig) -> Result<TlsConfig> {
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
    Ok(TlsConfig::builder()
        .root_certs(root_certs(&extra_cas(config)?))
        .client_cert(client_cert)
        .build())
}

/// The default TLS settings: [`root_certs`], no client certificate.
pub fn default_tls() -> TlsConfig {
    TlsConfig::builder().root_certs(root_certs(&[])).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_roots_are_certificates() {
        let RootCerts::Specific(certs) = root_certs(&[]) else {
            panic!("expected specific roots");
        };
        assert!(certs.len() >= webpki_root_certs::TLS_SERVER_ROOT_CERTS.len());
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
