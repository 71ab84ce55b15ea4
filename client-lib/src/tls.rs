//! TLS to relays: webpki (Mozilla) roots, optional private CA certificates, and the DERP map's
//! `CertName` (another name to verify, or a `sha256-raw:` pin of a self-signed leaf, as
//! Tailscale's `tlsdial` does). rustls with the ring provider, named explicitly.

use std::path::Path;
use std::sync::Arc;

use ferry_proto::pin::tls::PinVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::relaymap::{CertName, Node};

/// Which certificates to trust for relays without a pin.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// Trust the webpki (Mozilla) root set (public CAs such as Let's Encrypt).
    pub webpki_roots: bool,
    /// Extra trust anchors: a private CA, or a relay's self-signed certificate.
    pub extra_roots: Vec<CertificateDer<'static>>,
}

impl Default for TlsOptions {
    fn default() -> Self {
        TlsOptions {
            webpki_roots: true,
            extra_roots: Vec::new(),
        }
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The CA file is unreadable or holds no certificate.
    #[error("CA file {path}: {why}")]
    CaFile {
        /// The file.
        path: String,
        /// What was wrong.
        why: String,
    },
    /// Nothing to verify against.
    #[error("no trust anchors: enable webpki roots, add a CA file, or pin the certificate with CertName")]
    NoRoots,
    /// The host name cannot be used in TLS.
    #[error("{0:?} cannot be used as a TLS server name")]
    BadName(String),
}

impl TlsOptions {
    /// Adds every certificate of a PEM file as a trust anchor.
    pub fn add_ca_file(&mut self, path: &Path) -> Result<(), TlsSetupError> {
        let err = |why: String| TlsSetupError::CaFile {
            path: path.display().to_string(),
            why,
        };
        let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let mut n = 0;
        for c in rustls_pemfile::certs(&mut &pem[..]) {
            self.extra_roots.push(c.map_err(|e| err(e.to_string()))?);
            n += 1;
        }
        if n == 0 {
            return Err(err("holds no PEM certificate".into()));
        }
        Ok(())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A connector and the server name (SNI) for one node.
pub(crate) fn connector(
    opts: &TlsOptions,
    node: &Node,
) -> Result<(tokio_rustls::TlsConnector, ServerName<'static>), TlsSetupError> {
    let sni = ServerName::try_from(node.host_name.clone())
        .map_err(|_| TlsSetupError::BadName(node.host_name.clone()))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let cfg = match &node.cert_name {
        Some(CertName::Pin(pin)) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier::new(
                *pin,
                provider(),
                "the relay map's CertName",
                " (update CertName to the pin the relay logs, or check you reach the right relay)",
            )))
            .with_no_client_auth(),
        other => {
            let mut roots = rustls::RootCertStore::empty();
            if opts.webpki_roots {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
            for c in &opts.extra_roots {
                // A bad extra root only means it cannot anchor anything.
                let _ = roots.add(c.clone());
            }
            if roots.is_empty() {
                return Err(TlsSetupError::NoRoots);
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|_| TlsSetupError::NoRoots)?;
            let verify_name = match other {
                Some(CertName::Name(n)) => Some(
                    ServerName::try_from(n.clone())
                        .map_err(|_| TlsSetupError::BadName(n.clone()))?,
                ),
                _ => None,
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NamedVerifier {
                    inner: webpki,
                    name: verify_name,
                }))
                .with_no_client_auth()
        }
    };
    Ok((tokio_rustls::TlsConnector::from(Arc::new(cfg)), sni))
}

/// webpki verification, optionally against `CertName` instead of the SNI host name.
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: Option<ServerName<'static>>,
}

impl ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = self.name.as_ref().unwrap_or(server_name);
        self.inner
            .verify_server_cert(end_entity, intermediates, name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
