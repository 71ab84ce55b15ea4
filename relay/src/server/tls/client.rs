//! The rustls client config for the relay's own outgoing connections.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;

use super::files::read;
use super::TlsError;

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
