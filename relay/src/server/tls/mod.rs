//! TLS for the DERP listener: rustls on the ring provider, with a certificate that can be
//! swapped at run time (SIGHUP reloads manual files without touching established connections).
//!
//! Dependencies run one way: `config` and `error` depend on nothing here; `files`, `client` and
//! `reload` on those two; `acme` on all of them; this module ties them together ([`load`]).

pub(crate) mod acme;
mod client;
mod config;
mod error;
mod files;
pub(crate) mod records;
#[cfg(feature = "testing")]
pub use self::records::ClientSealer;
mod reload;

use rustls::sign::CertifiedKey;

pub(crate) use self::client::client_config;
pub use self::config::{
    self_signed_cert_path, AcmeConfig, AcmeConfigError, TlsConfig, LETS_ENCRYPT_DIRECTORY,
};
pub use self::error::TlsError;
pub(crate) use self::files::write_secret;
pub(crate) use self::reload::{watch_manual, ReloadableCert};

/// The `CertName` value that pins a self-signed leaf in a DERP map: `sha256-raw:<hex>`.
pub fn cert_name_pin(leaf_der: &[u8]) -> String {
    ferry_proto::pin::CertPin::from_der(leaf_der).to_string()
}

/// Loads the certificate `source` describes (creating a self-signed one if there is none yet);
/// in ACME mode the cached one, if any.
pub(crate) fn load(source: TlsConfig) -> Result<ReloadableCert, TlsError> {
    ReloadableCert::new(source, load_current)
}

/// The certificate `source` gives now; `None` only in ACME mode before the first issuance.
fn load_current(source: &TlsConfig) -> Result<Option<CertifiedKey>, TlsError> {
    match source {
        TlsConfig::Manual {
            cert_path,
            key_path,
        } => files::load_pair(cert_path, key_path).map(Some),
        TlsConfig::SelfSigned { names, dir } => files::load_self_signed(names, dir).map(Some),
        TlsConfig::Acme(acme) => acme::load_cached(acme),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn self_signed_cert_is_kept_across_loads_and_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TlsConfig::SelfSigned {
            names: vec!["127.0.0.1".into(), "relay.test".into()],
            dir: dir.path().into(),
        };
        let a = load(cfg.clone()).unwrap();
        let b = load(cfg).unwrap();
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
        let r = load(TlsConfig::Manual {
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
