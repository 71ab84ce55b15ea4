//! Node keys on disk: `privkey:<64 hex>` (the form `ferry-relay`'s key file and derper use),
//! optionally inside derper's JSON `{"PrivateKey":"privkey:<hex>"}`.

use std::path::Path;

use ferry_proto::{PublicKey, SecretKey};

/// Why a key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The text is not a key.
    #[error("{what} is not a valid key: {why}. Expected {expected}")]
    Invalid {
        /// What was parsed (a file name, or "the argument").
        what: String,
        /// Why.
        why: String,
        /// The expected form.
        expected: &'static str,
    },
}

/// Parses a private key: `privkey:<hex>`, bare hex, or derper's JSON.
pub fn parse_secret(text: &str, what: &str) -> Result<SecretKey, KeyError> {
    let t = text.trim();
    let invalid = |why: String| KeyError::Invalid {
        what: what.to_string(),
        why,
        expected: "privkey:<64 hex characters> (make one with `ferry keygen`)",
    };
    let s = if t.starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(t).map_err(|e| invalid(format!("not JSON ({e})")))?;
        v.get("PrivateKey")
            .and_then(|p| p.as_str())
            .ok_or_else(|| invalid("no \"PrivateKey\" string".into()))?
            .to_string()
    } else {
        t.to_string()
    };
    s.parse::<SecretKey>().map_err(|e| invalid(e.to_string()))
}

/// Parses a public node key: `nodekey:<hex>` or bare hex (64 characters).
pub fn parse_public(text: &str) -> Result<PublicKey, KeyError> {
    text.trim()
        .parse::<PublicKey>()
        .map_err(|e| KeyError::Invalid {
            what: format!("{:?}", text.trim()),
            why: e.to_string(),
            expected: "nodekey:<64 hex characters> (what `ferry keygen` prints as the public key)",
        })
}

/// The public key in Tailscale's display form, `nodekey:<hex>`.
pub fn display_public(k: &PublicKey) -> String {
    format!("nodekey:{}", k.to_hex())
}

/// Reads a private key file.
pub fn read_secret(path: &Path) -> Result<SecretKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_secret(&text, &path.display().to_string())
}

/// Writes a new private key file with mode 0600; refuses to overwrite.
pub fn write_secret(path: &Path, key: &SecretKey) -> Result<(), KeyError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).map_err(io)?;
    f.write_all(format!("{}\n", key.to_privkey_string()).as_bytes())
        .map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let k = SecretKey::generate();
        let s = k.to_privkey_string();
        assert!(s.starts_with("privkey:"));
        assert_eq!(parse_secret(&s, "x").unwrap().public(), k.public());
        let json = format!("{{\"PrivateKey\":\"{s}\"}}");
        assert_eq!(parse_secret(&json, "x").unwrap().public(), k.public());
        let e = parse_secret("privkey:zz", "the argument")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the argument") && e.contains("ferry keygen"),
            "{e}"
        );
        let p = display_public(&k.public());
        assert_eq!(parse_public(&p).unwrap(), k.public());
        assert!(parse_public("nodekey:1234").is_err());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        write_secret(&f, &k).unwrap();
        assert_eq!(read_secret(&f).unwrap().public(), k.public());
        assert!(write_secret(&f, &k).is_err(), "never overwrites");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&f).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
