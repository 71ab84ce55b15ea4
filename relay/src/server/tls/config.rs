//! What the certificate comes from: [`TlsConfig`], [`AcmeConfig`] and their checks. Depends on
//! nothing else in `tls`.

use std::path::{Path, PathBuf};

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
    Acme(AcmeConfig),
}

/// Where [`TlsConfig::SelfSigned`] keeps its certificate in `dir` (the key is beside it).
pub fn self_signed_cert_path(dir: &Path) -> PathBuf {
    dir.join("self-signed-cert.pem")
}

/// Where [`TlsConfig::SelfSigned`] keeps the certificate's private key in `dir`.
pub(crate) fn self_signed_key_path(dir: &Path) -> PathBuf {
    dir.join("self-signed-key.pem")
}

/// Let's Encrypt's production directory, the default.
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// ACME settings.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The DNS name to get a certificate for (an IP address cannot pass HTTP-01 here).
    pub hostname: String,
    /// Contact address given to the CA (expiry warnings), e.g. `ops@example.com`.
    pub email: Option<String>,
    /// The CA's directory URL.
    pub directory: String,
    /// Extra trust anchor (PEM) for the CA's own HTTPS endpoint: for a private CA or a test
    /// server such as pebble. Public CAs need none (webpki roots are built in).
    pub ca_file: Option<PathBuf>,
    /// Where the account and the issued certificate are cached. Must persist across restarts:
    /// CAs rate-limit issuance (Let's Encrypt: 5 identical certificates a week).
    pub dir: PathBuf,
}

impl AcmeConfig {
    pub(crate) fn cert_path(&self) -> PathBuf {
        self.dir.join(format!("acme-{}-cert.pem", self.hostname))
    }
    pub(crate) fn key_path(&self) -> PathBuf {
        self.dir.join(format!("acme-{}-key.pem", self.hostname))
    }
    pub(crate) fn account_path(&self) -> PathBuf {
        self.dir.join("acme-account.json")
    }

    /// Checks what can be checked before start: a DNS name, an https directory URL.
    pub fn validate(&self) -> Result<(), AcmeConfigError> {
        if let Ok(ip) = self.hostname.parse::<std::net::IpAddr>() {
            return Err(AcmeConfigError::IpHostname(ip));
        }
        if self.hostname.is_empty() || self.hostname.contains(['/', ':', ' ']) {
            return Err(AcmeConfigError::NotDnsName(self.hostname.clone()));
        }
        if !self.directory.starts_with("https://") {
            return Err(AcmeConfigError::DirectoryNotHttps(self.directory.clone()));
        }
        Ok(())
    }
}

/// ACME settings that cannot get a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AcmeConfigError {
    /// HTTP-01 validates DNS names; CAs do not issue for IP addresses this way.
    #[error("the hostname is the IP address {0}, and ACME (HTTP-01) needs a DNS name")]
    IpHostname(std::net::IpAddr),
    /// Empty, or with a scheme, port or path.
    #[error("the hostname {0:?} is not a plain DNS name")]
    NotDnsName(String),
    /// The directory URL is not https.
    #[error(
        "the directory {0:?} is not an https:// URL (Let's Encrypt: {LETS_ENCRYPT_DIRECTORY})"
    )]
    DirectoryNotHttps(String),
}

impl AcmeConfigError {
    /// The field at fault: `tls.acme.hostname` or `tls.acme.directory`.
    pub fn field(&self) -> &'static str {
        match self {
            AcmeConfigError::IpHostname(_) | AcmeConfigError::NotDnsName(_) => "tls.acme.hostname",
            AcmeConfigError::DirectoryNotHttps(_) => "tls.acme.directory",
        }
    }
}
