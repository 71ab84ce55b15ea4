//! Who may connect: an allowlist file of node keys and/or a verify URL compatible with derper's
//! `--verify-client-url`.
//!
//! Both are checked after the client's ClientInfo opens (so its node key is proven) and before
//! ServerInfo, as derper does; a refused client is closed without another frame. Clients with
//! the right mesh key skip both (mesh peers are not tailnet nodes). With both configured, a key
//! must pass both.
//!
//! The verify URL gets derper's request, `POST {"NodePublic":"nodekey:<hex>","Source":"<ip>"}`
//! (`tailcfg.DERPAdmitClientRequest`), and must answer 200 with `{"Allow":true}` to admit.
//! Answers are cached per (key, address) for a short while, refusals shorter than admissions.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::metrics::AdmissionResult;
use super::watch;
use crate::proto::PublicKey;

/// How long an "allowed" answer of the verify URL is reused for the same key and address.
const CACHE_ALLOW_TTL: Duration = Duration::from_secs(30);
/// How long a "refused" answer is reused (short: a node just added should get in soon).
const CACHE_REFUSE_TTL: Duration = Duration::from_secs(5);
/// Most cached answers; beyond it, expired ones are dropped, then all.
const CACHE_MAX: usize = 16_384;
/// Most bytes of the verify URL's answer that are read (derper: 4 KiB).
const MAX_ANSWER: usize = 4 << 10;

/// What to do when the verify URL cannot answer (unreachable, timeout, non-200, bad body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum VerifyFail {
    /// Refuse the client: strangers stay out, but nobody new connects while the URL is down.
    #[default]
    Closed,
    /// Admit the client: the relay stays usable while the URL is down, for anyone.
    Open,
}

/// Admission settings.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// File of allowed node keys, `nodekey:<64 hex>` one a line, `#` comments; re-read when it
    /// changes.
    pub allowlist_file: Option<PathBuf>,
    /// derper-compatible admission URL (`http://` or `https://`).
    pub verify_url: Option<String>,
    /// Bound on one verify request, connect to answer.
    pub verify_timeout: Duration,
    /// When the verify URL cannot answer.
    pub verify_fail: VerifyFail,
    /// How often the allowlist file is checked for changes.
    pub reload_interval: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            allowlist_file: None,
            verify_url: None,
            verify_timeout: Duration::from_secs(2),
            verify_fail: VerifyFail::Closed,
            reload_interval: Duration::from_secs(5),
        }
    }
}

/// Why admission could not be set up. Each says what went wrong; advice is the binary's.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("cannot read the allowlist file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("allowlist file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: AllowlistLineError,
    },
    #[error("verify URL {url:?}")]
    Url {
        url: String,
        #[source]
        source: VerifyUrlError,
    },
    #[error("verify URL client")]
    Tls(#[source] super::TlsError),
}

/// Why a verify URL cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyUrlError {
    /// Not a URL at all.
    #[error("not a URL")]
    Parse(#[source] hyper::http::uri::InvalidUri),
    /// Neither `http://` nor `https://`.
    #[error("the scheme is not http:// or https://")]
    Scheme,
    /// No host to send the request to.
    #[error("no host")]
    NoHost,
}

/// Parses a verify URL: `http://` or `https://` with a host.
pub(crate) fn check_verify_url(url: &str) -> Result<hyper::Uri, VerifyUrlError> {
    let uri: hyper::Uri = url.parse().map_err(VerifyUrlError::Parse)?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(VerifyUrlError::Scheme),
    }
    if uri.host().is_none() {
        return Err(VerifyUrlError::NoHost);
    }
    Ok(uri)
}

/// A line of an allowlist that is not a node key (there is no underlying error: the line and
/// its text say what is wrong).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {text:?} is not a node key (expected `nodekey:<64 hex>`, or a `#` comment)")]
pub struct AllowlistLineError {
    /// 1-based.
    pub line: usize,
    /// The line without its comment, trimmed.
    pub text: String,
}

/// Parses an allowlist: one `nodekey:<64 hex>` a line; `#` starts a comment; blank lines are
/// skipped. The error names the first bad line.
pub fn parse_allowlist(text: &str) -> Result<HashSet<PublicKey>, AllowlistLineError> {
    let mut keys = HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let key = line
            .strip_prefix("nodekey:")
            .filter(|h| h.len() == 64)
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| PublicKey::from_slice(&b));
        match key {
            Some(k) => {
                keys.insert(k);
            }
            None => {
                return Err(AllowlistLineError {
                    line: i + 1,
                    text: line.to_string(),
                })
            }
        }
    }
    Ok(keys)
}

fn read_allowlist(path: &Path) -> Result<HashSet<PublicKey>, AdmissionError> {
    let text = std::fs::read_to_string(path).map_err(|source| AdmissionError::Read {
        path: path.into(),
        source,
    })?;
    parse_allowlist(&text).map_err(|source| AdmissionError::Parse {
        path: path.into(),
        source,
    })
}

type Https = HttpsConnector<HttpConnector>;

struct Verifier {
    url: hyper::Uri,
    client: HyperClient<Https, Full<Bytes>>,
    timeout: Duration,
    fail: VerifyFail,
    cache: Mutex<HashMap<(PublicKey, IpAddr), (bool, Instant)>>,
}

/// The admission checks of one server.
pub(crate) struct Admission {
    allowlist: Option<(PathBuf, RwLock<Arc<HashSet<PublicKey>>>)>,
    /// Fingerprint of the allowlist file taken just before it was read at start.
    initial: Mutex<Option<watch::Fingerprint>>,
    reload_interval: Duration,
    verify: Option<Verifier>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("allowlist", &self.allowlist.as_ref().map(|(p, _)| p))
            .field("verify", &self.verify.as_ref().map(|v| v.url.to_string()))
            .finish()
    }
}

impl Admission {
    /// Reads the allowlist and checks the URL. A bad file or URL is an error (at start).
    pub(crate) fn new(cfg: &AdmissionConfig) -> Result<Admission, AdmissionError> {
        let (allowlist, initial) = match &cfg.allowlist_file {
            Some(p) => {
                let fp = watch::Fingerprint::of(std::slice::from_ref(p));
                let keys = read_allowlist(p)?;
                if keys.is_empty() {
                    warn!(path = %p.display(), "the allowlist is empty: every client is refused");
                }
                info!(path = %p.display(), keys = keys.len(), "allowlist loaded");
                (Some((p.clone(), RwLock::new(Arc::new(keys)))), Some(fp))
            }
            None => (None, None),
        };
        let verify = match &cfg.verify_url {
            Some(u) => Some(Verifier::new(u, cfg)?),
            None => None,
        };
        Ok(Admission {
            allowlist,
            initial: Mutex::new(initial),
            reload_interval: cfg.reload_interval,
            verify,
        })
    }

    /// Re-reads the allowlist whenever the file changes, until `cancel`. A bad file keeps the
    /// list in use and logs the line that is wrong.
    pub(crate) async fn watch(self: Arc<Self>, cancel: CancellationToken) {
        let (Some((path, _)), Some(initial)) = (&self.allowlist, self.initial.lock().take()) else {
            return;
        };
        let path = path.clone();
        let me = Arc::clone(&self);
        watch::poll_files(
            vec![path],
            initial,
            self.reload_interval,
            cancel,
            move || me.reload(),
        )
        .await;
    }

    /// Re-reads the allowlist now (also what the watcher calls).
    pub(crate) fn reload(&self) {
        let Some((path, list)) = &self.allowlist else {
            return;
        };
        match read_allowlist(path) {
            Ok(keys) => {
                info!(path = %path.display(), keys = keys.len(), "allowlist reloaded");
                *list.write() = Arc::new(keys);
            }
            Err(e) => error!(
                "allowlist not reloaded, still using the previous {} keys: {}",
                list.read().len(),
                crate::error_chain(&e)
            ),
        }
    }

    /// Decides whether `key`, connecting from `ip`, may use the relay.
    pub(crate) async fn check(&self, key: &PublicKey, ip: IpAddr) -> AdmissionResult {
        if let Some((_, list)) = &self.allowlist {
            if !list.read().contains(key) {
                return AdmissionResult::RefusedAllowlist;
            }
        }
        match &self.verify {
            Some(v) => v.check(key, ip.to_canonical()).await,
            None => AdmissionResult::Allowed,
        }
    }
}

impl Verifier {
    fn new(url: &str, cfg: &AdmissionConfig) -> Result<Verifier, AdmissionError> {
        // Shape and timeout were checked by Config::validate; checked again for callers of
        // Admission::new alone.
        let uri = check_verify_url(url).map_err(|source| AdmissionError::Url {
            url: url.into(),
            source,
        })?;
        let tls = super::tls::client_config(None).map_err(AdmissionError::Tls)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Verifier {
            url: uri,
            client: HyperClient::builder(TokioExecutor::new()).build(https),
            timeout: cfg.verify_timeout,
            fail: cfg.verify_fail,
            cache: Mutex::new(HashMap::new()),
        })
    }

    async fn check(&self, key: &PublicKey, ip: IpAddr) -> AdmissionResult {
        let now = Instant::now();
        if let Some(&(allow, at)) = self.cache.lock().get(&(*key, ip)) {
            let ttl = if allow {
                CACHE_ALLOW_TTL
            } else {
                CACHE_REFUSE_TTL
            };
            if now.duration_since(at) < ttl {
                return if allow {
                    AdmissionResult::Allowed
                } else {
                    AdmissionResult::RefusedVerify
                };
            }
        }
        match tokio::time::timeout(self.timeout, self.ask(key, ip)).await {
            Ok(Ok(allow)) => {
                let mut c = self.cache.lock();
                if c.len() >= CACHE_MAX {
                    c.retain(|_, (a, at)| {
                        now.duration_since(*at)
                            < if *a {
                                CACHE_ALLOW_TTL
                            } else {
                                CACHE_REFUSE_TTL
                            }
                    });
                    if c.len() >= CACHE_MAX {
                        c.clear();
                    }
                }
                c.insert((*key, ip), (allow, now));
                if allow {
                    AdmissionResult::Allowed
                } else {
                    AdmissionResult::RefusedVerify
                }
            }
            Ok(Err(e)) => self.failed(key, &e),
            Err(_) => self.failed(key, &VerifyError::Timeout(self.timeout)),
        }
    }

    fn failed(&self, key: &PublicKey, e: &VerifyError) -> AdmissionResult {
        let why = crate::error_chain(e);
        match self.fail {
            VerifyFail::Open => {
                warn!(key = %key.short(), url = %self.url, "verify URL failed ({why}); admitting (verify_fail = open)");
                AdmissionResult::VerifyErrorOpen
            }
            VerifyFail::Closed => {
                warn!(key = %key.short(), url = %self.url, "verify URL failed ({why}); refusing (verify_fail = closed)");
                AdmissionResult::VerifyErrorClosed
            }
        }
    }

    /// One request: `Ok(allow)` for a 200 with a JSON body, `Err(why)` otherwise.
    async fn ask(&self, key: &PublicKey, ip: IpAddr) -> Result<bool, VerifyError> {
        let body = serde_json::json!({
            "NodePublic": format!("nodekey:{}", key.to_hex()),
            "Source": ip.to_string(),
        })
        .to_string();
        let req = hyper::Request::post(self.url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(VerifyError::Request)?;
        let resp = self.client.request(req).await.map_err(VerifyError::Send)?;
        let status = resp.status();
        if status != hyper::StatusCode::OK {
            return Err(VerifyError::Status(status));
        }
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(VerifyError::Body)?
            .to_bytes();
        Ok(parse_answer(&bytes)?)
    }
}

/// Why one verify request gave no answer (what `verify_fail` then decides about).
#[derive(Debug, thiserror::Error)]
enum VerifyError {
    #[error("building the request")]
    Request(#[source] hyper::http::Error),
    #[error("request failed")]
    Send(#[source] hyper_util::client::legacy::Error),
    #[error("answered {0}, not 200")]
    Status(hyper::StatusCode),
    #[error("reading the answer")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Answer(#[from] AnswerError),
    #[error("no answer within {0:?} (verify_timeout)")]
    Timeout(Duration),
}

/// A 200 answer that is not `{"Allow":true|false}`.
#[derive(Debug, thiserror::Error)]
enum AnswerError {
    #[error("answer is not JSON; expected {{\"Allow\":true|false}}")]
    NotJson(#[source] serde_json::Error),
    #[error("answer is not a JSON object; expected {{\"Allow\":true|false}}")]
    NotObject,
}

/// `{"Allow":true}` admits. Field names match case-insensitively, as Go's encoding/json does.
fn parse_answer(body: &[u8]) -> Result<bool, AnswerError> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(AnswerError::NotJson)?;
    let obj = v.as_object().ok_or(AnswerError::NotObject)?;
    Ok(obj
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("allow"))
        .and_then(|(_, v)| v.as_bool())
        .unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist_parses_comments_and_names_the_bad_line() {
        let k1 = crate::proto::SecretKey::generate().public();
        let k2 = crate::proto::SecretKey::generate().public();
        let text = format!(
            "# ops laptops\n\nnodekey:{}\n  nodekey:{}   # ci runner\n",
            k1.to_hex(),
            k2.to_hex()
        );
        let keys = parse_allowlist(&text).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.contains(&k1) && keys.contains(&k2));
        let bad = format!("nodekey:{}\n{}\n", k1.to_hex(), k2.to_hex());
        let e = parse_allowlist(&bad).unwrap_err();
        assert_eq!((e.line, e.text.as_str()), (2, k2.to_hex().as_str()));
        let e = e.to_string();
        assert!(
            e.starts_with("line 2:") && e.contains("nodekey:<64 hex>"),
            "{e}"
        );
        let e = parse_allowlist("nodekey:abcd\n").unwrap_err();
        assert_eq!(e.line, 1);
        let e = parse_allowlist(&format!("discokey:{}\n", k1.to_hex())).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(parse_allowlist("# nobody\n").unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_bad_file_keeps_the_old_list() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.txt");
        let k = crate::proto::SecretKey::generate().public();
        std::fs::write(&p, format!("nodekey:{}\n", k.to_hex())).unwrap();
        let a = Admission::new(&AdmissionConfig {
            allowlist_file: Some(p.clone()),
            ..Default::default()
        })
        .unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(a.check(&k, ip).await, AdmissionResult::Allowed);
        std::fs::write(&p, "nodekey:half-writ").unwrap();
        a.reload();
        assert_eq!(
            a.check(&k, ip).await,
            AdmissionResult::Allowed,
            "old list kept"
        );
        std::fs::remove_file(&p).unwrap();
        a.reload();
        assert_eq!(
            a.check(&k, ip).await,
            AdmissionResult::Allowed,
            "old list kept"
        );
        std::fs::write(&p, "# empty now\n").unwrap();
        a.reload();
        assert_eq!(a.check(&k, ip).await, AdmissionResult::RefusedAllowlist);
        // At start, a bad file is an error naming the file and the line.
        std::fs::write(&p, "\nnodekey:xyz\n").unwrap();
        let e = Admission::new(&AdmissionConfig {
            allowlist_file: Some(p),
            ..Default::default()
        })
        .unwrap_err();
        let e = crate::error_chain(&e);
        assert!(e.contains("keys.txt") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn answers_parse_like_go() {
        assert!(parse_answer(br#"{"Allow":true}"#).unwrap());
        assert!(parse_answer(br#"{"allow":true}"#).unwrap());
        assert!(!parse_answer(br#"{"Allow":false}"#).unwrap());
        assert!(!parse_answer(br#"{}"#).unwrap());
        assert!(matches!(parse_answer(b"yes"), Err(AnswerError::NotJson(_))));
        assert!(matches!(
            parse_answer(b"[true]"),
            Err(AnswerError::NotObject)
        ));
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let cfg = AdmissionConfig::default();
        for u in [
            "headscale:8080/verify",
            "ftp://x/verify",
            "not a url",
            "http:///verify",
        ] {
            let e = Verifier::new(u, &cfg).err().expect(u);
            assert!(matches!(e, AdmissionError::Url { .. }), "{e}");
            assert!(e.to_string().contains(u), "{e}");
        }
        assert!(Verifier::new("https://hs.example.com/verify", &cfg).is_ok());
    }
}
