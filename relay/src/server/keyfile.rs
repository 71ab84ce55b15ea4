//! The relay's persistent private key.
//!
//! The file uses derper's format, `{"PrivateKey":"privkey:<hex>"}`, so an operator moving from
//! derper can keep the key (and every client's pinned `Derp-Public-Key`). A bare `privkey:<hex>`
//! line is accepted too. It is created with mode 0600 on first start. An existing file is only
//! read: any mode that lets the relay read it is fine (Kubernetes mounts Secrets read-only, e.g.
//! 0440 owned by another group), and it is never rewritten.

use std::path::{Path, PathBuf};

use crate::proto::SecretKey;

/// Why the key file could not be used. What to do about it is the binary's to say.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read the server key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the server key file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the server key file {path} is not valid (expected {{\"PrivateKey\":\"privkey:<64 hex>\"}})")]
    Invalid {
        path: PathBuf,
        #[source]
        source: InvalidKey,
    },
}

/// What is wrong with the text of a key file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidKey {
    #[error("not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("no \"PrivateKey\" string")]
    NoPrivateKey,
    #[error(transparent)]
    Key(#[from] crate::proto::KeyParseError),
}

/// Loads the key at `path`, creating a new one if the file does not exist.
/// Returns the key and whether it was created now.
pub fn load_or_create(path: &Path) -> Result<(SecretKey, bool), KeyFileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text)
            .map(|k| (k, false))
            .map_err(|source| KeyFileError::Invalid {
                path: path.into(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate();
            let json = serde_json::json!({ "PrivateKey": key.to_privkey_string() }).to_string();
            super::tls::write_secret(path, json.as_bytes()).map_err(|source| {
                KeyFileError::Create {
                    path: path.into(),
                    source,
                }
            })?;
            Ok((key, true))
        }
        Err(source) => Err(KeyFileError::Read {
            path: path.into(),
            source,
        }),
    }
}

fn parse(text: &str) -> Result<SecretKey, InvalidKey> {
    let t = text.trim();
    if t.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(t).map_err(InvalidKey::NotJson)?;
        let s = v
            .get("PrivateKey")
            .and_then(|p| p.as_str())
            .ok_or(InvalidKey::NoPrivateKey)?;
        Ok(s.parse()?)
    } else {
        Ok(t.parse()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused_with_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("relay.key");
        let (a, created) = load_or_create(&p).unwrap();
        assert!(created);
        let (b, created) = load_or_create(&p).unwrap();
        assert!(!created);
        assert_eq!(a.to_bytes(), b.to_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_read_only_0440_file_is_used_as_it_is_and_never_rewritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("relay.key");
        let k = SecretKey::generate();
        let text = format!("{{\"PrivateKey\":\"{}\"}}\n", k.to_privkey_string());
        std::fs::write(&p, &text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o440)).unwrap();
        // The directory is read-only too, as a Secret volume is: nothing may be created there.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
        let before = std::fs::metadata(&p).unwrap();
        let (got, created) = load_or_create(&p).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(!created);
        assert_eq!(got.to_bytes(), k.to_bytes());
        let after = std::fs::metadata(&p).unwrap();
        assert_eq!(after.permissions().mode() & 0o777, 0o440, "mode untouched");
        assert_eq!(
            after.modified().unwrap(),
            before.modified().unwrap(),
            "not rewritten"
        );
        assert_eq!(std::fs::read_to_string(&p).unwrap(), text);
    }

    #[test]
    fn derper_and_bare_formats_parse_and_garbage_is_explained() {
        let k = SecretKey::generate();
        assert_eq!(
            parse(&format!("{{\"PrivateKey\":\"{}\"}}", k.to_privkey_string()))
                .unwrap()
                .to_bytes(),
            k.to_bytes()
        );
        assert_eq!(
            parse(&format!("{}\n", k.to_privkey_string()))
                .unwrap()
                .to_bytes(),
            k.to_bytes()
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.key");
        std::fs::write(&p, "{\"PrivateKey\":\"privkey:12\"}").unwrap();
        let e = load_or_create(&p).unwrap_err();
        assert!(
            matches!(
                e,
                KeyFileError::Invalid {
                    source: InvalidKey::Key(_),
                    ..
                }
            ),
            "{e}"
        );
        let e = crate::error_chain(&e);
        assert!(e.contains("bad.key") && e.contains("64 hex"), "{e}");
        assert!(matches!(
            parse("{\"Private\":1}"),
            Err(InvalidKey::NoPrivateKey)
        ));
        assert!(matches!(parse("{nope"), Err(InvalidKey::NotJson(_))));
    }
}
