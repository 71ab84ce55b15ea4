//! [`TlsError`]: setting up or reloading the DERP listener's certificate.

use std::io;
use std::path::PathBuf;

/// Errors setting up TLS. Each says which file and what went wrong; advice (permissions,
/// directories) is the binary's.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCert { path: PathBuf },
    #[error("{path} holds no PEM private key (expected PKCS#8, PKCS#1 or SEC1 PEM)")]
    NoKey { path: PathBuf },
    #[error("the private key in {path} is not usable")]
    UnsupportedKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the private key in {key_path} does not belong to the certificate in {cert_path} (if they are being replaced, the next reload picks up the matching pair)")]
    KeyMismatch {
        key_path: PathBuf,
        cert_path: PathBuf,
    },
    #[error("cannot create a self-signed certificate for {names:?}")]
    SelfSigned {
        names: Vec<String>,
        #[source]
        source: rcgen::Error,
    },
    #[error("TLS configuration")]
    Rustls(#[from] rustls::Error),
}
