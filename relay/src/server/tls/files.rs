//! Certificate files: reading PEM pairs, the self-signed pair, and writing secrets (mode 0600).

use std::fs;
use std::path::{Path, PathBuf};

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::config::{self_signed_cert_path, self_signed_key_path};
use super::TlsError;

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
    let signing = any_supported_type(&key).map_err(|source| TlsError::UnsupportedKey {
        path: key_path.into(),
        source,
    })?;
    let ck = CertifiedKey::new(certs, signing);
    // A pair caught half-replaced (new certificate, old key) must not go into service.
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(_) => Err(TlsError::KeyMismatch {
            key_path: key_path.into(),
            cert_path: cert_path.into(),
        }),
    }
}

/// Manual mode: the PEM pair an operator maintains.
pub(crate) fn load_pair(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    parse_pem(&read(cert_path)?, cert_path, &read(key_path)?, key_path)
}

/// Self-signed mode: the pair kept in `dir`, created for `names` if it is not there yet.
pub(crate) fn load_self_signed(names: &[String], dir: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_path = self_signed_cert_path(dir);
    let key_path = self_signed_key_path(dir);
    if !cert_path.exists() || !key_path.exists() {
        let (cert_pem, key_pem) = generate_self_signed(names)?;
        write_private(&key_path, key_pem.as_bytes())?;
        fs::write(&cert_path, cert_pem).map_err(|source| TlsError::Write {
            path: cert_path.clone(),
            source,
        })?;
    }
    load_pair(&cert_path, &key_path)
}

/// A self-signed ECDSA P-256 certificate for `names` (DNS names or IPs), valid for 10 years.
///
/// Its key usage includes certificate signing, so clients may also trust it as its own root
/// (Go's verifier refuses a self-signed root without it; derpprobe's TLS probe needs that).
fn generate_self_signed(names: &[String]) -> Result<(String, String), TlsError> {
    let err = |source: rcgen::Error| TlsError::SelfSigned {
        names: names.to_vec(),
        source,
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
    write_secret(path, contents).map_err(|source| TlsError::Write {
        path: path.into(),
        source,
    })
}

/// [`write_private`] with the plain I/O error (for the server key file's own error type).
pub(crate) fn write_secret(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_private_opts(path, contents, false)
}

/// Replaces a secret file atomically: writes `<path>.tmp` (mode 0600), then renames it over
/// `path`, so a crash never leaves a half-written key or certificate behind.
pub(crate) fn replace_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write_private_opts(&tmp, contents, true).map_err(|source| TlsError::Write {
        path: tmp.clone(),
        source,
    })?;
    fs::rename(&tmp, path).map_err(|source| TlsError::Write {
        path: path.into(),
        source,
    })
}

fn write_private_opts(path: &Path, contents: &[u8], truncate: bool) -> std::io::Result<()> {
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
    let mut f = opts.open(path)?;
    f.write_all(contents).and_then(|_| f.sync_all())
}
