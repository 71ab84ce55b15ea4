//! The STUN message codec (RFC 8489, and RFC 3489's cookie-less form): parse a message, walk
//! its attributes, check FINGERPRINT, decode (XOR-)MAPPED-ADDRESS, write a message. Sans-IO:
//! no sockets, no clocks. What a server answers (and refuses) is its policy, in `ferry-stun`;
//! the client helpers here build Binding requests and read their answers.

use std::net::{IpAddr, SocketAddr};

/// The fixed magic cookie of RFC 5389/8489 messages.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// XORed into the CRC-32 of a message to form FINGERPRINT.
pub const FINGERPRINT_XOR: u32 = 0x5354_554E;
/// Length of the STUN header.
pub const HEADER_LEN: usize = 20;
/// Most characters RFC 8489 §14.14 allows in SOFTWARE ("fewer than 128 characters").
pub const MAX_SOFTWARE_CHARS: usize = 127;

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

/// [`MAGIC_COOKIE`] as it appears on the wire.
pub const COOKIE_BYTES: [u8; 4] = MAGIC_COOKIE.to_be_bytes();

/// Attribute types.
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
    /// XOR-MAPPED-ADDRESS's pre-RFC 5389 code point, still sent by some servers (same format).
    pub const XOR_MAPPED_ADDRESS_OLD: u16 = 0x8020;
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
    /// XOR-MAPPED-ADDRESS and its old code point).
    pub fn address(&self, typ: u16) -> Option<SocketAddr> {
        let value = self.attribute(typ)?;
        if typ == attr::XOR_MAPPED_ADDRESS || typ == attr::XOR_MAPPED_ADDRESS_OLD {
            let key: &[u8; 16] = self.bytes[4..20].try_into().ok()?;
            decode_address(value, Some(key))
        } else {
            decode_address(value, None)
        }
    }

    /// The reflexive address: XOR-MAPPED-ADDRESS (or its old code point), else MAPPED-ADDRESS.
    pub fn mapped_address(&self) -> Option<SocketAddr> {
        self.address(attr::XOR_MAPPED_ADDRESS)
            .or_else(|| self.address(attr::XOR_MAPPED_ADDRESS_OLD))
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

/// The longest Binding request [`encode_binding_request`] writes (SOFTWARE at its limit, and
/// FINGERPRINT).
pub const MAX_BINDING_REQUEST_LEN: usize = HEADER_LEN + 4 + 4 * MAX_SOFTWARE_CHARS + 8;

/// A STUN transaction id (RFC 5389 and later).
pub type TxId = [u8; 12];

/// A fresh random transaction id.
pub fn new_txid() -> TxId {
    rand::random()
}

/// Writes a Binding request with the magic cookie and `txid` into `out`; with `software`, a
/// SOFTWARE attribute (cut to [`MAX_SOFTWARE_CHARS`] bytes); with `fingerprint`, a FINGERPRINT.
/// Returns its length. No allocation (load generators build requests in place).
///
/// # Panics
///
/// If `out` is shorter than the request (at most [`MAX_BINDING_REQUEST_LEN`]).
pub fn encode_binding_request(
    txid: &TxId,
    software: Option<&[u8]>,
    fingerprint: bool,
    out: &mut [u8],
) -> usize {
    let mut w = MessageWriter::new(out);
    w.put(&BINDING_REQUEST.to_be_bytes());
    w.put(&[0, 0]);
    w.put(&COOKIE_BYTES);
    w.put(txid);
    if let Some(s) = software {
        w.bytes_attr(attr::SOFTWARE, &s[..s.len().min(MAX_SOFTWARE_CHARS)]);
    }
    w.finish(fingerprint)
}

/// A Binding request in a `Vec` (see [`encode_binding_request`]).
pub fn binding_request(txid: TxId, software: Option<&str>, fingerprint: bool) -> Vec<u8> {
    let mut out = vec![0u8; MAX_BINDING_REQUEST_LEN];
    let n = encode_binding_request(&txid, software.map(str::as_bytes), fingerprint, &mut out);
    out.truncate(n);
    out
}

/// A cheap test for "this datagram is STUN" (RFC 5389 and later), to tell it apart from other
/// traffic on the same socket: top bits zero, the magic cookie, and a length that is a multiple
/// of 4 and matches the datagram.
#[inline]
pub fn looks_like_stun(b: &[u8]) -> bool {
    b.len() >= HEADER_LEN
        && b[0] & 0xC0 == 0
        && b[4..8] == COOKIE_BYTES
        && usize::from(be16(b, 2)) == b.len() - HEADER_LEN
        && (b.len() - HEADER_LEN).is_multiple_of(4)
}

/// The transaction id of a Binding success response, judging by the header alone (for load
/// generators that count answers, not read them).
#[inline]
pub fn success_txid(b: &[u8]) -> Option<TxId> {
    (looks_like_stun(b) && be16(b, 0) == BINDING_SUCCESS)
        .then(|| b[8..HEADER_LEN].try_into().expect("12 bytes"))
}

/// A Binding success response, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingSuccess {
    /// Its transaction id.
    pub txid: TxId,
    /// The address the server saw the request come from.
    pub mapped: SocketAddr,
}

/// Why a datagram is not a usable Binding success response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BindingParseError {
    /// Not STUN with the magic cookie.
    #[error("not a STUN message")]
    NotStun,
    /// STUN, but malformed.
    #[error("malformed STUN message: {0}")]
    Malformed(#[from] ParseError),
    /// Another message type.
    #[error("STUN message type {0:#06x}, not a Binding success response")]
    NotBindingSuccess(u16),
    /// FINGERPRINT present and wrong.
    #[error("FINGERPRINT does not match")]
    BadFingerprint,
    /// No (XOR-)MAPPED-ADDRESS.
    #[error("no mapped address in the response")]
    NoAddress,
}

/// Reads a Binding success response: its transaction id and the mapped address
/// (XOR-MAPPED-ADDRESS, its old code point, or MAPPED-ADDRESS). A FINGERPRINT is checked when
/// present.
pub fn parse_binding_success(b: &[u8]) -> Result<BindingSuccess, BindingParseError> {
    if !looks_like_stun(b) {
        return Err(BindingParseError::NotStun);
    }
    let m = Message::parse(b)?;
    if m.message_type() != BINDING_SUCCESS {
        return Err(BindingParseError::NotBindingSuccess(m.message_type()));
    }
    if m.fingerprint() == FingerprintStatus::Invalid {
        return Err(BindingParseError::BadFingerprint);
    }
    let mapped = m.mapped_address().ok_or(BindingParseError::NoAddress)?;
    Ok(BindingSuccess {
        txid: m
            .transaction_id()
            .try_into()
            .expect("12 bytes with a cookie"),
        mapped,
    })
}

/// A big-endian `u16` at `at`.
#[inline]
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// A big-endian `u32` at `at`.
#[inline]
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// `len` rounded up to a multiple of 4 (attribute padding).
#[inline]
pub fn padded(len: usize) -> usize {
    (len + 3) & !3
}

/// Writes a message into the caller's buffer. The caller sizes the buffer for what it writes
/// (a server replies into `MAX_RESPONSE_LEN` bytes); writing past it panics.
#[derive(Debug)]
pub struct MessageWriter<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> MessageWriter<'a> {
    /// A writer at the start of `buf`.
    #[inline]
    pub fn new(buf: &'a mut [u8]) -> MessageWriter<'a> {
        MessageWriter { buf, pos: 0 }
    }

    /// Raw bytes.
    #[inline]
    pub fn put(&mut self, bytes: &[u8]) {
        self.buf[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
    }

    /// Zeros up to a multiple of 4.
    #[inline]
    pub fn pad(&mut self) {
        while !self.pos.is_multiple_of(4) {
            self.buf[self.pos] = 0;
            self.pos += 1;
        }
    }

    /// Header with the request's cookie and transaction id (bytes 4..20, also the whole
    /// 16-byte id of an RFC 3489 request); the length is filled in by `finish`.
    #[inline]
    pub fn header(&mut self, typ: u16, request: &[u8]) {
        self.put(&typ.to_be_bytes());
        self.put(&[0, 0]);
        self.put(&request[4..HEADER_LEN]);
    }

    /// An attribute's type and length.
    #[inline]
    pub fn attr_header(&mut self, typ: u16, len: usize) {
        self.put(&typ.to_be_bytes());
        self.put(&(len as u16).to_be_bytes());
    }

    /// An attribute with `value` (padded).
    #[inline]
    pub fn bytes_attr(&mut self, typ: u16, value: &[u8]) {
        self.attr_header(typ, value.len());
        self.put(value);
        self.pad();
    }

    /// An address attribute in MAPPED-ADDRESS format.
    #[inline]
    pub fn address(&mut self, typ: u16, addr: SocketAddr) {
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
    #[inline]
    pub fn xor_address(&mut self, typ: u16, addr: SocketAddr, request: &[u8]) {
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

    /// ERROR-CODE.
    #[inline]
    pub fn error_code(&mut self, code: u16, reason: &str) {
        self.attr_header(attr::ERROR_CODE, 4 + reason.len());
        self.put(&[0, 0, (code / 100) as u8, (code % 100) as u8]);
        self.put(reason.as_bytes());
        self.pad();
    }

    /// UNKNOWN-ATTRIBUTES. RFC 3489 §11.2.9 pads an odd list by repeating an entry; RFC 5389
    /// and later use ordinary padding.
    #[inline]
    pub fn unknown_attributes(&mut self, types: &[u16], classic: bool) {
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
    #[inline]
    pub fn finish(mut self, fingerprint: bool) -> usize {
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
mod tests {
    use super::*;
    use bytecodec::DecodeExt;
    use stun_codec::rfc5389::attributes::{Software, XorMappedAddress};
    use stun_codec::rfc5389::Attribute;
    use stun_codec::{Message as CMessage, MessageClass, MessageDecoder, MessageEncoder};

    #[test]
    fn binding_requests_are_what_stun_codec_reads() {
        let txid = new_txid();
        for (software, fp) in [
            (None, false),
            (Some("tailnode"), true),
            (Some("ferry"), false),
        ] {
            let req = binding_request(txid, software, fp);
            assert!(looks_like_stun(&req));
            let m = MessageDecoder::<Attribute>::new()
                .decode_from_bytes(&req)
                .unwrap()
                .unwrap();
            assert_eq!(m.class(), MessageClass::Request);
            assert_eq!(m.transaction_id().as_bytes(), &txid);
            let sw = m
                .get_attribute::<Software>()
                .map(|s| s.description().to_string());
            assert_eq!(sw.as_deref(), software);
            let ours = Message::parse(&req).unwrap();
            let want = if fp {
                FingerprintStatus::Valid
            } else {
                FingerprintStatus::Absent
            };
            assert_eq!(ours.fingerprint(), want);
        }
        let long = "x".repeat(500);
        let req = binding_request(txid, Some(&long), true);
        assert_eq!(
            Message::parse(&req)
                .unwrap()
                .attribute(attr::SOFTWARE)
                .unwrap()
                .len(),
            MAX_SOFTWARE_CHARS
        );
        assert!(req.len() <= MAX_BINDING_REQUEST_LEN);
    }

    #[test]
    fn a_success_response_from_stun_codec_is_read_with_its_address() {
        use bytecodec::EncodeExt;
        let txid = new_txid();
        for addr in [
            "192.0.2.1:32853",
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut m = CMessage::<Attribute>::new(
                MessageClass::SuccessResponse,
                stun_codec::rfc5389::methods::BINDING,
                stun_codec::TransactionId::new(txid),
            );
            m.add_attribute(Attribute::XorMappedAddress(XorMappedAddress::new(addr)));
            let bytes = MessageEncoder::new().encode_into_bytes(m).unwrap();
            let got = parse_binding_success(&bytes).unwrap();
            assert_eq!(got, BindingSuccess { txid, mapped: addr });
            assert_eq!(success_txid(&bytes), Some(txid));
        }
        assert_eq!(
            parse_binding_success(b"hello"),
            Err(BindingParseError::NotStun)
        );
        let req = binding_request(txid, None, false);
        assert_eq!(success_txid(&req), None);
        assert_eq!(
            parse_binding_success(&req),
            Err(BindingParseError::NotBindingSuccess(BINDING_REQUEST))
        );
    }

    #[test]
    fn the_old_xor_mapped_address_code_point_is_read() {
        let txid = [7u8; 12];
        let mut out = [0u8; 64];
        let mut w = MessageWriter::new(&mut out);
        let mut key = [0u8; 20];
        key[4..8].copy_from_slice(&COOKIE_BYTES);
        key[8..].copy_from_slice(&txid);
        w.put(&BINDING_SUCCESS.to_be_bytes());
        w.put(&[0, 0]);
        w.put(&COOKIE_BYTES);
        w.put(&txid);
        let addr: SocketAddr = "198.51.100.7:4242".parse().unwrap();
        w.xor_address(attr::XOR_MAPPED_ADDRESS_OLD, addr, &key);
        let n = w.finish(true);
        assert_eq!(parse_binding_success(&out[..n]).unwrap().mapped, addr);
    }
}
