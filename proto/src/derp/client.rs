//! The client side of a DERP connection's start, sans-IO: the HTTP upgrade request, the
//! server's answer, and the handshake (ServerKey → ClientInfo → ServerInfo) as a state machine
//! fed with the bytes the caller reads. Every DERP client of the project (the client library,
//! the load tester, the mesh, the tests) drives this one machine with its own I/O, timeouts and
//! error wording around it.
//!
//! ```
//! use bytes::BytesMut;
//! use ferry_proto::derp::client::{ClientHandshake, HttpUpgrade, Step, Upgrade};
//! use ferry_proto::derp::{ClientInfo, SecretKey};
//!
//! let up = HttpUpgrade::new("relay.example.com:443", "ferry-doc/1");
//! let (mut hs, first_bytes) =
//!     ClientHandshake::new(SecretKey::generate(), ClientInfo::default(), Upgrade::Http(up));
//! assert!(first_bytes.starts_with(b"GET /derp HTTP/1.1\r\n"));
//! // Write `first_bytes`, then loop: read into `buf`, call `feed`, write what it asks for.
//! let mut buf = BytesMut::new();
//! assert!(matches!(hs.feed(&mut buf), Ok(Step::NeedMore)));
//! ```

use bytes::BytesMut;

use super::{
    client_info_payload, frame_type as ft, open, parse_server_key, put_frame, ClientInfo,
    FrameDecoder, ProtoError, PublicKey, SecretKey, ServerInfo, PROTOCOL_VERSION,
};

/// Largest HTTP response head read before the DERP stream starts.
pub const MAX_RESPONSE_HEAD: usize = 16 << 10;

/// `host:port` for a `Host` header, with an IPv6 literal in brackets.
pub fn host_header(host: &str, port: u16) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// What goes into the upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUpgrade {
    /// `Host` header value (see [`host_header`]).
    pub host: String,
    /// Request target, normally `/derp`.
    pub path: String,
    /// `User-Agent` header value.
    pub user_agent: String,
}

impl HttpUpgrade {
    /// An upgrade to `/derp` on `host` (a `Host` header value).
    pub fn new(host: impl Into<String>, user_agent: impl Into<String>) -> Self {
        HttpUpgrade {
            host: host.into(),
            path: "/derp".into(),
            user_agent: user_agent.into(),
        }
    }
}

/// The request that asks a DERP server to switch protocols.
pub fn upgrade_request(req: &HttpUpgrade) -> Vec<u8> {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: {PROTOCOL_VERSION}\r\nUser-Agent: {}\r\n\r\n",
        req.path, req.host, req.user_agent
    )
    .into_bytes()
}

/// The server side's answer to [`upgrade_request`] (without fast-start).
pub fn switching_protocols_response(server_key: &PublicKey) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: {PROTOCOL_VERSION}\r\nDerp-Public-Key: {}\r\n\r\n",
        server_key.to_hex()
    )
    .into_bytes()
}

/// A server's answer to the upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeResponse {
    /// HTTP/1.x minor version.
    pub minor_version: u8,
    /// 101 when the server switched to DERP.
    pub status: u16,
    /// The status line's reason phrase.
    pub reason: String,
    /// The `Derp-Public-Key` header, when present and well-formed.
    pub derp_public_key: Option<PublicKey>,
}

impl UpgradeResponse {
    /// Whether the server switched protocols.
    pub fn is_switching(&self) -> bool {
        self.status == 101
    }

    /// `HTTP/1.1 403 Forbidden`, for messages.
    pub fn status_line(&self) -> String {
        format!(
            "HTTP/1.{} {} {}",
            self.minor_version, self.status, self.reason
        )
    }
}

/// Parses a response head. `Ok(None)`: more bytes are needed. `Ok(Some((response, n)))`: the
/// head is `buf[..n]`; DERP bytes may follow it.
pub fn parse_upgrade_response(
    buf: &[u8],
) -> Result<Option<(UpgradeResponse, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            let key = r
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("derp-public-key"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .and_then(|v| v.trim().parse().ok());
            Ok(Some((
                UpgradeResponse {
                    minor_version: r.version.unwrap_or(1),
                    status: r.code.unwrap_or(0),
                    reason: r.reason.unwrap_or("").to_string(),
                    derp_public_key: key,
                },
                n,
            )))
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
            Err(HandshakeError::HeadTooLong)
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(HandshakeError::BadHttp(e)),
    }
}

/// How the connection reached the DERP stream.
#[derive(Debug, Clone)]
pub enum Upgrade {
    /// Send this upgrade request and read the server's answer first.
    Http(HttpUpgrade),
    /// The stream is DERP already (after a WebSocket upgrade, or a test's own request).
    AlreadyUpgraded,
}

/// Where a handshake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for the HTTP response head.
    HttpResponse,
    /// Waiting for the ServerKey frame.
    ServerKey,
    /// ClientInfo sent; waiting for ServerInfo.
    ServerInfo,
    /// Done.
    Established,
}

impl Stage {
    /// A short label for messages and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Stage::HttpResponse => "the HTTP response",
            Stage::ServerKey => "the ServerKey frame",
            Stage::ServerInfo => "the ServerInfo frame",
            Stage::Established => "nothing (established)",
        }
    }
}

/// What the caller does next.
#[derive(Debug)]
pub enum Step {
    /// Read more bytes into the buffer, then call [`ClientHandshake::feed`] again.
    NeedMore,
    /// The server's key arrived. Write `client_info` (the ClientInfo frame), or hang up (a
    /// mesh relay that reached itself); then call `feed` again.
    ServerKey {
        /// The server's public key.
        key: PublicKey,
        /// The ClientInfo frame to send.
        client_info: Vec<u8>,
    },
    /// The handshake is done; frames follow in the buffer.
    Established(Established),
}

/// A finished handshake.
#[derive(Debug, Clone)]
pub struct Established {
    /// The server's key (from the ServerKey frame).
    pub server_key: PublicKey,
    /// The server's ServerInfo, opened and parsed.
    pub server_info: ServerInfo,
    /// The HTTP answer, when this handshake sent the upgrade request.
    pub response: Option<UpgradeResponse>,
}

/// Why a handshake failed. Messages say what went wrong; advice is the caller's.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The server answered the upgrade with something other than 101.
    #[error("the upgrade got `{}` instead of `101 Switching Protocols`", .0.status_line())]
    Refused(UpgradeResponse),
    /// The response head is not HTTP.
    #[error("the response is not HTTP")]
    BadHttp(#[source] httparse::Error),
    /// The response head is over [`MAX_RESPONSE_HEAD`].
    #[error("the HTTP response head is over {MAX_RESPONSE_HEAD} bytes")]
    HeadTooLong,
    /// The connection ended before the handshake did.
    #[error("the connection closed while waiting for {}", .0.label())]
    Closed(Stage),
    /// A frame other than the one the handshake expects.
    #[error("the server sent a frame of type {got:#04x} where {} belongs", .expected.label())]
    UnexpectedFrame {
        /// What was expected.
        expected: Stage,
        /// The frame type received.
        got: u8,
    },
    /// The `Derp-Public-Key` header names another key than the ServerKey frame.
    #[error("the Derp-Public-Key header says {header} but the ServerKey frame says {frame}")]
    KeyMismatch {
        /// From the HTTP header.
        header: PublicKey,
        /// From the frame.
        frame: PublicKey,
    },
    /// A frame that does not decode, or a ServerInfo that does not open.
    #[error(transparent)]
    Proto(#[from] ProtoError),
}

impl HandshakeError {
    /// Whether the server refused the upgrade (a client may then try WebSocket).
    pub fn is_refused(&self) -> bool {
        matches!(self, HandshakeError::Refused(_))
    }
}

/// The client's handshake; see the module documentation.
#[derive(Debug)]
pub struct ClientHandshake {
    secret: SecretKey,
    info: ClientInfo,
    dec: FrameDecoder,
    stage: Stage,
    response: Option<UpgradeResponse>,
    server_key: Option<PublicKey>,
}

impl ClientHandshake {
    /// A handshake as `secret` announcing `info`; returns it and the bytes to write first (the
    /// upgrade request, or nothing when the stream is DERP already).
    pub fn new(secret: SecretKey, info: ClientInfo, upgrade: Upgrade) -> (Self, Vec<u8>) {
        let (stage, first) = match upgrade {
            Upgrade::Http(req) => (Stage::HttpResponse, upgrade_request(&req)),
            Upgrade::AlreadyUpgraded => (Stage::ServerKey, Vec::new()),
        };
        let hs = ClientHandshake {
            secret,
            info,
            dec: FrameDecoder::new(),
            stage,
            response: None,
            server_key: None,
        };
        (hs, first)
    }

    /// Where the handshake is (for per-stage timeouts and messages).
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The error for a connection that ends now.
    pub fn closed(&self) -> HandshakeError {
        HandshakeError::Closed(self.stage)
    }

    /// Bytes for the next read: at least what the frame being read still needs.
    pub fn bytes_needed(&self, buf: &[u8]) -> usize {
        match self.stage {
            Stage::HttpResponse => 1024,
            _ => self.dec.bytes_needed(buf).max(1024),
        }
    }

    /// Consumes what it can from `buf` (the bytes after ServerInfo stay there).
    pub fn feed(&mut self, buf: &mut BytesMut) -> Result<Step, HandshakeError> {
        loop {
            match self.stage {
                Stage::HttpResponse => {
                    let Some((resp, n)) = parse_upgrade_response(buf)? else {
                        return Ok(Step::NeedMore);
                    };
                    if !resp.is_switching() {
                        return Err(HandshakeError::Refused(resp));
                    }
                    let _ = buf.split_to(n);
                    self.response = Some(resp);
                    self.stage = Stage::ServerKey;
                }
                Stage::ServerKey => {
                    let Some(f) = self.dec.decode(buf)? else {
                        return Ok(Step::NeedMore);
                    };
                    if f.frame_type != ft::SERVER_KEY {
                        return Err(HandshakeError::UnexpectedFrame {
                            expected: Stage::ServerKey,
                            got: f.frame_type,
                        });
                    }
                    let key = parse_server_key(&f.payload)?;
                    if let Some(header) = self.response.as_ref().and_then(|r| r.derp_public_key) {
                        if header != key {
                            return Err(HandshakeError::KeyMismatch { header, frame: key });
                        }
                    }
                    let mut client_info = Vec::new();
                    put_frame(
                        &mut client_info,
                        ft::CLIENT_INFO,
                        &[&client_info_payload(&self.secret, &key, &self.info)],
                    );
                    self.server_key = Some(key);
                    self.stage = Stage::ServerInfo;
                    return Ok(Step::ServerKey { key, client_info });
                }
                Stage::ServerInfo => {
                    let Some(f) = self.dec.decode(buf)? else {
                        return Ok(Step::NeedMore);
                    };
                    if f.frame_type != ft::SERVER_INFO {
                        return Err(HandshakeError::UnexpectedFrame {
                            expected: Stage::ServerInfo,
                            got: f.frame_type,
                        });
                    }
                    let server_key = self.server_key.expect("set at the ServerKey stage");
                    let json = open(&self.secret, &server_key, &f.payload)?;
                    let server_info = ServerInfo::from_json(&json)?;
                    self.stage = Stage::Established;
                    return Ok(Step::Established(Established {
                        server_key,
                        server_info,
                        response: self.response.take(),
                    }));
                }
                Stage::Established => return Ok(Step::NeedMore),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derp::{open_client_info, seal, server_key_payload};

    /// A server's side of the exchange, made with the same codec.
    struct Server {
        secret: SecretKey,
    }

    impl Server {
        fn key(&self) -> PublicKey {
            self.secret.public()
        }
        fn hello(&self) -> Vec<u8> {
            let mut out = switching_protocols_response(&self.key());
            put_frame(
                &mut out,
                ft::SERVER_KEY,
                &[&server_key_payload(&self.key())],
            );
            out
        }
        fn server_info(&self, client_frame: &[u8]) -> (PublicKey, ClientInfo, Vec<u8>) {
            let mut b = BytesMut::from(client_frame);
            let f = FrameDecoder::new().decode(&mut b).unwrap().unwrap();
            assert_eq!(f.frame_type, ft::CLIENT_INFO);
            let (client, info) = open_client_info(&self.secret, &f.payload).unwrap();
            let si = ServerInfo {
                version: 2,
                ..Default::default()
            };
            let mut out = Vec::new();
            put_frame(
                &mut out,
                ft::SERVER_INFO,
                &[&seal(&self.secret, &client, &si.to_json())],
            );
            (client, info, out)
        }
    }

    fn client() -> (ClientHandshake, Vec<u8>, SecretKey) {
        let secret = SecretKey::generate();
        let info = ClientInfo {
            version: 2,
            can_ack_pings: true,
            ..Default::default()
        };
        let up = HttpUpgrade::new(host_header("2001:db8::1", 443), "test/1");
        let (hs, first) = ClientHandshake::new(secret.clone(), info, Upgrade::Http(up));
        (hs, first, secret)
    }

    /// Drives the whole exchange, the server's bytes arriving `chunk` at a time.
    fn run(server: &Server, chunk: usize, extra: &[u8]) -> (Established, BytesMut, PublicKey) {
        let (mut hs, first, secret) = client();
        let req = String::from_utf8(first).unwrap();
        assert!(req.starts_with("GET /derp HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("\r\nHost: [2001:db8::1]:443\r\n"), "{req}");
        assert!(req.contains("\r\nUpgrade: DERP\r\n"), "{req}");
        let mut incoming = server.hello();
        let mut buf = BytesMut::new();
        let mut pending_info: Option<Vec<u8>> = None;
        loop {
            match hs.feed(&mut buf).unwrap() {
                Step::NeedMore => {
                    if incoming.is_empty() {
                        let (client, info, si) =
                            server.server_info(&pending_info.take().expect("ClientInfo sent"));
                        assert_eq!(client, secret.public());
                        assert!(info.can_ack_pings);
                        incoming = si;
                        incoming.extend_from_slice(extra);
                    }
                    let n = chunk.min(incoming.len());
                    buf.extend_from_slice(&incoming[..n]);
                    incoming.drain(..n);
                }
                Step::ServerKey { key, client_info } => {
                    assert_eq!(key, server.key());
                    pending_info = Some(client_info);
                }
                Step::Established(e) => {
                    buf.extend_from_slice(&incoming);
                    return (e, buf, secret.public());
                }
            }
        }
    }

    #[test]
    fn a_whole_handshake_byte_by_byte_and_in_one_piece_keeps_what_follows() {
        let server = Server {
            secret: SecretKey::generate(),
        };
        for chunk in [1, 7, 1 << 20] {
            let (e, rest, _) = run(&server, chunk, b"\x06\x00\x00\x00\x00");
            assert_eq!(e.server_key, server.key());
            assert_eq!(e.server_info.version, 2);
            let resp = e.response.unwrap();
            assert_eq!(resp.derp_public_key, Some(server.key()));
            assert_eq!(
                &rest[..],
                b"\x06\x00\x00\x00\x00",
                "the KeepAlive after it stays"
            );
        }
    }

    #[test]
    fn refusals_and_garbage_are_named() {
        let (mut hs, _, _) = client();
        let mut b = BytesMut::from(&b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"[..]);
        let e = hs.feed(&mut b).unwrap_err();
        assert!(e.is_refused());
        assert_eq!(
            e.to_string(),
            "the upgrade got `HTTP/1.1 403 Forbidden` instead of `101 Switching Protocols`"
        );
        // HTTP/1.0 101 (some proxies) is a switch.
        let (mut hs, _, _) = client();
        let mut b = BytesMut::from(&b"HTTP/1.0 101 Switching Protocols\r\n\r\n"[..]);
        assert!(matches!(hs.feed(&mut b), Ok(Step::NeedMore)));
        assert_eq!(hs.stage(), Stage::ServerKey);
        // A head that never ends.
        let (mut hs, _, _) = client();
        let mut b = BytesMut::from(&b"HTTP/1.1 101 Switching Protocols\r\nX: "[..]);
        b.extend_from_slice(&vec![b'a'; MAX_RESPONSE_HEAD]);
        assert!(matches!(hs.feed(&mut b), Err(HandshakeError::HeadTooLong)));
        // Not HTTP at all.
        let (mut hs, _, _) = client();
        let mut b = BytesMut::from(&b"\x01\x00\x00\x00\x28DERP"[..]);
        let e = hs.feed(&mut b).unwrap_err();
        assert!(matches!(e, HandshakeError::BadHttp(_)), "{e}");
        let source = std::error::Error::source(&e).expect("httparse's error is the source");
        assert!(source.is::<httparse::Error>(), "{source}");
        // A KeepAlive where ServerKey belongs.
        let (mut hs, _, _) = client();
        let mut b =
            BytesMut::from(&b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x06\x00\x00\x00\x00"[..]);
        let e = hs.feed(&mut b).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the server sent a frame of type 0x06 where the ServerKey frame belongs"
        );
        assert_eq!(
            hs.closed().to_string(),
            "the connection closed while waiting for the ServerKey frame"
        );
    }

    #[test]
    fn a_header_key_that_differs_from_the_frame_is_refused() {
        let server = Server {
            secret: SecretKey::generate(),
        };
        let other = SecretKey::generate().public();
        let (mut hs, _, _) = client();
        let mut b = BytesMut::from(&switching_protocols_response(&other)[..]);
        put_frame(
            &mut b,
            ft::SERVER_KEY,
            &[&server_key_payload(&server.key())],
        );
        assert!(matches!(
            hs.feed(&mut b),
            Err(HandshakeError::KeyMismatch { header, frame }) if header == other && frame == server.key()
        ));
    }

    #[test]
    fn a_server_info_from_another_key_does_not_open() {
        let server = Server {
            secret: SecretKey::generate(),
        };
        let (mut hs, _, secret) = client();
        let mut b = BytesMut::from(&server.hello()[..]);
        assert!(matches!(hs.feed(&mut b), Ok(Step::ServerKey { .. })));
        let impostor = SecretKey::generate();
        let mut si = Vec::new();
        put_frame(
            &mut si,
            ft::SERVER_INFO,
            &[&seal(&impostor, &secret.public(), b"{\"version\":2}")],
        );
        b.extend_from_slice(&si);
        assert!(matches!(
            hs.feed(&mut b),
            Err(HandshakeError::Proto(ProtoError::BoxOpen))
        ));
    }

    #[test]
    fn already_upgraded_streams_start_at_server_key() {
        let server = Server {
            secret: SecretKey::generate(),
        };
        let (mut hs, first) = ClientHandshake::new(
            SecretKey::generate(),
            ClientInfo::default(),
            Upgrade::AlreadyUpgraded,
        );
        assert!(first.is_empty());
        let mut b = BytesMut::new();
        put_frame(
            &mut b,
            ft::SERVER_KEY,
            &[&server_key_payload(&server.key())],
        );
        assert!(matches!(hs.feed(&mut b), Ok(Step::ServerKey { key, .. }) if key == server.key()));
    }

    #[test]
    fn host_headers_bracket_ipv6() {
        assert_eq!(host_header("relay.example", 443), "relay.example:443");
        assert_eq!(host_header("2001:db8::1", 8443), "[2001:db8::1]:8443");
        assert_eq!(host_header("[2001:db8::1]", 443), "[2001:db8::1]:443");
    }
}
