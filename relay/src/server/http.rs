//! The HTTP/1.1 front of a relay connection: read one request head, then either upgrade to DERP
//! (plain or WebSocket) or answer a small fixed route.
//!
//! Why not hyper: DERP's fast-start (`Derp-Fast-Start: 1`) means the server must upgrade *without*
//! writing a 101 response, and frames the client pipelined after the request head must reach the
//! DERP reader. hyper always writes the response head. The request head is parsed by `httparse`
//! (a well-kept parser); everything here is a few fixed responses.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest request head accepted (derper's Go server allows 1 MiB; probes and clients send well
/// under 1 KiB).
pub(crate) const MAX_HEAD: usize = 16 << 10;
const MAX_HEADERS: usize = 64;

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) minor_version: u8,
    pub(crate) headers: Vec<(String, Vec<u8>)>,
}

impl Request {
    /// The first header with this (case-insensitive) name, as text.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    /// Whether a comma-separated header contains `token` (case-insensitive).
    pub(crate) fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Whether the connection may serve another request after this one.
    pub(crate) fn keep_alive(&self) -> bool {
        if self.header_has_token("connection", "close") {
            return false;
        }
        self.minor_version >= 1 || self.header_has_token("connection", "keep-alive")
    }

    /// Whether the request has a body we would have to read (we serve no such route).
    pub(crate) fn has_body(&self) -> bool {
        self.header("transfer-encoding").is_some()
            || self.header("content-length").is_some_and(|v| v != "0")
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    #[error("request head over {MAX_HEAD} bytes")]
    TooLarge,
    #[error("malformed request head")]
    Malformed(#[source] httparse::Error),
    #[error("connection closed in the middle of a request head")]
    Truncated,
    #[error("read error")]
    Io(#[from] std::io::Error),
}

/// Reads one request head. Bytes after it stay in `buf` (pipelined DERP frames with fast-start).
/// `Ok(None)` when the peer closed before sending anything.
pub(crate) async fn read_request<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
) -> Result<Option<Request>, HttpError> {
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let r = Request {
                        method: req.method.unwrap_or("").to_string(),
                        path: req.path.unwrap_or("").to_string(),
                        minor_version: req.version.unwrap_or(0),
                        headers: req
                            .headers
                            .iter()
                            .map(|h| (h.name.to_string(), h.value.to_vec()))
                            .collect(),
                    };
                    let _ = buf.split_to(n);
                    return Ok(Some(r));
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(HttpError::Malformed(e)),
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(HttpError::TooLarge);
        }
        buf.reserve(1024);
        if io.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(HttpError::Truncated)
            };
        }
    }
}

/// A fixed response.
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) reason: &'static str,
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) body: Vec<u8>,
}

impl Response {
    pub(crate) fn new(
        status: u16,
        reason: &'static str,
        content_type: &'static str,
        body: impl Into<Vec<u8>>,
    ) -> Self {
        Response {
            status,
            reason,
            headers: vec![("Content-Type", content_type.to_string())],
            body: body.into(),
        }
    }
    pub(crate) fn text(status: u16, reason: &'static str, body: impl Into<String>) -> Self {
        Self::new(status, reason, "text/plain; charset=utf-8", body.into())
    }

    /// Serialises the response. `head_only` for HEAD requests.
    pub(crate) fn encode(&self, head_only: bool, keep_alive: bool) -> Vec<u8> {
        use std::fmt::Write;
        let mut s = format!("HTTP/1.1 {} {}\r\n", self.status, self.reason);
        for (k, v) in &self.headers {
            let _ = write!(s, "{k}: {v}\r\n");
        }
        let _ = write!(s, "Content-Length: {}\r\n", self.body.len());
        s.push_str(if keep_alive {
            "Connection: keep-alive\r\n"
        } else {
            "Connection: close\r\n"
        });
        s.push_str("Server: ferry-relay\r\n\r\n");
        let mut out = s.into_bytes();
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// Whether a `/generate_204` challenge is one derper would echo: up to 64 characters of
/// `[A-Za-z0-9._:-]` (derper's `isChallengeChar`).
pub(crate) fn valid_challenge(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= 64
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
}

/// The path of a request target, also for the absolute form (`POST https://1.2.3.4:443/derp`,
/// which Tailscale's Rust client sends), without the query.
pub(crate) fn target_path(target: &str) -> &str {
    let t = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map(|i| &rest[i..]).unwrap_or("/"),
        None => target,
    };
    t.split('?').next().unwrap_or("")
}

/// The home page: what this is, and the version.
pub(crate) fn home_page() -> Response {
    let body = format!(
        "<!doctype html>\n<html><head><title>ferry-relay</title></head><body>\n\
         <h1>ferry-relay {v}</h1>\n\
         <p>This is a <a href=\"https://tailscale.com/kb/1232/derp-servers\">DERP</a> relay (protocol version 2). \
         It forwards end-to-end encrypted packets between nodes addressed by public key; \
         it cannot read them. Clients connect to <code>/derp</code>.</p>\n\
         <p>Health: <a href=\"/healthz\">/healthz</a>. Probes: <code>/derp/probe</code>, <code>/generate_204</code>.</p>\n\
         </body></html>\n",
        v = env!("CARGO_PKG_VERSION")
    );
    Response::new(200, "OK", "text/html; charset=utf-8", body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_head_leaves_pipelined_bytes() {
        let wire = b"POST /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n\x02\x00\x00";
        let mut io = &wire[..];
        let mut buf = BytesMut::new();
        let r = read_request(&mut io, &mut buf).await.unwrap().unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/derp"));
        assert_eq!(r.header("upgrade"), Some("DERP"));
        assert_eq!(r.header("derp-fast-start"), Some("1"));
        assert!(r.header_has_token("Connection", "upgrade"));
        assert_eq!(&buf[..], b"\x02\x00\x00");
    }

    #[tokio::test]
    async fn garbage_and_oversized_heads_are_errors() {
        let mut buf = BytesMut::new();
        let mut io = &b"\x16\x03\x01\x02\x00garbage\r\n\r\n"[..];
        assert!(matches!(
            read_request(&mut io, &mut buf).await,
            Err(HttpError::Malformed(_))
        ));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        let mut io = big.as_bytes();
        let mut buf = BytesMut::new();
        assert!(matches!(
            read_request(&mut io, &mut buf).await,
            Err(HttpError::TooLarge)
        ));
        let mut io = &b"GET / HTTP/1.1\r\n"[..];
        let mut buf = BytesMut::new();
        assert!(matches!(
            read_request(&mut io, &mut buf).await,
            Err(HttpError::Truncated)
        ));
    }

    #[test]
    fn absolute_form_targets_route_by_path() {
        assert_eq!(target_path("https://127.0.0.1:443/derp"), "/derp");
        assert_eq!(target_path("http://h/derp/probe?x=1"), "/derp/probe");
        assert_eq!(target_path("/derp?x"), "/derp");
        assert_eq!(target_path("https://h"), "/");
    }

    #[test]
    fn challenges_are_checked() {
        assert!(valid_challenge("abc-1.2_X:y"));
        assert!(!valid_challenge(""));
        assert!(!valid_challenge("a b"));
        assert!(!valid_challenge("x\r\nSet-Cookie: y"));
        assert!(!valid_challenge(&"a".repeat(65)));
    }
}
