//! Certificates from an ACME CA (RFC 8555; Let's Encrypt by default) through the HTTP-01
//! challenge, which the port-80 listener answers.
//!
//! The protocol client is `instant-acme`; its HTTP client is built here from rustls on the ring
//! provider (this process installs no default crypto provider). The account key, the issued
//! chain and its private key are cached in the configured directory (mode 0600), so a restart
//! serves the cached certificate at once and asks the CA only when renewal is due: when a third
//! of the certificate's lifetime is left (30 days for Let's Encrypt's 90-day certificates).

use std::collections::HashMap;
use std::fs;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, ChallengeType, Identifier,
    NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::files::{parse_pem, read, replace_private};
use super::{AcmeConfig, ReloadableCert, TlsError};

/// Path prefix of HTTP-01 challenge requests.
pub(crate) const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// HTTP-01 tokens being validated right now: token → key authorization. The port-80 listener
/// answers `GET /.well-known/acme-challenge/<token>` from here.
#[derive(Debug, Default)]
pub(crate) struct Challenges(parking_lot::Mutex<HashMap<String, String>>);

impl Challenges {
    pub(crate) fn get(&self, token: &str) -> Option<String> {
        self.0.lock().get(token).cloned()
    }
}

/// Removes the tokens it added when dropped, whatever way the order ends.
struct TokenGuard<'a> {
    challenges: &'a Challenges,
    tokens: Vec<String>,
}

impl TokenGuard<'_> {
    fn add(&mut self, token: String, key_authorization: String) {
        self.challenges
            .0
            .lock()
            .insert(token.clone(), key_authorization);
        self.tokens.push(token);
    }
}

impl Drop for TokenGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.challenges.0.lock();
        for t in &self.tokens {
            map.remove(t);
        }
    }
}

/// The cached certificate, if there is one.
pub(crate) fn load_cached(cfg: &AcmeConfig) -> Result<Option<CertifiedKey>, TlsError> {
    let (cert_path, key_path) = (cfg.cert_path(), cfg.key_path());
    if !cert_path.exists() || !key_path.exists() {
        return Ok(None);
    }
    // A pair that does not belong together (a crash between the two renames) or a key that is
    // unusable: ask the CA again rather than refuse to start.
    match parse_pem(&read(&cert_path)?, &cert_path, &read(&key_path)?, &key_path) {
        Ok(ck) => Ok(Some(ck)),
        Err(e @ (TlsError::UnsupportedKey { .. } | TlsError::KeyMismatch { .. })) => {
            let e = crate::error_chain(&e);
            warn!("cached ACME certificate unusable ({e}); requesting a new one");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The validity window of a certificate.
pub(crate) fn validity(der: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let v = cert.validity();
    let at = |t: i64| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).ok()?));
    Some((at(v.not_before.timestamp())?, at(v.not_after.timestamp())?))
}

/// How long until the certificate should be renewed (zero: now).
fn renewal_due_in(leaf: Option<&[u8]>, now: SystemTime) -> Duration {
    let Some((not_before, not_after)) = leaf.and_then(validity) else {
        return Duration::ZERO;
    };
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let renew_at = not_after - lifetime / 3;
    renew_at.duration_since(now).unwrap_or(Duration::ZERO)
}

/// Keeps a certificate in `cert`: obtains one when there is none, renews it when due, retries
/// failures with backoff (30 s doubling to 1 h), and stops when `cancel` fires.
pub(crate) async fn run(
    cfg: AcmeConfig,
    cert: Arc<ReloadableCert>,
    challenges: Arc<Challenges>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_secs(30);
    loop {
        let due = renewal_due_in(cert.leaf_der().as_deref(), SystemTime::now());
        if !due.is_zero() {
            // Wake at least twice a day: the clock may jump, and a sleeping task costs nothing.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(due.min(Duration::from_secs(12 * 3600))) => continue,
            }
        }
        info!(hostname = %cfg.hostname, directory = %cfg.directory, "requesting an ACME certificate");
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return,
            r = obtain(&cfg, &challenges) => r,
        };
        match attempt {
            Ok(ck) => {
                let until = validity(ck.cert[0].as_ref())
                    .map(|(_, na)| humantime::format_rfc3339_seconds(na).to_string())
                    .unwrap_or_default();
                cert.set(ck);
                backoff = Duration::from_secs(30);
                info!(hostname = %cfg.hostname, valid_until = %until, "ACME certificate installed");
            }
            Err(e) => {
                warn!(
                    hostname = %cfg.hostname,
                    retry_in = %humantime::format_duration(backoff),
                    "ACME certificate request failed: {}",
                    crate::error_chain(&e)
                );
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(3600));
            }
        }
    }
}

/// Why getting a certificate from the CA failed (logged; the relay retries with backoff).
#[derive(Debug, thiserror::Error)]
pub(crate) enum AcmeError {
    /// A step of the protocol failed: `what` says which.
    #[error("{what}")]
    Protocol {
        what: String,
        #[source]
        source: instant_acme::Error,
    },
    #[error("authorization for {hostname} is {status:?}")]
    Authorization {
        hostname: String,
        status: AuthorizationStatus,
    },
    #[error("the CA offers no http-01 challenge for this name")]
    NoHttp01,
    /// The CA's own problem reports (data, not errors of this process) are kept as text.
    #[error("the order is {status:?}{}{}. The CA must reach http://{hostname}{CHALLENGE_PREFIX}… on port 80: the name must resolve to this relay, and port 80 lead to its http_listen", if .problems.is_empty() { "" } else { ": " }, .problems.join("; "))]
    OrderNotReady {
        status: OrderStatus,
        problems: Vec<String>,
        hostname: String,
    },
    #[error("generating the certificate's key")]
    Key(#[source] rcgen::Error),
    #[error("building the CSR")]
    Csr(#[source] rcgen::Error),
    #[error(transparent)]
    Files(#[from] TlsError),
}

fn acme_err(what: &str) -> impl Fn(instant_acme::Error) -> AcmeError + '_ {
    move |source| AcmeError::Protocol {
        what: what.into(),
        source,
    }
}

/// An HTTPS client for the CA on rustls + ring, trusting webpki roots plus `ca_file`.
fn http_client(cfg: &AcmeConfig) -> Result<Box<dyn instant_acme::HttpClient>, TlsError> {
    let tls = super::client_config(cfg.ca_file.as_deref())?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    let client: HyperClient<_, BodyWrapper<Bytes>> =
        HyperClient::builder(TokioExecutor::new()).build(https);
    Ok(Box::new(client))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// The account for this directory: restored from the cache, or registered and cached.
async fn account(cfg: &AcmeConfig) -> Result<Account, AcmeError> {
    let path = cfg.account_path();
    if let Ok(text) = fs::read(&path) {
        match serde_json::from_slice::<StoredAccount>(&text) {
            Ok(stored) if stored.directory == cfg.directory => {
                return Account::builder_with_http(http_client(cfg)?)
                    .from_credentials(stored.credentials)
                    .await
                    .map_err(acme_err("restoring the cached ACME account"));
            }
            Ok(_) => {
                info!(path = %path.display(), "cached ACME account is for another directory; registering a new one")
            }
            Err(e) => warn!(path = %path.display(), "ignoring unreadable ACME account cache: {e}"),
        }
    }
    let contact = cfg.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, credentials) = Account::builder_with_http(http_client(cfg)?)
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            cfg.directory.clone(),
            None,
        )
        .await
        .map_err(acme_err(&format!(
            "registering an account at {}",
            cfg.directory
        )))?;
    let stored = StoredAccount {
        directory: cfg.directory.clone(),
        credentials,
    };
    let json = serde_json::to_vec_pretty(&stored).expect("account credentials serialize");
    replace_private(&path, &json)?;
    Ok(account)
}

/// One full order: HTTP-01 for the hostname, a fresh P-256 key, the chain; cached on success.
async fn obtain(cfg: &AcmeConfig, challenges: &Challenges) -> Result<CertifiedKey, AcmeError> {
    let account = account(cfg).await?;
    let ids = [Identifier::Dns(cfg.hostname.clone())];
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(acme_err("creating the order"))?;
    let mut guard = TokenGuard {
        challenges,
        tokens: Vec::new(),
    };
    {
        let mut authzs = order.authorizations();
        while let Some(authz) = authzs.next().await {
            let mut authz = authz.map_err(acme_err("fetching the authorization"))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                status => {
                    return Err(AcmeError::Authorization {
                        hostname: cfg.hostname.clone(),
                        status,
                    })
                }
            }
            let mut ch = authz
                .challenge(ChallengeType::Http01)
                .ok_or(AcmeError::NoHttp01)?;
            guard.add(
                ch.token.clone(),
                ch.key_authorization().as_str().to_string(),
            );
            ch.set_ready()
                .await
                .map_err(acme_err("telling the CA the challenge is ready"))?;
        }
    }
    let retry = RetryPolicy::new().timeout(Duration::from_secs(120));
    let status = order
        .poll_ready(&retry)
        .await
        .map_err(acme_err("waiting for validation"))?;
    if status != OrderStatus::Ready {
        let mut why = Vec::new();
        let mut authzs = order.authorizations();
        while let Some(Ok(authz)) = authzs.next().await {
            for ch in &authz.challenges {
                if let Some(p) = &ch.error {
                    why.push(p.to_string());
                }
            }
        }
        return Err(AcmeError::OrderNotReady {
            status,
            problems: why,
            hostname: cfg.hostname.clone(),
        });
    }
    drop(guard);
    let key = rcgen::KeyPair::generate().map_err(AcmeError::Key)?;
    let csr = rcgen::CertificateParams::new(vec![cfg.hostname.clone()])
        .and_then(|p| p.serialize_request(&key))
        .map_err(AcmeError::Csr)?;
    order
        .finalize_csr(csr.der())
        .await
        .map_err(acme_err("finalizing the order"))?;
    let chain = order
        .poll_certificate(&retry)
        .await
        .map_err(acme_err("downloading the certificate"))?;
    let key_pem = key.serialize_pem();
    let ck = parse_pem(
        chain.as_bytes(),
        &cfg.cert_path(),
        key_pem.as_bytes(),
        &cfg.key_path(),
    )?;
    // Each file is replaced atomically. A crash between the two leaves a key that does not
    // match the chain: `load_cached` then ignores the pair and a new certificate is requested.
    replace_private(&cfg.key_path(), key_pem.as_bytes())?;
    replace_private(&cfg.cert_path(), chain.as_bytes())?;
    Ok(ck)
}

#[cfg(test)]
mod tests {
    use super::super::{AcmeConfigError, LETS_ENCRYPT_DIRECTORY};
    use super::*;

    #[test]
    fn renewal_is_due_with_a_third_of_the_lifetime_left() {
        let mut p = rcgen::CertificateParams::new(vec!["a.test".into()]).unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        p.not_before = t0.into();
        p.not_after = (t0 + Duration::from_secs(90 * 86400)).into();
        let key = rcgen::KeyPair::generate().unwrap();
        let der = p.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(
            validity(&der),
            Some((t0, t0 + Duration::from_secs(90 * 86400)))
        );
        let day = |d: u64| t0 + Duration::from_secs(d * 86400);
        assert_eq!(
            renewal_due_in(Some(&der), day(0)),
            Duration::from_secs(60 * 86400)
        );
        assert_eq!(
            renewal_due_in(Some(&der), day(59)),
            Duration::from_secs(86400)
        );
        assert_eq!(renewal_due_in(Some(&der), day(61)), Duration::ZERO);
        assert_eq!(renewal_due_in(None, day(0)), Duration::ZERO);
        assert_eq!(renewal_due_in(Some(b"junk"), day(0)), Duration::ZERO);
    }

    #[test]
    fn a_cached_pair_that_does_not_match_is_requested_again_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AcmeConfig {
            hostname: "a.test".into(),
            email: None,
            directory: LETS_ENCRYPT_DIRECTORY.into(),
            ca_file: None,
            dir: dir.path().into(),
        };
        let one = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let two = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        fs::write(cfg.cert_path(), one.cert.pem()).unwrap();
        fs::write(cfg.key_path(), one.key_pair.serialize_pem()).unwrap();
        assert!(
            load_cached(&cfg).unwrap().is_some(),
            "a matching pair is served"
        );
        fs::write(cfg.key_path(), two.key_pair.serialize_pem()).unwrap();
        assert!(
            load_cached(&cfg).unwrap().is_none(),
            "a mismatched pair is re-requested"
        );
    }

    #[test]
    fn config_errors_say_what_to_do() {
        let cfg = |h: &str, d: &str| AcmeConfig {
            hostname: h.into(),
            email: None,
            directory: d.into(),
            ca_file: None,
            dir: "/tmp".into(),
        };
        assert!(cfg("relay.example.com", LETS_ENCRYPT_DIRECTORY)
            .validate()
            .is_ok());
        let e = cfg("192.0.2.1", LETS_ENCRYPT_DIRECTORY)
            .validate()
            .unwrap_err();
        assert_eq!(e, AcmeConfigError::IpHostname("192.0.2.1".parse().unwrap()));
        assert!(e.to_string().contains("DNS name"), "{e}");
        let e = cfg("relay.example.com", "http://ca.test/dir")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("https://"), "{e}");
        assert_eq!(e.field(), "tls.acme.directory");
        assert!(cfg("https://relay.example.com", LETS_ENCRYPT_DIRECTORY)
            .validate()
            .is_err());
    }
}
