//! The optional TOML config file: read, parse into [`Settings`], and find the line of a key
//! (so a value refused later still points at its line).
//!
//! Unknown keys are errors, so a typo fails at start with the file, the line and the list of
//! valid keys, instead of being silently ignored.

use std::path::{Path, PathBuf};

use crate::settings::Settings;

/// A config file that was read and parsed, with its text kept for line numbers.
#[derive(Debug, Clone)]
pub(crate) struct ConfigFile {
    pub path: PathBuf,
    text: String,
    pub settings: Settings,
}

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FileError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}")]
    Parse {
        path: PathBuf,
        // Boxed: a toml error is large, and Results carry it by value.
        source: Box<ParseError>,
    },
}

/// Text that is not a valid config: the line, the column's message and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{}{}{}", .line.map(|l| format!("line {l}: ")).unwrap_or_default(), .source.message(), hint(.source.message()))]
pub(crate) struct ParseError {
    line: Option<usize>,
    #[source]
    source: toml::de::Error,
}

fn hint(msg: &str) -> &'static str {
    if msg.contains("unknown field") {
        " (see relay/ferry-relay.example.toml for every key)"
    } else {
        ""
    }
}

/// Parses config text; the error carries the line and what is expected.
pub(crate) fn parse(text: &str) -> Result<Settings, ParseError> {
    toml::from_str(text).map_err(|source: toml::de::Error| ParseError {
        line: source
            .span()
            .map(|s| text[..s.start].matches('\n').count() + 1),
        source,
    })
}

impl ConfigFile {
    /// Reads and parses a config file.
    pub(crate) fn load(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
            path: path.into(),
            source,
        })?;
        let settings = parse(&text).map_err(|source| FileError::Parse {
            path: path.into(),
            source: Box::new(source),
        })?;
        Ok(ConfigFile {
            path: path.into(),
            text,
            settings,
        })
    }

    /// A parsed file that was never on disk.
    #[cfg(test)]
    pub(crate) fn for_test(path: &str, text: &str) -> Self {
        ConfigFile {
            path: path.into(),
            text: text.into(),
            settings: parse(text).unwrap(),
        }
    }

    /// The 1-based line where `key` is set in `[section]` (`None`: the top level), if it is.
    pub(crate) fn line_of(&self, section: Option<&str>, key: &str) -> Option<usize> {
        line_of(&self.text, section, key)
    }
}

/// Finds `key = ...` in `[section]` of TOML text (tables and plain keys only, which is what the
/// config file has).
fn line_of(text: &str, section: Option<&str>, key: &str) -> Option<usize> {
    let mut current: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(rest) = line.strip_prefix('[') {
            current = rest
                .split(']')
                .next()
                .map(|s| s.trim().trim_matches('"').to_string());
            continue;
        }
        let Some((k, _)) = line.split_once('=') else {
            continue;
        };
        if current.as_deref() == section && k.trim().trim_matches('"') == key {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferry_relay::server::VerifyFail;

    use super::*;
    use crate::settings::{CertMode, Listen};

    #[test]
    fn the_example_file_parses_and_says_what_it_shows() {
        let text = include_str!("../../../ferry-relay.example.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.listen, Some("0.0.0.0:443".parse().unwrap()));
        assert_eq!(c.tls.mode, Some(CertMode::SelfSigned));
        assert_eq!(
            c.metrics_listen,
            Some(Listen::On("127.0.0.1:9090".parse().unwrap()))
        );
        assert_eq!(c.limits.write_timeout, Some(Duration::from_secs(2)));
        assert_eq!(c.stun.enabled, Some(true));
        assert_eq!(c.limits.client_rate_limit, Some(0));
        assert_eq!(c.limits.accept_rate, Some(0.0));
        assert_eq!(c.admission.verify_fail, Some(VerifyFail::Closed));
        assert_eq!(c.admission.verify_timeout, Some(Duration::from_secs(2)));
        assert_eq!(c.derpmap.region_id, Some(900));
    }

    #[test]
    fn admission_and_limits_keys_parse_and_bad_values_name_the_line() {
        let c = parse(
            "[limits]\naccept_rate = 2.5\nmax_connections_per_ip = 8\n[admission]\nverify_fail = \"open\"\nverify_timeout = \"500ms\"\n",
        )
        .unwrap();
        assert_eq!(c.limits.accept_rate, Some(2.5));
        assert_eq!(c.limits.max_connections_per_ip, Some(8));
        assert_eq!(c.admission.verify_fail, Some(VerifyFail::Open));
        let e = parse("[admission]\n\nverify_fail = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("line 3:") && e.contains("closed") && e.contains("open"),
            "{e}"
        );
        let e = parse("[limits]\nclient_rate_limit = -5\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("line 2:"), "{e}");
        let e = parse("[derpmap]\nregion = 3\n").unwrap_err().to_string();
        assert!(e.contains("region_id"), "{e}");
    }

    #[test]
    fn flag_only_settings_are_unknown_keys_in_the_file() {
        for text in [
            "dev = true\n",
            "config = \"x\"\n",
            "[stun]\nno_stun = true\n",
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains("unknown field"), "{text}: {e}");
        }
    }

    #[test]
    fn bad_files_name_the_line_and_the_fix() {
        let e = parse("listen = \"0.0.0.0:443\"\nlisen = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("line 2:")
                && e.contains("unknown field `lisen`")
                && e.contains("example.toml"),
            "{e}"
        );
        let e = parse("\n\nhttp_listen = \"port eighty\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("line 3:") && e.contains("IP:PORT"), "{e}");
        let e = parse("[limits]\nwrite_timeout = \"2 parsecs\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("line 2:"), "{e}");
        let e = parse("[tls]\nmode = \"acme-ish\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("self-signed") && e.contains("manual"), "{e}");
        let e = parse("[tls]\nrecord_layer = \"openssl\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("line 2:") && e.contains("`ferry` or `rustls`"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("relay.toml");
        std::fs::write(&p, "[stun]\nenabled = \"yes\"\n").unwrap();
        let e = ConfigFile::load(&p).unwrap_err();
        let cause = std::error::Error::source(&e).unwrap();
        let msg = format!("{e}: {cause}");
        assert!(
            msg.contains("relay.toml") && msg.contains("line 2"),
            "{msg}"
        );
    }

    #[test]
    fn keys_are_found_in_their_section() {
        let text =
            "listen = \"x\"\n# queue_depth = 1\n[limits]\n  queue_depth = 0\n[stun]\nlisten = []\n";
        assert_eq!(line_of(text, None, "listen"), Some(1));
        assert_eq!(line_of(text, Some("limits"), "queue_depth"), Some(4));
        assert_eq!(line_of(text, Some("stun"), "listen"), Some(6));
        assert_eq!(line_of(text, Some("stun"), "tcp"), None);
        assert_eq!(line_of(text, None, "queue_depth"), None);
    }
}
