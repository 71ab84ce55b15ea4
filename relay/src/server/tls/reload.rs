//! The certificate in service, swapped at run time (SIGHUP, changed files, ACME renewals)
//! without touching established connections.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::{TlsConfig, TlsError};

/// Reads the certificate a [`TlsConfig`] gives now (`None`: none yet, keep the current one).
pub(crate) type Loader = fn(&TlsConfig) -> Result<Option<CertifiedKey>, TlsError>;

/// A certificate resolver whose certificate can be replaced while the server runs.
#[derive(Debug)]
pub(crate) struct ReloadableCert {
    /// `None` only in ACME mode, until the first certificate is issued: TLS handshakes fail
    /// (and are counted) until then.
    current: RwLock<Option<Arc<CertifiedKey>>>,
    source: TlsConfig,
    loader: Loader,
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().expect("cert lock poisoned").clone()
    }
}

impl ReloadableCert {
    /// Loads the first certificate with `loader`, which [`ReloadableCert::reload`] calls again.
    pub(crate) fn new(source: TlsConfig, loader: Loader) -> Result<Self, TlsError> {
        let ck = loader(&source)?;
        Ok(ReloadableCert {
            current: RwLock::new(ck.map(Arc::new)),
            source,
            loader,
        })
    }

    /// Reads the files again; on error the old certificate stays in use. In ACME mode this
    /// re-reads the cached certificate (the renewal task keeps it fresh by itself).
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        if let Some(ck) = (self.loader)(&self.source)? {
            self.set(ck);
        }
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
    let initial = crate::server::watch::Fingerprint::of(&paths);
    crate::server::watch::poll_files(paths, initial, interval, cancel, move || {
        match cert.reload() {
            Ok(()) => tracing::info!("certificate files changed: certificate reloaded"),
            Err(e) => tracing::error!(error = %crate::error_chain(&e), "certificate files changed but cannot be used; still serving the previous certificate"),
        }
    })
    .await;
}
