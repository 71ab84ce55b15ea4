//! TLS for the DERP listener: rustls on the ring provider, with a certificate that can be
//! swapped at run time (SIGHUP reloads manual files without touching established connections).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Where the relay's certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsConfig {
    /// PEM files an operator (or certbot, or cert-manager) maintains. Reloaded on SIGHUP.
    Manual {
        /// Certificate chain, leaf first.
        cert_path: PathBuf,
        /// Private key (PKCS#8, PKCS#1 or SEC1).
        key_path: PathBuf,
    },
    /// A self-signed certificate for these names or IPs, created once and kept in `dir` so its
    /// pin (`CertName` in the DERP map) survives restarts.
    SelfSigned {
        /// DNS names and/or IP addresses the certificate is for.
        names: Vec<String>,
        /// Directory holding `self-signed-cert.pem` and `self-signed-key.pem`.
        dir: PathBuf,
    },
    /// A certificate from an ACME CA (Let's Encrypt by default) over HTTP-01 on the port-80
    /// listener, cached in `dir` and renewed before it expires.
    Acme(super::acme::AcmeConfig),
}

/// Errors setting up TLS. Each says which file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source} (check the path and that the relay's user may read it)")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source} (the directory must exist and be writable by the relay's user)")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCert { path: PathBuf },
    #[error("{path} holds no PEM private key (expected PKCS#8, PKCS#1 or SEC1 PEM)")]
    NoKey { path: PathBuf },
    #[error("the private key in {path} is not usable: {msg}")]
    BadKey { path: PathBuf, msg: String },
    #[error("cannot create a self-signed certificate for {names:?}: {msg}")]
    SelfSigned { names: Vec<String>, msg: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("ACME: {0}")]
    Acme(String),
}

/// Where [`TlsConfig::SelfSigned`] keeps its certificate in `dir` (the key is beside it).
pub fn self_signed_cert_path(dir: &Path) -> PathBuf {
    dir.join("self-signed-cert.pem")
}

/// The `CertName` value that pins a self-signed leaf in a DERP map: `sha256-raw:<hex>`.
pub fn cert_name_pin(leaf_der: &[u8]) -> String {
    ferry_proto::pin::CertPin::from_der(leaf_der).to_string()
}

/// A client-side rustls config on the ring provider that trusts the webpki roots plus the PEM
/// certificates in `ca_file` (a private CA, a region's shared self-signed certificate, pebble):
/// for the relay's own outgoing connections (ACME, mesh peers, the verify URL).
pub(crate) fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = read(path)?;
        let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<_, _>>()
            .map_err(|source| TlsError::Read {
                path: path.into(),
                source,
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCert { path: path.into() });
        }
        for c in certs {
            roots.add(c)?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// A certificate resolver whose certificate can be replaced while the server runs.
#[derive(Debug)]
pub(crate) struct ReloadableCert {
    /// `None` only in ACME mode, until the first certificate is issued: TLS handshakes fail
    /// (and are counted) until then.
    current: RwLock<Option<Arc<CertifiedKey>>>,
    source: TlsConfig,
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().expect("cert lock poisoned").clone()
    }
}

impl ReloadableCert {
    pub(crate) fn load(source: TlsConfig) -> Result<Self, TlsError> {
        let ck = match &source {
            TlsConfig::Acme(acme) => super::acme::load_cached(acme)?,
            _ => Some(load_certified_key(&source)?),
        };
        Ok(ReloadableCert {
            current: RwLock::new(ck.map(Arc::new)),
            source,
        })
    }

    /// Reads the files again; on error the old certificate stays in use. In ACME mode this
    /// re-reads the cached certificate (the renewal task keeps it fresh by itself).
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        let ck = match &self.source {
            TlsConfig::Acme(acme) => match super::acme::load_cached(acme)? {
                Some(ck) => ck,
                None => return Ok(()),
            },
            src => load_certified_key(src)?,
        };
        self.set(ck);
        Ok(())
    }

    /// Puts a new certificate in use for the next handshakes.
    pub(crate) fn set(&self, ck: CertifiedKey) {
        *self.current.write().expect("cert lock poisoned") = Some(Arc::new(ck));
    }

    /// Where the certificate comes from.
    pub(crate) fn source(&self) -> &TlsConfig {
        &self.source
    }

    /// The leaf certificate now in use (DER), if there is one yet.
    pub(crate) fn leaf_der(&self) -> Option<Vec<u8>> {
        self.current
            .read()
            .expect("cert lock poisoned")
            .as_ref()
            .map(|ck| ck.cert[0].as_ref().to_vec())
    }

    pub(crate) fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        // DERP is HTTP/1.1 only (the upgrade); advertise it for clients that offer ALPN.
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

pub(crate) fn parse_pem(
    cert_pem: &[u8],
    cert_path: &Path,
    key_pem: &[u8],
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: cert_path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert {
            path: cert_path.into(),
        });
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|source| TlsError::Read {
            path: key_path.into(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: key_path.into(),
        })?;
    let signing = any_supported_type(&key).map_err(|e| TlsError::BadKey {
        path: key_path.into(),
        msg: e.to_string(),
    })?;
    let ck = CertifiedKey::new(certs, signing);
    // A pair caught half-replaced (new certificate, old key) must not go into service.
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(_) => Err(TlsError::BadKey {
            path: key_path.into(),
            msg: format!(
                "it does not belong to the certificate in {} (if they are being replaced, the next reload picks up the matching pair)",
                cert_path.display()
            ),
        }),
    }
}

/// Manual mode: re-reads the certificate files whenever their contents change (cert-manager
/// and the kubelet update mounted Secrets in place), until `cancel`. A pair that does not parse
/// or does not match keeps the old certificate in service; the next change is tried again.
pub(crate) async fn watch_manual(
    cert: Arc<ReloadableCert>,
    paths: Vec<PathBuf>,
    interval: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    // Taken now, after the load at start: a change in between is at worst one reload late
    // (the SIGHUP path still works).
    let initial = super::watch::Fingerprint::of(&paths);
    super::watch::poll_files(paths, initial, interval, cancel, move || {
        match cert.reload() {
            Ok(()) => tracing::info!("certificate files changed: certificate reloaded"),
            Err(e) => tracing::error!(error = %e, "certificate files changed but cannot be used; still serving the previous certificate"),
        }
    })
    .await;
}

fn load_certified_key(source: &TlsConfig) -> Result<CertifiedKey, TlsError> {
    match source {
        TlsConfig::Manual {
            cert_path,
            key_path,
        } => parse_pem(&read(cert_path)?, cert_path, &read(key_path)?, key_path),
        TlsConfig::SelfSigned { names, dir } => {
            let cert_path = self_signed_cert_path(dir);
            let key_path = dir.join("self-signed-key.pem");
            if !cert_path.exists() || !key_path.exists() {
                let (cert_pem, key_pem) = generate_self_signed(names)?;
                write_private(&key_path, key_pem.as_bytes())?;
                fs::write(&cert_path, cert_pem).map_err(|source| TlsError::Write {
                    path: cert_path.clone(),
                    source,
                })?;
            }
            parse_pem(&read(&cert_path)?, &cert_path, &read(&key_path)?, &key_path)
        }
        TlsConfig::Acme(_) => unreachable!("ACME certificates are loaded by the acme module"),
    }
}

/// A self-signed ECDSA P-256 certificate for `names` (DNS names or IPs), valid for 10 years.
///
/// Its key usage includes certificate signing, so clients may also trust it as its own root
/// (Go's verifier refuses a self-signed root without it; derpprobe's TLS probe needs that).
fn generate_self_signed(names: &[String]) -> Result<(String, String), TlsError> {
    let err = |e: rcgen::Error| TlsError::SelfSigned {
        names: names.to_vec(),
        msg: e.to_string(),
    };
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(err)?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        names
            .first()
            .cloned()
            .unwrap_or_else(|| "ferry-relay".into()),
    );
    params.distinguished_name = dn;
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyCertSign,
    ];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let now = std::time::SystemTime::now();
    params.not_before = (now - std::time::Duration::from_secs(3600)).into();
    params.not_after = (now + std::time::Duration::from_secs(10 * 365 * 86400)).into();
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = params.self_signed(&key).map_err(err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a secret file readable by its owner only (mode 0600 on Unix), without ever exposing
/// it with wider permissions.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    write_private_opts(path, contents, false)
}

/// Replaces a secret file atomically: writes `<path>.tmp` (mode 0600), then renames it over
/// `path`, so a crash never leaves a half-written key or certificate behind.
pub(crate) fn replace_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write_private_opts(&tmp, contents, true)?;
    fs::rename(&tmp, path).map_err(|source| TlsError::Write {
        path: path.into(),
        source,
    })
}

fn write_private_opts(path: &Path, contents: &[u8], truncate: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let mut opts = fs::OpenOptions::new();
    if truncate {
        opts.write(true).create(true).truncate(true);
    } else {
        opts.write(true).create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|source| TlsError::Write {
        path: path.into(),
        source,
    })?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .map_err(|source| TlsError::Write {
            path: path.into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_cert_is_kept_across_loads_and_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TlsConfig::SelfSigned {
            names: vec!["127.0.0.1".into(), "relay.test".into()],
            dir: dir.path().into(),
        };
        let a = ReloadableCert::load(cfg.clone()).unwrap();
        let b = ReloadableCert::load(cfg).unwrap();
        assert_eq!(a.leaf_der(), b.leaf_der(), "same cert after a restart");
        let pin = cert_name_pin(&a.leaf_der().unwrap());
        assert!(
            pin.starts_with("sha256-raw:") && pin.len() == 11 + 64,
            "{pin}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join("self-signed-key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn manual_files_reload_and_bad_files_keep_the_old_cert() {
        let dir = tempfile::tempdir().unwrap();
        let gen = |name: &str| rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let (cp, kp) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let first = gen("one.test");
        fs::write(&cp, first.cert.pem()).unwrap();
        fs::write(&kp, first.key_pair.serialize_pem()).unwrap();
        let r = ReloadableCert::load(TlsConfig::Manual {
            cert_path: cp.clone(),
            key_path: kp.clone(),
        })
        .unwrap();
        let before = r.leaf_der();
        let second = gen("two.test");
        fs::write(&cp, second.cert.pem()).unwrap();
        fs::write(&kp, second.key_pair.serialize_pem()).unwrap();
        r.reload().unwrap();
        assert_ne!(r.leaf_der(), before);
        assert_eq!(r.leaf_der(), Some(second.cert.der().to_vec()));
        fs::write(&kp, "not a key").unwrap();
        let err = r.reload().unwrap_err();
        assert!(err.to_string().contains("k.pem"), "{err}");
        // A new certificate with the old key (a pair caught mid-update) is refused too.
        let third = gen("three.test");
        fs::write(&cp, third.cert.pem()).unwrap();
        fs::write(&kp, second.key_pair.serialize_pem()).unwrap();
        let err = r.reload().unwrap_err().to_string();
        assert!(
            err.contains("does not belong") && err.contains("c.pem"),
            "{err}"
        );
        assert_eq!(
            r.leaf_der(),
            Some(second.cert.der().to_vec()),
            "old cert still served"
        );
    }
}
