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
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = preferred_suites(provider.cipher_suites, has_aes_instructions());
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        // DERP is HTTP/1.1 only (the upgrade); advertise it for clients that offer ALPN.
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Our order of suites, not the client's (see `preferred_suites`).
        cfg.ignore_client_order = true;
        // The relay's own record layer (`records`) takes the secrets after the handshake.
        cfg.enable_secret_extraction = true;
        Arc::new(cfg)
    }
}

/// The cipher suites in the order the relay prefers them (issue 17). A relay decrypts and
/// encrypts every byte it forwards, so the AEAD is most of its TLS cost. With AES instructions
/// (x86 AES-NI and PCLMULQDQ, ARMv8 AES) AES-128-GCM comes first: it does 10 AES rounds to
/// AES-256's 14, the same GHASH, and at least 128-bit security; without them ChaCha20-Poly1305
/// comes first (AES in software is slow). AES-256-GCM follows. rustls clients (ferry's own)
/// offer AES-256-GCM first and would get it if the client's order ruled; Go clients (Tailscale)
/// offer AES-128-GCM first on CPUs with AES instructions, ChaCha20 first elsewhere, so for them
/// this changes nothing. Every suite stays available; TLS 1.2 suites keep ring's order, after
/// the TLS 1.3 ones (they apply only to TLS 1.2 clients anyway).
pub(crate) fn preferred_suites(
    mut suites: Vec<rustls::SupportedCipherSuite>,
    aes: bool,
) -> Vec<rustls::SupportedCipherSuite> {
    use rustls::CipherSuite as C;
    suites.sort_by_key(|s| match s.suite() {
        C::TLS13_AES_128_GCM_SHA256 if aes => 0,
        C::TLS13_CHACHA20_POLY1305_SHA256 if !aes => 0,
        C::TLS13_AES_128_GCM_SHA256 | C::TLS13_CHACHA20_POLY1305_SHA256 => 1,
        C::TLS13_AES_256_GCM_SHA384 => 2,
        _ => 3,
    });
    suites
}

/// Whether this CPU has the instructions that make AES-GCM fast.
pub(crate) fn has_aes_instructions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
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

#[cfg(test)]
mod suite_tests {
    use super::*;
    use rustls::CipherSuite as C;

    fn tls13(aes: bool) -> Vec<C> {
        preferred_suites(rustls::crypto::ring::default_provider().cipher_suites, aes)
            .iter()
            .map(|s| s.suite())
            .filter(|s| format!("{s:?}").starts_with("TLS13"))
            .collect()
    }

    #[test]
    fn aes_128_first_with_aes_instructions_chacha_first_without_and_nothing_dropped() {
        assert_eq!(
            tls13(true),
            [
                C::TLS13_AES_128_GCM_SHA256,
                C::TLS13_CHACHA20_POLY1305_SHA256,
                C::TLS13_AES_256_GCM_SHA384
            ]
        );
        assert_eq!(
            tls13(false),
            [
                C::TLS13_CHACHA20_POLY1305_SHA256,
                C::TLS13_AES_128_GCM_SHA256,
                C::TLS13_AES_256_GCM_SHA384
            ]
        );
        let all = rustls::crypto::ring::default_provider().cipher_suites.len();
        assert_eq!(
            preferred_suites(rustls::crypto::ring::default_provider().cipher_suites, true).len(),
            all
        );
    }
}
