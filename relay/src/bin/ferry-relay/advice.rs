//! Operator advice for the library's errors. The library says what went wrong (the file, the
//! address, the OS error); the binary, which knows its flags and its users, adds what to do
//! about it, as [`resolve`](crate::resolve) does for a refused config.
//!
//! The advice wraps the error as [`Advised`] and is printed after the error and its causes
//! (`crate::chain`): "cannot read /etc/ferry/cert.pem: No such file or directory (os error 2);
//! check the path and that the relay's user may read it".

use std::io;
use std::net::SocketAddr;

use ferry_relay::server::keyfile::KeyFileError;
use ferry_relay::server::{AdmissionError, TlsError};
use ferry_relay::SpawnError;
use ferry_stun::StunError;

use ferry_proto::Advised;

/// `e`, with `advice` when there is any.
fn with<E>(e: E, advice: Option<String>) -> anyhow::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    match advice {
        Some(advice) => Advised {
            advice,
            error: Box::new(e),
        }
        .into(),
        None => e.into(),
    }
}

/// [`ferry_relay::Server::spawn`] failed.
pub(crate) fn spawn(e: SpawnError) -> anyhow::Error {
    let advice = match &e {
        SpawnError::Bind { addr, source, .. } => Some(bind(*addr, source)),
        SpawnError::Tls(t) | SpawnError::MeshCaFile(t) => tls_advice(t),
        SpawnError::Admission(a) => admission_advice(a),
        SpawnError::Stun(StunError::Bind { addr, source, .. }) => Some(bind(*addr, source)),
        SpawnError::Stun(_) => None,
        // `Resolved::check` has explained it already, naming the flag or file key.
        SpawnError::Invalid(_) => None,
    };
    with(e, advice)
}

/// The server key file could not be used.
pub(crate) fn key_file(e: KeyFileError) -> anyhow::Error {
    let advice = match &e {
        KeyFileError::Read { .. } => None,
        KeyFileError::Create { .. } => Some("create its directory, or point --key-file elsewhere"),
        KeyFileError::Invalid { .. } => Some(
            "restore it from backup, or delete it to create a new key (clients will see a new \
             server key)",
        ),
    };
    with(e, advice.map(String::from))
}

/// The certificate could not be (re)loaded.
pub(crate) fn tls(e: TlsError) -> anyhow::Error {
    let advice = tls_advice(&e);
    with(e, advice)
}

fn tls_advice(e: &TlsError) -> Option<String> {
    match e {
        TlsError::Read { .. } => Some(MAY_READ.into()),
        TlsError::Write { .. } => {
            Some("the directory must exist and be writable by the relay's user".into())
        }
        _ => None,
    }
}

fn admission_advice(e: &AdmissionError) -> Option<String> {
    match e {
        AdmissionError::Read { .. } => Some(MAY_READ.into()),
        AdmissionError::Parse { .. } => Some(
            "write one key per line, in the form `tailscale status --json` shows as PublicKey"
                .into(),
        ),
        AdmissionError::Tls(t) => tls_advice(t),
        // `Resolved::check` refuses a bad verify URL first, naming the flag or file key.
        AdmissionError::Url { .. } => None,
    }
}

const MAY_READ: &str = "check the path and that the relay's user may read it";

/// A listener (DERP, port 80, metrics or STUN) could not bind `addr`.
fn bind(addr: SocketAddr, e: &io::Error) -> String {
    let mut advice =
        String::from("is another process using it? Pick another address or stop that process");
    if e.kind() == io::ErrorKind::PermissionDenied && addr.port() < 1024 {
        advice.push_str(" (ports below 1024 need root or CAP_NET_BIND_SERVICE)");
    }
    advice
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_follows_the_error_and_its_causes() {
        let e = tls(TlsError::Read {
            path: "/nonexistent/cert.pem".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        });
        let text = crate::chain(&e);
        assert!(
            text.starts_with("cannot read /nonexistent/cert.pem: ")
                && text.ends_with("; check the path and that the relay's user may read it"),
            "{text}"
        );
        // Without advice, the chain is as before.
        let e = tls(TlsError::NoCert {
            path: "c.pem".into(),
        });
        assert!(!crate::chain(&e).contains(';'), "{}", crate::chain(&e));
    }

    #[test]
    fn low_ports_get_the_capability_hint() {
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(bind("0.0.0.0:443".parse().unwrap(), &denied).contains("CAP_NET_BIND_SERVICE"));
        assert!(!bind("0.0.0.0:8443".parse().unwrap(), &denied).contains("CAP_NET_BIND_SERVICE"));
    }
}
