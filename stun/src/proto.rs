//! Sans-IO STUN core: parse a datagram, decide, write the reply. No sockets, no clocks, no
//! randomness: [`handle`] is a pure function of its inputs, so it is unit-tested on bytes alone.
//!
//! # What the server answers, and why
//!
//! | Input | Outcome |
//! | --- | --- |
//! | Shorter than 20 bytes, top two type bits set, length not a multiple of 4 or not equal to the rest of the datagram, an attribute running past the end, FINGERPRINT not last or not 4 bytes, CHANGE-REQUEST not 4 bytes | dropped, [`Outcome::Malformed`] |
//! | FINGERPRINT present but wrong (it is never required) | dropped, [`Outcome::BadFingerprint`] |
//! | Indication or response (any class other than request) | dropped, [`Outcome::Ignored`] |
//! | Binding request (0x0001) | success 0x0101 with XOR-MAPPED-ADDRESS |
//! | Request of any other method (TURN Allocate, …) | 400 Bad Request, so a misconfigured TURN client fails fast instead of retransmitting for 40 s; the reply is at most 20 bytes bigger than the smallest request |
//! | Request with a comprehension-required attribute (0x0000–0x7FFF) we do not understand | 420 Unknown Attribute listing them in UNKNOWN-ATTRIBUTES (at most [`MAX_UNKNOWN_LISTED`]) |
//! | Cookie-less RFC 3489 Binding request (type 0x0001, 16-byte transaction id), UDP only | success with MAPPED-ADDRESS and the 16-byte transaction id echoed |
//!
//! Replies are kept small (amplification): XOR-MAPPED-ADDRESS, plus SOFTWARE only when
//! configured, plus FINGERPRINT only when the request carried one. A plain 20-byte request gets
//! a 32-byte (IPv4) or 44-byte (IPv6) reply. RFC 5780 adds MAPPED-ADDRESS, RESPONSE-ORIGIN and
//! OTHER-ADDRESS, and is therefore opt-in.
//!
//! # Attributes understood (and ignored)
//!
//! * **ICE** — PRIORITY (0x0024) and USE-CANDIDATE (0x0025) are comprehension-required, so a
//!   strictly basic server would answer an ICE agent's Binding request (for example the RFC 5769
//!   §2.1 sample) with 420. They only matter to the ICE peer that receives a connectivity check;
//!   a server that just reports the reflexive address can honour such a request completely by
//!   ignoring them, so we treat them as understood. ICE-CONTROLLED/ICE-CONTROLLING (0x8029,
//!   0x802A) are comprehension-optional and ignored anyway.
//! * **Authentication** — USERNAME, MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256, USERHASH,
//!   REALM, NONCE, PASSWORD-ALGORITHM. RFC 8489 §9 makes both credential mechanisms optional
//!   per usage, and says a STUN server on the public Internet supporting ICE would have no
//!   authentication. This server authenticates nobody and has no secret to check them against,
//!   so it answers without MESSAGE-INTEGRITY; a client that insists on an integrity-protected
//!   response discards the answer, which is its choice. Answering 420 instead would break ICE
//!   agents that put USERNAME/MESSAGE-INTEGRITY on every check. As RFC 8489 §14.5 requires,
//!   attributes after MESSAGE-INTEGRITY (other than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT)
//!   and after MESSAGE-INTEGRITY-SHA256 (other than FINGERPRINT) are ignored, even unknown ones.
//! * **RFC 5780** — CHANGE-REQUEST (0x0003) is understood only on a UDP socket of an RFC 5780
//!   grid ([`Ctx::with_rfc5780`]); elsewhere it gets 420, as RFC 5780 §6.1 requires of a server
//!   without an alternate address and port ("MUST generate an error response of type 420").
//!   RESPONSE-PORT (0x0027, "send the reply to this port of my IP", used by the binding
//!   lifetime test and by coturn's `turnutils_stunclient`) is honoured on the same sockets
//!   only: it redirects to the requester's own IP, so it adds no reflection target beyond what
//!   a spoofed source already allows, and the feature is opt-in. PADDING (0x0026) is never
//!   supported (420, which RFC 5780 §5 tells clients to expect; with RESPONSE-PORT, 400 as
//!   §6.1 says).
//! * RESPONSE-ADDRESS (0x0002, RFC 3489) is not honoured (it reflects replies at third parties):
//!   420.
//!
//! # RFC 3489 (cookie-less) requests
//!
//! Debian's `stun` client and `pystun3` send RFC 3489 Binding requests: no magic cookie, a
//! 128-bit transaction id. They get a MAPPED-ADDRESS reply (3489 clients do not know
//! XOR-MAPPED-ADDRESS, whose type is comprehension-required for them) with the whole 16-byte
//! id echoed. For an IPv6 source the MAPPED-ADDRESS uses the RFC 5389 IPv6 family (0x02):
//! RFC 3489 predates IPv6 support, and an address is more useful than silence. With RFC 5780
//! enabled the reply also carries SOURCE-ADDRESS and CHANGED-ADDRESS, as RFC 3489 §11.2 defines
//! them. Without RFC 5780, a cookie-less CHANGE-REQUEST with both flags clear is honoured (the
//! reply comes from the same address, which is all it asks): Debian's `stun` client puts one on
//! its first test, and RFC 5780's 420 rule is written for RFC 5389 messages. With a flag set it
//! gets 420. Other cookie-less messages, and cookie-less messages over TCP, are malformed.

use std::net::{IpAddr, SocketAddr};

// The codec is ferry-proto's; these paths stay for this crate's users.
pub use ferry_proto::stun::{
    attr, be16, be32, binding_request, class_of, decode_address, fingerprint_of, message_type,
    method_of, padded, Attribute, Attributes, Class, FingerprintStatus, Message, MessageWriter,
    ParseError, BINDING_ERROR, BINDING_INDICATION, BINDING_REQUEST, BINDING_SUCCESS, COOKIE_BYTES,
    FINGERPRINT_XOR, HEADER_LEN, MAGIC_COOKIE, MAX_SOFTWARE_CHARS, METHOD_BINDING,
};

/// `out` passed to [`handle`] must be at least this long; no reply is longer.
pub const MAX_RESPONSE_LEN: usize = 1024;
/// UNKNOWN-ATTRIBUTES in a 420 lists at most this many attribute types.
pub const MAX_UNKNOWN_LISTED: usize = 32;

/// The transport a message arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP datagrams.
    Udp,
    /// TCP stream, framed by the STUN length field.
    Tcp,
}

impl Transport {
    /// The `transport` metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// What happened to one received message; the `result` label of `ferry_stun_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestResult {
    /// Answered with a success response.
    Success,
    /// Answered with an error response (400, 420).
    ErrorResponse,
    /// Not a valid STUN message; dropped.
    Malformed,
    /// A valid message that is not answered (indication, response); dropped.
    Ignored,
    /// FINGERPRINT present but wrong; dropped.
    BadFingerprint,
}

impl RequestResult {
    /// Every result, in [`RequestResult::index`] order.
    pub const ALL: [RequestResult; 5] = [
        RequestResult::Success,
        RequestResult::ErrorResponse,
        RequestResult::Malformed,
        RequestResult::Ignored,
        RequestResult::BadFingerprint,
    ];

    /// The `result` metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestResult::Success => "success",
            RequestResult::ErrorResponse => "error_response",
            RequestResult::Malformed => "malformed",
            RequestResult::Ignored => "ignored",
            RequestResult::BadFingerprint => "bad_fingerprint",
        }
    }

    /// Position in [`RequestResult::ALL`], for per-batch tallies.
    pub fn index(self) -> usize {
        match self {
            RequestResult::Success => 0,
            RequestResult::ErrorResponse => 1,
            RequestResult::Malformed => 2,
            RequestResult::Ignored => 3,
            RequestResult::BadFingerprint => 4,
        }
    }
}

/// Which socket of the RFC 5780 grid sends a reply, relative to the one that received the
/// request: the CHANGE-REQUEST flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Change {
    /// Send from the other IP address.
    pub ip: bool,
    /// Send from the other port.
    pub port: bool,
}

impl Change {
    /// Reply from the socket that received the request.
    pub const NONE: Change = Change {
        ip: false,
        port: false,
    };
}

/// The result of [`handle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send `out[..len]` back to the source, from the receiving socket moved by `change`
    /// (always [`Change::NONE`], and `response_port` always `None`, unless RFC 5780 is enabled
    /// in the [`Ctx`]).
    Success {
        /// Reply length in `out`.
        len: usize,
        /// Which grid socket sends it.
        change: Change,
        /// RFC 5780 RESPONSE-PORT: send to this port of the source IP instead of the source
        /// port (only with RFC 5780 enabled).
        response_port: Option<u16>,
    },
    /// Send the error response `out[..len]` back to the source from the receiving socket.
    ErrorResponse {
        /// Reply length in `out`.
        len: usize,
        /// The STUN error code (400 or 420).
        code: u16,
    },
    /// Drop: not a valid STUN message.
    Malformed,
    /// Drop: FINGERPRINT mismatch.
    BadFingerprint,
    /// Drop: valid, but not a request.
    Ignored,
}

impl Outcome {
    /// The metric result for this outcome.
    pub fn result(&self) -> RequestResult {
        match self {
            Outcome::Success { .. } => RequestResult::Success,
            Outcome::ErrorResponse { .. } => RequestResult::ErrorResponse,
            Outcome::Malformed => RequestResult::Malformed,
            Outcome::BadFingerprint => RequestResult::BadFingerprint,
            Outcome::Ignored => RequestResult::Ignored,
        }
    }

    /// Where and how to send the reply, if there is one.
    pub fn reply(&self) -> Option<Reply> {
        match *self {
            Outcome::Success {
                len,
                change,
                response_port,
            } => Some(Reply {
                len,
                change,
                response_port,
            }),
            Outcome::ErrorResponse { len, .. } => Some(Reply {
                len,
                change: Change::NONE,
                response_port: None,
            }),
            _ => None,
        }
    }
}

/// A reply to send: `out[..len]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Length of the reply in `out`.
    pub len: usize,
    /// Which grid socket sends it, relative to the receiving one.
    pub change: Change,
    /// Destination port override (RFC 5780 RESPONSE-PORT).
    pub response_port: Option<u16>,
}

impl Reply {
    /// Sent from the receiving socket back to the source: the common case.
    pub fn is_direct(&self) -> bool {
        self.change == Change::NONE && self.response_port.is_none()
    }

    /// The address to send the reply to, for a request from `src`.
    pub fn destination(&self, src: SocketAddr) -> SocketAddr {
        match self.response_port {
            Some(port) => SocketAddr::new(src.ip(), port),
            None => src,
        }
    }
}

/// The RFC 5780 address grid: two IP addresses × two ports, four UDP sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Grid {
    /// `[primary, alternate]` IP address (A1, A2 in RFC 5780 §6.1).
    pub ips: [IpAddr; 2],
    /// `[primary, alternate]` port (P1, P2).
    pub ports: [u16; 2],
}

/// A position in the [`Grid`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GridPos {
    /// Uses the alternate IP address.
    pub alternate_ip: bool,
    /// Uses the alternate port.
    pub alternate_port: bool,
}

impl GridPos {
    /// The four positions: primary/primary, primary IP/alternate port, alternate IP/primary
    /// port, alternate/alternate.
    pub const ALL: [GridPos; 4] = [
        GridPos {
            alternate_ip: false,
            alternate_port: false,
        },
        GridPos {
            alternate_ip: false,
            alternate_port: true,
        },
        GridPos {
            alternate_ip: true,
            alternate_port: false,
        },
        GridPos {
            alternate_ip: true,
            alternate_port: true,
        },
    ];

    /// The position a reply with `change` is sent from.
    pub fn changed(self, change: Change) -> GridPos {
        GridPos {
            alternate_ip: self.alternate_ip ^ change.ip,
            alternate_port: self.alternate_port ^ change.port,
        }
    }

    /// Index in [`GridPos::ALL`].
    pub fn index(self) -> usize {
        (usize::from(self.alternate_ip) << 1) | usize::from(self.alternate_port)
    }
}

impl Grid {
    /// The socket address at `pos`.
    pub fn addr(&self, pos: GridPos) -> SocketAddr {
        SocketAddr::new(
            self.ips[usize::from(pos.alternate_ip)],
            self.ports[usize::from(pos.alternate_port)],
        )
    }
}

/// The SOFTWARE value is longer than RFC 8489 allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "SOFTWARE value has {chars} characters but RFC 8489 allows at most {MAX_SOFTWARE_CHARS}: \
     shorten it (a product name and version is enough)"
)]
pub struct SoftwareTooLong {
    /// Length of the rejected value in characters.
    pub chars: usize,
}

/// What [`handle`] needs to know about the socket a message arrived on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ctx {
    transport: Transport,
    software: Option<Box<[u8]>>,
    rfc5780: Option<(Grid, GridPos)>,
}

impl Ctx {
    /// A context for `transport`, without SOFTWARE and without RFC 5780.
    pub fn new(transport: Transport) -> Ctx {
        Ctx {
            transport,
            software: None,
            rfc5780: None,
        }
    }

    /// Put SOFTWARE with this value into every reply (`None`: omit it, the default).
    pub fn with_software(mut self, software: Option<&str>) -> Result<Ctx, SoftwareTooLong> {
        self.software = match software {
            Some(s) if s.chars().count() > MAX_SOFTWARE_CHARS => {
                return Err(SoftwareTooLong {
                    chars: s.chars().count(),
                })
            }
            Some(s) => Some(s.as_bytes().into()),
            None => None,
        };
        Ok(self)
    }

    /// Enable RFC 5780 for a socket sitting at `local` in `grid`: CHANGE-REQUEST is honoured
    /// and replies carry MAPPED-ADDRESS, RESPONSE-ORIGIN and OTHER-ADDRESS. Only UDP contexts
    /// use it (a TCP reply cannot come from another socket); over TCP it is ignored.
    pub fn with_rfc5780(mut self, grid: Grid, local: GridPos) -> Ctx {
        self.rfc5780 = Some((grid, local));
        self
    }

    /// The transport of this context.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    fn behavior(&self) -> Option<(Grid, GridPos)> {
        match self.transport {
            Transport::Udp => self.rfc5780,
            Transport::Tcp => None,
        }
    }
}

/// Handle one received message from `src` and write the reply, if any, into `out`.
///
/// Deterministic and allocation-free. The plain 20-byte Binding request (the overwhelmingly
/// common case) takes a short hand-written path; everything else is parsed in full.
///
/// # Panics
///
/// If `out` is shorter than [`MAX_RESPONSE_LEN`].
pub fn handle(request: &[u8], src: SocketAddr, ctx: &Ctx, out: &mut [u8]) -> Outcome {
    assert!(
        out.len() >= MAX_RESPONSE_LEN,
        "handle() needs an output buffer of at least MAX_RESPONSE_LEN bytes"
    );
    // Fast path: a plain Binding request, no attributes.
    if request.len() == HEADER_LEN
        && request[..4] == [0x00, 0x01, 0x00, 0x00]
        && request[4..8] == COOKIE_BYTES
        && ctx.rfc5780.is_none()
    {
        let mut w = MessageWriter::new(out);
        w.header(BINDING_SUCCESS, request);
        w.xor_address(attr::XOR_MAPPED_ADDRESS, canonical(src), request);
        if let Some(sw) = &ctx.software {
            w.bytes_attr(attr::SOFTWARE, sw);
        }
        let len = w.finish(false);
        return Outcome::Success {
            len,
            change: Change::NONE,
            response_port: None,
        };
    }

    let msg = match Message::parse(request) {
        Ok(m) => m,
        Err(_) => return Outcome::Malformed,
    };
    if !msg.has_magic_cookie() {
        return handle_classic(&msg, src, ctx, out);
    }
    let had_fingerprint = match msg.fingerprint() {
        FingerprintStatus::Invalid => return Outcome::BadFingerprint,
        FingerprintStatus::Valid => true,
        FingerprintStatus::Absent => false,
    };
    if msg.class() != Class::Request {
        return Outcome::Ignored;
    }

    let behavior = ctx.behavior();
    let mut unknown = Unknown::default();
    let mut change = None;
    let mut response_port = None;
    let mut padding = false;
    // RFC 8489 §14.5: after MESSAGE-INTEGRITY only MESSAGE-INTEGRITY-SHA256 and FINGERPRINT
    // count; after MESSAGE-INTEGRITY-SHA256 only FINGERPRINT.
    let mut after_mi = false;
    let mut after_mi256 = false;
    for a in msg.attributes() {
        if after_mi256 || (after_mi && a.typ != attr::MESSAGE_INTEGRITY_SHA256) {
            continue;
        }
        match a.typ {
            attr::MESSAGE_INTEGRITY => after_mi = true,
            attr::MESSAGE_INTEGRITY_SHA256 => after_mi256 = true,
            attr::CHANGE_REQUEST if behavior.is_some() => {
                if a.value.len() != 4 {
                    return Outcome::Malformed;
                }
                change = Some(change_flags(a.value));
            }
            attr::RESPONSE_PORT if behavior.is_some() => {
                // A port and two bytes of padding; port 0 cannot be answered.
                if a.value.len() != 4 || be16(a.value, 0) == 0 {
                    return Outcome::Malformed;
                }
                response_port = Some(be16(a.value, 0));
            }
            attr::PADDING => {
                padding = true;
                unknown.push(attr::PADDING);
            }
            attr::USERNAME
            | attr::USERHASH
            | attr::REALM
            | attr::NONCE
            | attr::PASSWORD_ALGORITHM
            | attr::PRIORITY
            | attr::USE_CANDIDATE => {}
            t if t < 0x8000 => unknown.push(t),
            _ => {}
        }
    }

    let method = msg.method();
    // Methods other than Binding, and (RFC 5780 §6.1) PADDING together with RESPONSE-PORT: 400.
    if method != METHOD_BINDING || (padding && response_port.is_some()) {
        return error_response(
            &msg,
            method,
            400,
            "Bad Request",
            &[],
            false,
            ctx,
            out,
            had_fingerprint,
        );
    }
    if !unknown.is_empty() {
        return error_response(
            &msg,
            method,
            420,
            "Unknown Attribute",
            unknown.as_slice(),
            false,
            ctx,
            out,
            had_fingerprint,
        );
    }

    let change = change.unwrap_or(Change::NONE);
    let src = canonical(src);
    let mut w = MessageWriter::new(out);
    w.header(BINDING_SUCCESS, request);
    w.xor_address(attr::XOR_MAPPED_ADDRESS, src, request);
    if let Some((grid, local)) = behavior {
        // RFC 5780 §6.1: MAPPED-ADDRESS too, RESPONSE-ORIGIN (where the reply leaves from),
        // OTHER-ADDRESS (the alternate IP and port of the receiving socket, whatever the flags).
        w.address(attr::MAPPED_ADDRESS, src);
        w.address(attr::RESPONSE_ORIGIN, grid.addr(local.changed(change)));
        w.address(
            attr::OTHER_ADDRESS,
            grid.addr(local.changed(Change {
                ip: true,
                port: true,
            })),
        );
    }
    if let Some(sw) = &ctx.software {
        w.bytes_attr(attr::SOFTWARE, sw);
    }
    let len = w.finish(had_fingerprint);
    Outcome::Success {
        len,
        change,
        response_port,
    }
}

/// RFC 3489 request: no magic cookie, 16-byte transaction id.
fn handle_classic(msg: &Message<'_>, src: SocketAddr, ctx: &Ctx, out: &mut [u8]) -> Outcome {
    if ctx.transport != Transport::Udp || msg.message_type() != BINDING_REQUEST {
        return Outcome::Malformed;
    }
    let behavior = ctx.behavior();
    let mut unknown = Unknown::default();
    let mut change = None;
    for a in msg.attributes() {
        match a.typ {
            attr::CHANGE_REQUEST => {
                if a.value.len() != 4 {
                    return Outcome::Malformed;
                }
                let flags = change_flags(a.value);
                if behavior.is_some() {
                    change = Some(flags);
                } else if flags != Change::NONE {
                    // Cannot answer from another address: say so.
                    unknown.push(attr::CHANGE_REQUEST);
                }
            }
            attr::USERNAME | attr::PASSWORD | attr::MESSAGE_INTEGRITY => {}
            t if t < 0x8000 => unknown.push(t),
            _ => {}
        }
    }
    if !unknown.is_empty() {
        return error_response(
            msg,
            METHOD_BINDING,
            420,
            "Unknown Attribute",
            unknown.as_slice(),
            true,
            ctx,
            out,
            false,
        );
    }
    let change = change.unwrap_or(Change::NONE);
    let request = msg.bytes();
    let mut w = MessageWriter::new(out);
    w.header(BINDING_SUCCESS, request);
    w.address(attr::MAPPED_ADDRESS, canonical(src));
    if let Some((grid, local)) = behavior {
        w.address(attr::SOURCE_ADDRESS, grid.addr(local.changed(change)));
        w.address(
            attr::CHANGED_ADDRESS,
            grid.addr(local.changed(Change {
                ip: true,
                port: true,
            })),
        );
    }
    if let Some(sw) = &ctx.software {
        w.bytes_attr(attr::SOFTWARE, sw);
    }
    let len = w.finish(false);
    Outcome::Success {
        len,
        change,
        response_port: None,
    }
}

#[allow(clippy::too_many_arguments)]
fn error_response(
    msg: &Message<'_>,
    method: u16,
    code: u16,
    reason: &str,
    unknown: &[u16],
    classic: bool,
    ctx: &Ctx,
    out: &mut [u8],
    fingerprint: bool,
) -> Outcome {
    let mut w = MessageWriter::new(out);
    w.header(message_type(method, Class::Error), msg.bytes());
    w.error_code(code, reason);
    if !unknown.is_empty() {
        w.unknown_attributes(unknown, classic);
    }
    if let Some(sw) = &ctx.software {
        w.bytes_attr(attr::SOFTWARE, sw);
    }
    let len = w.finish(fingerprint);
    Outcome::ErrorResponse { len, code }
}

fn change_flags(value: &[u8]) -> Change {
    let flags = be32(value, 0);
    Change {
        ip: flags & 0x4 != 0,
        port: flags & 0x2 != 0,
    }
}

/// IPv4-mapped IPv6 sources are reported as the IPv4 address the client has.
fn canonical(src: SocketAddr) -> SocketAddr {
    SocketAddr::new(src.ip().to_canonical(), src.port())
}

/// Unknown comprehension-required attribute types, deduplicated, capped.
#[derive(Default)]
struct Unknown {
    types: [u16; MAX_UNKNOWN_LISTED],
    n: usize,
}

impl Unknown {
    fn push(&mut self, t: u16) {
        if self.n < MAX_UNKNOWN_LISTED && !self.as_slice().contains(&t) {
            self.types[self.n] = t;
            self.n += 1;
        }
    }

    fn as_slice(&self) -> &[u16] {
        &self.types[..self.n]
    }

    fn is_empty(&self) -> bool {
        self.n == 0
    }
}

#[cfg(test)]
mod tests;
