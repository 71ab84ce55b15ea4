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

/// The fixed magic cookie of RFC 5389/8489 messages.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// XORed into the CRC-32 of a message to form FINGERPRINT.
pub const FINGERPRINT_XOR: u32 = 0x5354_554E;
/// Length of the STUN header.
pub const HEADER_LEN: usize = 20;
/// `out` passed to [`handle`] must be at least this long; no reply is longer.
pub const MAX_RESPONSE_LEN: usize = 1024;
/// Most characters RFC 8489 §14.14 allows in SOFTWARE ("fewer than 128 characters").
pub const MAX_SOFTWARE_CHARS: usize = 127;
/// UNKNOWN-ATTRIBUTES in a 420 lists at most this many attribute types.
pub const MAX_UNKNOWN_LISTED: usize = 32;

/// Binding request message type.
pub const BINDING_REQUEST: u16 = 0x0001;
/// Binding indication message type.
pub const BINDING_INDICATION: u16 = 0x0011;
/// Binding success response message type.
pub const BINDING_SUCCESS: u16 = 0x0101;
/// Binding error response message type.
pub const BINDING_ERROR: u16 = 0x0111;
/// The Binding method.
pub const METHOD_BINDING: u16 = 0x001;

const COOKIE_BYTES: [u8; 4] = MAGIC_COOKIE.to_be_bytes();

/// Attribute types used or recognised by this crate.
pub mod attr {
    /// MAPPED-ADDRESS (RFC 3489/8489).
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    /// RESPONSE-ADDRESS (RFC 3489; not honoured).
    pub const RESPONSE_ADDRESS: u16 = 0x0002;
    /// CHANGE-REQUEST (RFC 5780 §7.2, RFC 3489).
    pub const CHANGE_REQUEST: u16 = 0x0003;
    /// SOURCE-ADDRESS (RFC 3489 responses).
    pub const SOURCE_ADDRESS: u16 = 0x0004;
    /// CHANGED-ADDRESS (RFC 3489 responses; same code point as OTHER-ADDRESS's predecessor).
    pub const CHANGED_ADDRESS: u16 = 0x0005;
    /// USERNAME.
    pub const USERNAME: u16 = 0x0006;
    /// PASSWORD (RFC 3489).
    pub const PASSWORD: u16 = 0x0007;
    /// MESSAGE-INTEGRITY (HMAC-SHA1).
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    /// ERROR-CODE.
    pub const ERROR_CODE: u16 = 0x0009;
    /// UNKNOWN-ATTRIBUTES.
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    /// REALM.
    pub const REALM: u16 = 0x0014;
    /// NONCE.
    pub const NONCE: u16 = 0x0015;
    /// MESSAGE-INTEGRITY-SHA256 (RFC 8489).
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    /// PASSWORD-ALGORITHM (RFC 8489).
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    /// USERHASH (RFC 8489).
    pub const USERHASH: u16 = 0x001E;
    /// XOR-MAPPED-ADDRESS.
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    /// PRIORITY (ICE, RFC 8445).
    pub const PRIORITY: u16 = 0x0024;
    /// USE-CANDIDATE (ICE, RFC 8445).
    pub const USE_CANDIDATE: u16 = 0x0025;
    /// PADDING (RFC 5780; not supported).
    pub const PADDING: u16 = 0x0026;
    /// RESPONSE-PORT (RFC 5780; not supported).
    pub const RESPONSE_PORT: u16 = 0x0027;
    /// PASSWORD-ALGORITHMS (RFC 8489).
    pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
    /// ALTERNATE-DOMAIN (RFC 8489).
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    /// SOFTWARE.
    pub const SOFTWARE: u16 = 0x8022;
    /// ALTERNATE-SERVER.
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    /// FINGERPRINT.
    pub const FINGERPRINT: u16 = 0x8028;
    /// ICE-CONTROLLED (ICE).
    pub const ICE_CONTROLLED: u16 = 0x8029;
    /// ICE-CONTROLLING (ICE).
    pub const ICE_CONTROLLING: u16 = 0x802A;
    /// RESPONSE-ORIGIN (RFC 5780).
    pub const RESPONSE_ORIGIN: u16 = 0x802B;
    /// OTHER-ADDRESS (RFC 5780).
    pub const OTHER_ADDRESS: u16 = 0x802C;
}

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

/// The STUN message class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// Request (0b00).
    Request,
    /// Indication (0b01).
    Indication,
    /// Success response (0b10).
    Success,
    /// Error response (0b11).
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0,
            Class::Indication => 1,
            Class::Success => 2,
            Class::Error => 3,
        }
    }
}

/// The class bits of a message type.
pub fn class_of(message_type: u16) -> Class {
    match ((message_type >> 4) & 1) | ((message_type >> 7) & 2) {
        0 => Class::Request,
        1 => Class::Indication,
        2 => Class::Success,
        _ => Class::Error,
    }
}

/// The method bits of a message type.
pub fn method_of(message_type: u16) -> u16 {
    (message_type & 0x000F) | ((message_type & 0x00E0) >> 1) | ((message_type & 0x3E00) >> 2)
}

/// Compose a message type from a method and a class.
pub fn message_type(method: u16, class: Class) -> u16 {
    let c = class.bits();
    (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 1) << 4)
        | ((c & 2) << 7)
}

/// Why a datagram is not a STUN message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than the 20-byte header.
    #[error("shorter than the 20-byte STUN header")]
    TooShort,
    /// The top two bits of the message type are not zero.
    #[error("top two bits of the message type are not zero")]
    BadTopBits,
    /// The length field is not a multiple of 4 or does not match the datagram.
    #[error("length field is not a multiple of 4 or does not match the message size")]
    BadLength,
    /// An attribute runs past the end of the message.
    #[error("an attribute runs past the end of the message")]
    TruncatedAttribute,
    /// FINGERPRINT is not the last attribute, or is not 4 bytes.
    #[error("FINGERPRINT is not the last attribute or is not 4 bytes long")]
    BadFingerprintPlacement,
}

/// One attribute of a parsed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attribute<'a> {
    /// Attribute type.
    pub typ: u16,
    /// Value, without padding.
    pub value: &'a [u8],
    /// Offset of the attribute header in the message.
    pub offset: usize,
}

/// Iterator over the attributes of a [`Message`].
#[derive(Clone, Debug)]
pub struct Attributes<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Attribute<'a>;

    fn next(&mut self) -> Option<Attribute<'a>> {
        // `Message::parse` validated the layout, so this cannot run out of bounds.
        if self.pos + 4 > self.bytes.len() {
            return None;
        }
        let typ = be16(self.bytes, self.pos);
        let len = usize::from(be16(self.bytes, self.pos + 2));
        let offset = self.pos;
        let value = self.bytes.get(offset + 4..offset + 4 + len)?;
        self.pos = offset + 4 + padded(len);
        Some(Attribute { typ, value, offset })
    }
}

/// Whether a message's FINGERPRINT checks out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FingerprintStatus {
    /// No FINGERPRINT attribute.
    Absent,
    /// FINGERPRINT matches.
    Valid,
    /// FINGERPRINT does not match.
    Invalid,
}

/// A structurally valid STUN message (header and attribute layout checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    bytes: &'a [u8],
    fingerprint_at: Option<usize>,
}

impl<'a> Message<'a> {
    /// Check the header and the attribute layout. Cookie-less (RFC 3489) messages are accepted
    /// here; FINGERPRINT placement is checked only for messages with the magic cookie.
    pub fn parse(bytes: &'a [u8]) -> Result<Message<'a>, ParseError> {
        if bytes.len() < HEADER_LEN {
            return Err(ParseError::TooShort);
        }
        if bytes[0] & 0xC0 != 0 {
            return Err(ParseError::BadTopBits);
        }
        let len = usize::from(be16(bytes, 2));
        if !len.is_multiple_of(4) || HEADER_LEN + len != bytes.len() {
            return Err(ParseError::BadLength);
        }
        let cookie = bytes[4..8] == COOKIE_BYTES;
        let mut pos = HEADER_LEN;
        let mut fingerprint_at = None;
        while pos < bytes.len() {
            if pos + 4 > bytes.len() {
                return Err(ParseError::TruncatedAttribute);
            }
            let typ = be16(bytes, pos);
            let alen = usize::from(be16(bytes, pos + 2));
            let end = pos + 4 + padded(alen);
            if end > bytes.len() {
                return Err(ParseError::TruncatedAttribute);
            }
            if cookie {
                if fingerprint_at.is_some() {
                    return Err(ParseError::BadFingerprintPlacement);
                }
                if typ == attr::FINGERPRINT {
                    if alen != 4 {
                        return Err(ParseError::BadFingerprintPlacement);
                    }
                    fingerprint_at = Some(pos);
                }
            }
            pos = end;
        }
        Ok(Message {
            bytes,
            fingerprint_at,
        })
    }

    /// The raw message.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The message type.
    pub fn message_type(&self) -> u16 {
        be16(self.bytes, 0)
    }

    /// The message class.
    pub fn class(&self) -> Class {
        class_of(self.message_type())
    }

    /// The message method.
    pub fn method(&self) -> u16 {
        method_of(self.message_type())
    }

    /// Whether the magic cookie is present (RFC 5389 and later).
    pub fn has_magic_cookie(&self) -> bool {
        self.bytes[4..8] == COOKIE_BYTES
    }

    /// The transaction id: 12 bytes, or 16 for a cookie-less RFC 3489 message.
    pub fn transaction_id(&self) -> &'a [u8] {
        if self.has_magic_cookie() {
            &self.bytes[8..20]
        } else {
            &self.bytes[4..20]
        }
    }

    /// The attributes in order.
    pub fn attributes(&self) -> Attributes<'a> {
        Attributes {
            bytes: self.bytes,
            pos: HEADER_LEN,
        }
    }

    /// The value of the first attribute of type `typ`.
    pub fn attribute(&self, typ: u16) -> Option<&'a [u8]> {
        self.attributes().find(|a| a.typ == typ).map(|a| a.value)
    }

    /// Verify FINGERPRINT (CRC-32 of everything before it, XOR 0x5354554E).
    pub fn fingerprint(&self) -> FingerprintStatus {
        match self.fingerprint_at {
            None => FingerprintStatus::Absent,
            Some(at) => {
                if fingerprint_of(&self.bytes[..at]) == be32(self.bytes, at + 4) {
                    FingerprintStatus::Valid
                } else {
                    FingerprintStatus::Invalid
                }
            }
        }
    }

    /// Decode an address attribute of type `typ` (MAPPED-ADDRESS format, or XOR format for
    /// XOR-MAPPED-ADDRESS).
    pub fn address(&self, typ: u16) -> Option<SocketAddr> {
        let value = self.attribute(typ)?;
        if typ == attr::XOR_MAPPED_ADDRESS {
            let key: &[u8; 16] = self.bytes[4..20].try_into().ok()?;
            decode_address(value, Some(key))
        } else {
            decode_address(value, None)
        }
    }

    /// The reflexive address: XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS.
    pub fn mapped_address(&self) -> Option<SocketAddr> {
        self.address(attr::XOR_MAPPED_ADDRESS)
            .or_else(|| self.address(attr::MAPPED_ADDRESS))
    }

    /// ERROR-CODE as (code, reason phrase).
    pub fn error_code(&self) -> Option<(u16, &'a str)> {
        let v = self.attribute(attr::ERROR_CODE)?;
        if v.len() < 4 {
            return None;
        }
        let code = u16::from(v[2] & 0x07) * 100 + u16::from(v[3]);
        Some((code, std::str::from_utf8(&v[4..]).ok()?))
    }

    /// The types listed in UNKNOWN-ATTRIBUTES.
    pub fn unknown_attributes(&self) -> Vec<u16> {
        self.attribute(attr::UNKNOWN_ATTRIBUTES)
            .map(|v| v.chunks_exact(2).map(|c| be16(c, 0)).collect())
            .unwrap_or_default()
    }
}

/// Decode a MAPPED-ADDRESS-format value; with `xor_key` (bytes 4..20 of the message: cookie and
/// transaction id), the XOR-MAPPED-ADDRESS format.
pub fn decode_address(value: &[u8], xor_key: Option<&[u8; 16]>) -> Option<SocketAddr> {
    if value.len() < 4 {
        return None;
    }
    let zero = [0u8; 16];
    let key = xor_key.unwrap_or(&zero);
    let port = be16(value, 2) ^ u16::from_be_bytes([key[0], key[1]]);
    match (value[1], value.len()) {
        (0x01, 8) => {
            let mut ip = [0u8; 4];
            for (i, b) in ip.iter_mut().enumerate() {
                *b = value[4 + i] ^ key[i];
            }
            Some(SocketAddr::new(IpAddr::from(ip), port))
        }
        (0x02, 20) => {
            let mut ip = [0u8; 16];
            for (i, b) in ip.iter_mut().enumerate() {
                *b = value[4 + i] ^ key[i];
            }
            Some(SocketAddr::new(IpAddr::from(ip), port))
        }
        _ => None,
    }
}

/// FINGERPRINT value of `bytes` (which must already carry the final length in the header).
pub fn fingerprint_of(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes) ^ FINGERPRINT_XOR
}

/// Build a Binding request with the magic cookie and `transaction_id`; with `software`, a
/// SOFTWARE attribute; with `fingerprint`, a FINGERPRINT. (A client helper: the load generator
/// and the tests use it.)
pub fn binding_request(
    transaction_id: [u8; 12],
    software: Option<&str>,
    fingerprint: bool,
) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    msg.extend_from_slice(&[0, 0]);
    msg.extend_from_slice(&COOKIE_BYTES);
    msg.extend_from_slice(&transaction_id);
    if let Some(s) = software {
        msg.extend_from_slice(&attr::SOFTWARE.to_be_bytes());
        msg.extend_from_slice(&(s.len() as u16).to_be_bytes());
        msg.extend_from_slice(s.as_bytes());
        msg.resize(HEADER_LEN + padded(msg.len() - HEADER_LEN), 0);
    }
    if fingerprint {
        let len = (msg.len() - HEADER_LEN + 8) as u16;
        msg[2..4].copy_from_slice(&len.to_be_bytes());
        let fp = fingerprint_of(&msg);
        msg.extend_from_slice(&attr::FINGERPRINT.to_be_bytes());
        msg.extend_from_slice(&4u16.to_be_bytes());
        msg.extend_from_slice(&fp.to_be_bytes());
    }
    let len = (msg.len() - HEADER_LEN) as u16;
    msg[2..4].copy_from_slice(&len.to_be_bytes());
    msg
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
        let mut w = Writer::new(out);
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
    let mut w = Writer::new(out);
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
    let mut w = Writer::new(out);
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
    let mut w = Writer::new(out);
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

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn padded(len: usize) -> usize {
    (len + 3) & !3
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

/// Appends a reply into the caller's buffer (sized by `MAX_RESPONSE_LEN`, so no bounds
/// failures are possible for the replies this module writes).
struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    fn new(buf: &'a mut [u8]) -> Writer<'a> {
        Writer { buf, pos: 0 }
    }

    fn put(&mut self, bytes: &[u8]) {
        self.buf[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
    }

    fn pad(&mut self) {
        while !self.pos.is_multiple_of(4) {
            self.buf[self.pos] = 0;
            self.pos += 1;
        }
    }

    /// Header with the request's cookie and transaction id (bytes 4..20, also the whole
    /// 16-byte id of an RFC 3489 request); the length is filled in by `finish`.
    fn header(&mut self, typ: u16, request: &[u8]) {
        self.put(&typ.to_be_bytes());
        self.put(&[0, 0]);
        self.put(&request[4..HEADER_LEN]);
    }

    fn attr_header(&mut self, typ: u16, len: usize) {
        self.put(&typ.to_be_bytes());
        self.put(&(len as u16).to_be_bytes());
    }

    fn bytes_attr(&mut self, typ: u16, value: &[u8]) {
        self.attr_header(typ, value.len());
        self.put(value);
        self.pad();
    }

    fn address(&mut self, typ: u16, addr: SocketAddr) {
        match addr.ip() {
            IpAddr::V4(ip) => {
                self.attr_header(typ, 8);
                self.put(&[0, 0x01]);
                self.put(&addr.port().to_be_bytes());
                self.put(&ip.octets());
            }
            IpAddr::V6(ip) => {
                self.attr_header(typ, 20);
                self.put(&[0, 0x02]);
                self.put(&addr.port().to_be_bytes());
                self.put(&ip.octets());
            }
        }
    }

    /// XOR-MAPPED-ADDRESS: port ^ top of cookie, IPv4 ^ cookie, IPv6 ^ cookie‖transaction id
    /// — that is, bytes 4..20 of the request.
    fn xor_address(&mut self, typ: u16, addr: SocketAddr, request: &[u8]) {
        let key = &request[4..HEADER_LEN];
        let port = addr.port() ^ u16::from_be_bytes([key[0], key[1]]);
        match addr.ip() {
            IpAddr::V4(ip) => {
                let o = ip.octets();
                self.attr_header(typ, 8);
                self.put(&[0, 0x01]);
                self.put(&port.to_be_bytes());
                self.put(&[o[0] ^ key[0], o[1] ^ key[1], o[2] ^ key[2], o[3] ^ key[3]]);
            }
            IpAddr::V6(ip) => {
                let mut o = ip.octets();
                for (b, k) in o.iter_mut().zip(key) {
                    *b ^= k;
                }
                self.attr_header(typ, 20);
                self.put(&[0, 0x02]);
                self.put(&port.to_be_bytes());
                self.put(&o);
            }
        }
    }

    fn error_code(&mut self, code: u16, reason: &str) {
        self.attr_header(attr::ERROR_CODE, 4 + reason.len());
        self.put(&[0, 0, (code / 100) as u8, (code % 100) as u8]);
        self.put(reason.as_bytes());
        self.pad();
    }

    /// UNKNOWN-ATTRIBUTES. RFC 3489 §11.2.9 pads an odd list by repeating an entry; RFC 5389
    /// and later use ordinary padding.
    fn unknown_attributes(&mut self, types: &[u16], classic: bool) {
        let repeat = classic && !types.len().is_multiple_of(2);
        let n = types.len() + usize::from(repeat);
        self.attr_header(attr::UNKNOWN_ATTRIBUTES, 2 * n);
        for t in types {
            self.put(&t.to_be_bytes());
        }
        if repeat {
            self.put(&types[0].to_be_bytes());
        }
        self.pad();
    }

    /// Set the length; append FINGERPRINT if asked. Returns the total length.
    fn finish(mut self, fingerprint: bool) -> usize {
        let body = self.pos - HEADER_LEN + if fingerprint { 8 } else { 0 };
        self.buf[2..4].copy_from_slice(&(body as u16).to_be_bytes());
        if fingerprint {
            let fp = fingerprint_of(&self.buf[..self.pos]);
            self.attr_header(attr::FINGERPRINT, 4);
            self.put(&fp.to_be_bytes());
        }
        self.pos
    }
}

#[cfg(test)]
mod tests;
