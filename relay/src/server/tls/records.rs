//! The relay's own TLS record layer (issue 17): rustls does the handshake and keeps the
//! secrets; this module seals and opens the records after it.
//!
//! Why: a relay decrypts and encrypts every byte it forwards. Through tokio-rustls each
//! received record was read in 4 KiB `recvfrom`s, decrypted, copied into a fresh buffer and
//! copied again into the reader's; each sent record was copied into a fresh buffer before it was
//! sealed (docs/notes-tls-perf.md has the profile). Here a connection reads up to 64 KiB per
//! system call into one buffer, opens every record in place and hands out the plaintext from
//! there (one copy, the one into the caller's buffer); the writer seals straight into the
//! buffer it sends.
//!
//! What rustls still does: the whole handshake (its unbuffered API, so no byte past the
//! handshake is read into a buffer of its own), certificates, ALPN, session tickets, and the
//! key schedule after it ([`rustls::kernel::KernelConnection`]: the next traffic secret at a
//! KeyUpdate). The AEADs are ring's, the same code rustls uses.
//!
//! What this module does, per RFC 8446 §5 and RFC 5246/5288/7905 for TLS 1.2:
//! - TLS 1.3 records: outer type application_data, the inner type after the plaintext and its
//!   zero padding, nonce = IV ⊕ sequence number, the record header as additional data.
//!   TLS 1.2 AES-GCM (explicit 8-byte nonce) and ChaCha20-Poly1305 records with the 13-byte
//!   additional data.
//! - KeyUpdate from the peer: the receive key moves on at once; when the peer asks, a KeyUpdate
//!   of ours goes out before our next record, and our send key moves on after it. Our own send
//!   key is also updated before it reaches the suite's confidentiality limit (TLS 1.3); a TLS
//!   1.2 connection is closed there instead (it has no key update).
//! - close_notify ends the stream (a clean end of file); any other alert, a record that does
//!   not open, an oversized record, an unexpected content type or handshake message ends the
//!   connection with an error. user_canceled is skipped, as rustls does. As in rustls, at
//!   most 32 records in a row may carry no data (empty, KeyUpdate, user_canceled), and at most
//!   4 warning alerts come over a connection: a flood of them is closed.
//! - The handshake gets the client's records one at a time, so a KeyUpdate or close_notify that
//!   came in the same flight as the client's Finished is left to this layer.
//! - Shutdown sends close_notify, then half-closes TCP.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

const HEADER: usize = 5;
/// The most plaintext one record may carry (2^14).
const MAX_PLAIN: usize = 1 << 14;
/// The longest record body accepted (RFC 8446 §5.2: 2^14 + 256).
const MAX_BODY: usize = MAX_PLAIN + 256;
const TAG: usize = 16;
const GCM_EXPLICIT: usize = 8;

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: u8 = 0;
const USER_CANCELED: u8 = 90;

/// Read size while the connection is busy (a read filled half its room or more): a whole
/// 16 KiB record and then some.
const BUSY_READ: usize = 20 << 10;
/// Read size of a quiet connection (keepalives, pings); most of a relay's connections are.
const IDLE_READ: usize = 1 << 10;
/// Reads in a row smaller than `IDLE_READ` after which a connection counts as quiet and gives
/// its big buffer back. Not one: a busy connection's reads vary in size, and a buffer that
/// shrank and grew again at every short read was reallocated and zeroed at every read.
const QUIET_READS: u8 = 8;
/// Sealed bytes not yet sent beyond which a write waits for the socket (rustls' default
/// send-buffer limit); one write takes at most this much too.
const WRITE_HIGH: usize = 64 << 10;
/// A send buffer larger than this is released once empty (idle connections stay small).
const KEEP_WRITE: usize = 16 << 10;
/// Records in a row that carry no application data (empty ones, KeyUpdates, user_canceled)
/// before the connection is closed: each costs an AEAD open (a KeyUpdate a key derivation)
/// and yields the reader nothing. rustls' limits, which it applies to the same records.
const MAX_QUIET_RECORDS: u8 = 32;
/// Warning alerts (user_canceled) over a connection's life, as rustls allows.
const MAX_WARNING_ALERTS: u8 = 4;
/// The most handshake bytes the handshake may hold unprocessed (a ClientHello with large
/// post-quantum key shares is a few KiB; rustls caps a handshake message at 64 KiB).
const MAX_HANDSHAKE_BUF: usize = 80 << 10;
/// A fragmented post-handshake message may hold at most this (a KeyUpdate is 5 bytes).
const MAX_POST_HANDSHAKE: usize = 1 << 10;

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The record formats a connection may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Tls13,
    /// TLS 1.2 AES-GCM: an explicit 8-byte nonce after the header (RFC 5288).
    Tls12Gcm,
    /// TLS 1.2 ChaCha20-Poly1305: nonce = IV ⊕ sequence number (RFC 7905).
    Tls12Chacha,
}

/// One direction's key, IV and sequence number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Direction {
    fn new(secrets: ConnectionTrafficSecrets, seq: u64) -> io::Result<(Self, bool)> {
        let (alg, key, iv, chacha) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv, false),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv, false),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv, true)
            }
            _ => return Err(bad("a cipher suite the record layer does not do")),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| bad("bad AEAD key length"))?;
        let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| bad("bad IV length"))?;
        Ok((
            Direction {
                key: LessSafeKey::new(key),
                iv,
                seq,
            },
            chacha,
        ))
    }

    /// IV ⊕ the sequence number (right-aligned).
    fn nonce_bytes(&self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }
}

/// The TLS 1.2 additional data: sequence number, type, version, plaintext length.
fn tls12_aad(seq: u64, typ: u8, plain_len: usize) -> [u8; 13] {
    let mut a = [0u8; 13];
    a[..8].copy_from_slice(&seq.to_be_bytes());
    a[8] = typ;
    a[9] = 3;
    a[10] = 3;
    a[11..].copy_from_slice(&(plain_len as u16).to_be_bytes());
    a
}

/// What opening the next buffered record gave.
enum Opened {
    /// Not a whole record yet: the buffer must hold this many bytes from `pos`.
    NeedMore(usize),
    /// Application data at this range of the buffer (may be empty).
    Data(usize, usize),
    /// A record handled here (KeyUpdate, user_canceled): nothing for the reader.
    Control,
    /// close_notify: the peer's clean end of stream.
    Closed,
}

/// A TLS connection past its handshake: TCP plus the record layer. Reads return plaintext;
/// writes are sealed into records and sent by the write itself or by `flush`.
pub(crate) struct RecordIo {
    tcp: TcpStream,
    kernel: KernelConnection<ServerConnectionData>,
    format: Format,
    /// Sealed records per key before our send key must change (the suite's limit, with room).
    tx_limit: u64,
    rx: Direction,
    tx: Direction,
    /// Received bytes: `[..pos]` consumed, `[pos..filled]` records not yet opened.
    rbuf: Vec<u8>,
    pos: usize,
    filled: usize,
    /// Opened plaintext not yet handed out: `rbuf[plain.0..plain.1]`.
    plain: (usize, usize),
    /// The last read filled half its room or more: read big.
    busy: bool,
    /// Reads in a row smaller than `IDLE_READ`.
    small_reads: u8,
    read_eof: bool,
    /// Post-handshake handshake bytes of a message split across records.
    hs: Vec<u8>,
    /// Sealed bytes: `[wsent..]` not yet sent.
    wbuf: Vec<u8>,
    wsent: usize,
    /// The peer asked for a KeyUpdate of ours: sent before our next record.
    tx_update_requested: bool,
    close_sent: bool,
    /// KeyUpdates taken from the peer and sent by us (logs and tests).
    key_updates: (u32, u32),
    /// Records without application data in a row, and warning alerts so far.
    quiet_records: u8,
    warning_alerts: u8,
    /// A read failed: every later read fails too (the stream is not resynchronised).
    broken: bool,
}

impl std::fmt::Debug for RecordIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordIo")
            .field("format", &self.format)
            .field("rx_seq", &self.rx.seq)
            .field("tx_seq", &self.tx.seq)
            .field("key_updates", &self.key_updates)
            .finish_non_exhaustive()
    }
}

/// Runs the TLS handshake on `tcp` with rustls' unbuffered API and hands the connection to the
/// record layer. Bytes the client sent after its handshake (the HTTP request, often in the
/// same segment as its Finished) are kept for the first reads.
pub(crate) async fn accept(
    mut tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
) -> io::Result<RecordIo> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(tls_err)?;
    let mut inb = vec![0u8; 4 << 10];
    // `inb[..fed]`: whole records given to rustls; `inb[fed..filled]`: read, not given yet.
    // rustls gets one record at a time, so it never sees a record past the client's Finished:
    // a KeyUpdate or close_notify in the same flight is the record layer's (rustls would take
    // it, and its answer to a KeyUpdate would be lost at the hand-over).
    let (mut fed, mut filled) = (0usize, 0usize);
    let mut out: Vec<u8> = Vec::new();
    // Application data rustls opened during the handshake (none is expected: it never gets a
    // record past the Finished; kept in case).
    let mut early: Vec<u8> = Vec::new();
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process_tls_records(&mut inb[..fed]);
        let state = match state {
            Ok(s) => s,
            Err(e) => {
                // rustls queues an alert for the peer; send it if it is there (best effort).
                let _ = send_pending_alert(&mut conn, &mut tcp).await;
                return Err(tls_err(e));
            }
        };
        let mut need_record = false;
        let mut done = false;
        match state {
            ConnectionState::EncodeTlsData(mut e) => {
                let start = out.len();
                out.resize(start + 4096, 0);
                loop {
                    match e.encode(&mut out[start..]) {
                        Ok(n) => {
                            out.truncate(start + n);
                            break;
                        }
                        Err(EncodeError::InsufficientSize(InsufficientSizeError {
                            required_size,
                        })) => out.resize(start + required_size, 0),
                        Err(e) => return Err(bad(format!("TLS handshake encode: {e}"))),
                    }
                }
            }
            ConnectionState::TransmitTlsData(t) => {
                tcp.write_all(&out).await?;
                out.clear();
                t.done();
            }
            ConnectionState::BlockedHandshake => need_record = true,
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(rec) = r.next_record() {
                    let rec = rec.map_err(tls_err)?;
                    discard += rec.discard;
                    early.extend_from_slice(rec.payload);
                }
            }
            // The server may send once its Finished is out, before the client's arrived;
            // the handshake is over only when it has.
            ConnectionState::WriteTraffic(_) => {
                if conn.is_handshaking() {
                    need_record = true;
                } else {
                    done = true;
                }
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed during the TLS handshake",
                ))
            }
            _ => return Err(bad("unexpected TLS state during the handshake")),
        }
        inb.copy_within(discard..filled, 0);
        filled -= discard;
        fed -= discard;
        if !out.is_empty() && (need_record || done) {
            tcp.write_all(&out).await?;
            out.clear();
        }
        if done {
            if fed != 0 {
                return Err(bad("TLS handshake ended inside a record"));
            }
            break;
        }
        if need_record {
            // The next whole record, read from the socket if it is not here yet.
            loop {
                let rest = &inb[fed..filled];
                if rest.len() >= HEADER {
                    let end = HEADER + usize::from(u16::from_be_bytes([rest[3], rest[4]]));
                    if rest.len() >= end {
                        fed += end;
                        break;
                    }
                }
                if filled == inb.len() {
                    if inb.len() >= MAX_HANDSHAKE_BUF {
                        return Err(bad("TLS handshake message too large"));
                    }
                    inb.resize((inb.len() * 2).min(MAX_HANDSHAKE_BUF), 0);
                }
                let n = tcp.read(&mut inb[filled..]).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed during the TLS handshake",
                    ));
                }
                filled += n;
            }
        }
    }
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_err)?;
    let (rx, rx_chacha) = Direction::new(secrets.rx.1, secrets.rx.0)?;
    let (tx, _) = Direction::new(secrets.tx.1, secrets.tx.0)?;
    let format = match kernel.protocol_version() {
        ProtocolVersion::TLSv1_3 => Format::Tls13,
        ProtocolVersion::TLSv1_2 if rx_chacha => Format::Tls12Chacha,
        ProtocolVersion::TLSv1_2 => Format::Tls12Gcm,
        v => return Err(bad(format!("TLS version {v:?} is not supported"))),
    };
    let limit = match kernel.negotiated_cipher_suite() {
        SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
        SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
    };
    // Update (or, for TLS 1.2, close) with room to spare, as rustls does before its limit.
    let tx_limit = limit.saturating_sub(limit / 16).max(1);
    // What rustls opened goes first, then the records it left whole in `inb`.
    let mut rbuf = early;
    let plain = (0, rbuf.len());
    rbuf.extend_from_slice(&inb[..filled]);
    let filled = rbuf.len();
    Ok(RecordIo {
        tcp,
        kernel,
        format,
        tx_limit,
        rx,
        tx,
        rbuf,
        pos: plain.1,
        filled,
        plain,
        busy: false,
        small_reads: 0,
        read_eof: false,
        hs: Vec::new(),
        wbuf: Vec::new(),
        wsent: 0,
        tx_update_requested: false,
        close_sent: false,
        key_updates: (0, 0),
        quiet_records: 0,
        warning_alerts: 0,
        broken: false,
    })
}

/// After a handshake error: the alert rustls queued, if any, goes to the peer.
async fn send_pending_alert(
    conn: &mut UnbufferedServerConnection,
    tcp: &mut TcpStream,
) -> io::Result<()> {
    let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut []);
    if let Ok(ConnectionState::EncodeTlsData(mut e)) = state {
        let mut out = vec![0u8; 64];
        if let Ok(n) = e.encode(&mut out) {
            tcp.write_all(&out[..n]).await?;
        }
    }
    Ok(())
}

impl RecordIo {
    /// For tests: set the number of records after which our send key changes.
    #[cfg(test)]
    fn set_tx_limit(&mut self, n: u64) {
        self.tx_limit = n;
    }

    /// Opens the record at `pos`, if it is whole.
    fn open_next(&mut self) -> io::Result<Opened> {
        let avail = self.filled - self.pos;
        if avail < HEADER {
            return Ok(Opened::NeedMore(HEADER));
        }
        let h = &self.rbuf[self.pos..self.pos + HEADER];
        let (typ, major, len) = (h[0], h[1], usize::from(u16::from_be_bytes([h[3], h[4]])));
        if major != 3 {
            return Err(bad("not a TLS record"));
        }
        if len > MAX_BODY {
            return Err(bad("record_overflow: a TLS record longer than 2^14 + 256"));
        }
        if avail < HEADER + len {
            return Ok(Opened::NeedMore(HEADER + len));
        }
        let start = self.pos + HEADER;
        let end = start + len;
        let header: [u8; HEADER] = self.rbuf[self.pos..start].try_into().expect("5 bytes");
        self.pos = end;
        let (inner, from, to) = match self.format {
            Format::Tls13 => {
                if typ != APPLICATION_DATA {
                    return Err(bad(format!(
                        "unexpected_message: plaintext record of type {typ} after the handshake"
                    )));
                }
                if len < TAG + 1 {
                    return Err(bad("a TLS record too short to open"));
                }
                // The inner plaintext, padding included, is at most 2^14 + 1 bytes.
                if len - TAG > MAX_PLAIN + 1 {
                    return Err(bad(
                        "record_overflow: more than 2^14 + 1 bytes of inner plaintext",
                    ));
                }
                let nonce = Nonce::assume_unique_for_key(self.rx.nonce_bytes());
                let body = &mut self.rbuf[start..end];
                self.rx
                    .key
                    .open_in_place(nonce, Aad::from(header), body)
                    .map_err(|_| bad("bad_record_mac: a TLS record did not open"))?;
                // The inner type is the last non-zero byte; zeros after it are padding.
                let plain = &self.rbuf[start..end - TAG];
                let Some(at) = plain.iter().rposition(|&b| b != 0) else {
                    return Err(bad("unexpected_message: a TLS record of padding only"));
                };
                if at > MAX_PLAIN {
                    return Err(bad("record_overflow: more than 2^14 bytes of plaintext"));
                }
                (plain[at], start, start + at)
            }
            Format::Tls12Gcm => {
                if len < GCM_EXPLICIT + TAG {
                    return Err(bad("a TLS record too short to open"));
                }
                let mut n = [0u8; 12];
                n[..4].copy_from_slice(&self.rx.iv[..4]);
                n[4..].copy_from_slice(&self.rbuf[start..start + GCM_EXPLICIT]);
                let aad = tls12_aad(self.rx.seq, typ, len - GCM_EXPLICIT - TAG);
                let body = &mut self.rbuf[start..end];
                let plain_len = self
                    .rx
                    .key
                    .open_within(
                        Nonce::assume_unique_for_key(n),
                        Aad::from(aad),
                        body,
                        GCM_EXPLICIT..,
                    )
                    .map_err(|_| bad("bad_record_mac: a TLS record did not open"))?
                    .len();
                (typ, start, start + plain_len)
            }
            Format::Tls12Chacha => {
                if len < TAG {
                    return Err(bad("a TLS record too short to open"));
                }
                let nonce = Nonce::assume_unique_for_key(self.rx.nonce_bytes());
                let aad = tls12_aad(self.rx.seq, typ, len - TAG);
                let body = &mut self.rbuf[start..end];
                let plain_len = self
                    .rx
                    .key
                    .open_in_place(nonce, Aad::from(aad), body)
                    .map_err(|_| bad("bad_record_mac: a TLS record did not open"))?
                    .len();
                (typ, start, start + plain_len)
            }
        };
        self.rx.seq += 1;
        if to - from > MAX_PLAIN {
            return Err(bad("record_overflow: more than 2^14 bytes of plaintext"));
        }
        if inner != HANDSHAKE && !self.hs.is_empty() {
            return Err(bad(
                "unexpected_message: a handshake message cut by another record",
            ));
        }
        if inner == APPLICATION_DATA && to > from {
            self.quiet_records = 0;
        } else {
            self.quiet_records += 1;
            if self.quiet_records > MAX_QUIET_RECORDS {
                return Err(bad(format!(
                    "more than {MAX_QUIET_RECORDS} TLS records in a row without data"
                )));
            }
        }
        match inner {
            APPLICATION_DATA => Ok(Opened::Data(from, to)),
            ALERT => {
                let a = &self.rbuf[from..to];
                match a {
                    [_, CLOSE_NOTIFY] => Ok(Opened::Closed),
                    [_, USER_CANCELED] if self.warning_alerts < MAX_WARNING_ALERTS => {
                        self.warning_alerts += 1;
                        Ok(Opened::Control)
                    }
                    [_, d] => Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("the peer sent TLS alert {d}"),
                    )),
                    _ => Err(bad("decode_error: a malformed TLS alert")),
                }
            }
            HANDSHAKE => {
                if self.format != Format::Tls13 {
                    return Err(bad(
                        "no_renegotiation: a handshake message after the TLS 1.2 handshake",
                    ));
                }
                if self.hs.len() + (to - from) > MAX_POST_HANDSHAKE {
                    return Err(bad(
                        "unexpected_message: a post-handshake message too large",
                    ));
                }
                let mut hs = std::mem::take(&mut self.hs);
                hs.extend_from_slice(&self.rbuf[from..to]);
                let r = self.handshake_messages(&mut hs);
                self.hs = hs;
                r.map(|()| Opened::Control)
            }
            CHANGE_CIPHER_SPEC => Err(bad(
                "unexpected_message: change_cipher_spec after the handshake",
            )),
            t => Err(bad(format!("unexpected_message: TLS content type {t}"))),
        }
    }

    /// Handles the whole post-handshake messages in `hs` (left with any partial one).
    fn handshake_messages(&mut self, hs: &mut Vec<u8>) -> io::Result<()> {
        let mut at = 0;
        while hs.len() - at >= 4 {
            let len = usize::from(hs[at + 1]) << 16
                | usize::from(hs[at + 2]) << 8
                | usize::from(hs[at + 3]);
            if hs.len() - at - 4 < len {
                break;
            }
            let (typ, body) = (hs[at], &hs[at + 4..at + 4 + len]);
            at += 4 + len;
            match (typ, body) {
                (KEY_UPDATE, [req @ (0 | 1)]) => {
                    // A key change must end its record (RFC 8446 §5.1).
                    if at != hs.len() {
                        return Err(bad(
                            "unexpected_message: data after a KeyUpdate in its record",
                        ));
                    }
                    let (seq, secrets) = self.kernel.update_rx_secret().map_err(tls_err)?;
                    self.rx = Direction::new(secrets, seq)?.0;
                    self.key_updates.0 += 1;
                    if *req == 1 {
                        self.tx_update_requested = true;
                    }
                }
                (KEY_UPDATE, _) => return Err(bad("decode_error: a malformed KeyUpdate")),
                (t, _) => {
                    return Err(bad(format!(
                        "unexpected_message: handshake message {t} after the handshake"
                    )))
                }
            }
        }
        hs.drain(..at);
        Ok(())
    }

    /// Seals `plain` as one record of inner type `typ` onto the send buffer.
    fn seal(&mut self, typ: u8, plain: &[u8]) -> io::Result<()> {
        seal_record(&mut self.tx, self.format, typ, plain, &mut self.wbuf)
    }

    /// Before a record of ours: a KeyUpdate when the peer asked for one or our key is near its
    /// limit (TLS 1.3), or an error at the limit (TLS 1.2 has no key update).
    fn before_seal(&mut self) -> io::Result<()> {
        if !self.tx_update_requested && self.tx.seq < self.tx_limit {
            return Ok(());
        }
        if self.format != Format::Tls13 {
            return Err(io::Error::other(
                "TLS 1.2 connection at its AEAD's record limit; closing (clients reconnect)",
            ));
        }
        // KeyUpdate(update_not_requested), sealed with the key it retires.
        self.seal(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0])?;
        let (seq, secrets) = self.kernel.update_tx_secret().map_err(tls_err)?;
        self.tx = Direction::new(secrets, seq)?.0;
        self.tx_update_requested = false;
        self.key_updates.1 += 1;
        Ok(())
    }

    /// Sends sealed bytes until none are left or the socket is full.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wsent < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.wbuf[self.wsent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wsent += n;
        }
        self.wbuf.clear();
        self.wsent = 0;
        if self.wbuf.capacity() > KEEP_WRITE {
            self.wbuf = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

/// Seals `plain` as one record of (inner, for TLS 1.3) type `typ` onto `w`, and moves `dir`'s
/// sequence number on. The caller keeps `plain` within 2^14 bytes (a test makes a bigger one).
fn seal_record(
    dir: &mut Direction,
    format: Format,
    typ: u8,
    plain: &[u8],
    w: &mut Vec<u8>,
) -> io::Result<()> {
    let start = w.len();
    let nonce_bytes = dir.nonce_bytes();
    let nonce = Nonce::assume_unique_for_key(nonce_bytes);
    let tag = match format {
        Format::Tls13 => {
            let body = plain.len() + 1 + TAG;
            let header = [APPLICATION_DATA, 3, 3, (body >> 8) as u8, body as u8];
            w.extend_from_slice(&header);
            w.extend_from_slice(plain);
            w.push(typ);
            dir.key
                .seal_in_place_separate_tag(nonce, Aad::from(header), &mut w[start + HEADER..])
        }
        Format::Tls12Gcm | Format::Tls12Chacha => {
            let explicit = if format == Format::Tls12Gcm {
                GCM_EXPLICIT
            } else {
                0
            };
            let body = explicit + plain.len() + TAG;
            w.extend_from_slice(&[typ, 3, 3, (body >> 8) as u8, body as u8]);
            w.extend_from_slice(&nonce_bytes[12 - explicit..]);
            w.extend_from_slice(plain);
            let aad = tls12_aad(dir.seq, typ, plain.len());
            dir.key.seal_in_place_separate_tag(
                nonce,
                Aad::from(aad),
                &mut w[start + HEADER + explicit..],
            )
        }
    }
    .map_err(|_| {
        // Nothing unsealed may stay in the send buffer.
        w.truncate(start);
        bad("TLS record sealing failed")
    })?;
    w.extend_from_slice(tag.as_ref());
    dir.seq += 1;
    Ok(())
}

impl AsyncRead for RecordIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain.0 < this.plain.1 {
                let n = out.remaining().min(this.plain.1 - this.plain.0);
                out.put_slice(&this.rbuf[this.plain.0..this.plain.0 + n]);
                this.plain.0 += n;
                return Poll::Ready(Ok(()));
            }
            if this.broken {
                return Poll::Ready(Err(bad("the TLS stream failed before")));
            }
            if this.read_eof || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let opened = this.open_next();
            this.broken = opened.is_err();
            let need = match opened? {
                Opened::Data(from, to) => {
                    this.plain = (from, to);
                    continue;
                }
                Opened::Control => continue,
                Opened::Closed => {
                    this.read_eof = true;
                    return Poll::Ready(Ok(()));
                }
                Opened::NeedMore(need) => need,
            };
            // Keep only the unopened record's bytes, at the front.
            if this.pos > 0 {
                this.rbuf.copy_within(this.pos..this.filled, 0);
                this.filled -= this.pos;
                this.pos = 0;
            }
            let want = need.max(if this.busy { BUSY_READ } else { IDLE_READ });
            if this.rbuf.len() < want {
                this.rbuf.resize(want, 0);
            } else if this.filled == 0
                && this.small_reads >= QUIET_READS
                && this.rbuf.len() > IDLE_READ
            {
                // A quiet connection gives its big buffer back.
                this.rbuf = vec![0; IDLE_READ];
            }
            let room = this.rbuf.len() - this.filled;
            let mut rb = ReadBuf::new(&mut this.rbuf[this.filled..]);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                // TCP ended without close_notify: a clean end only at a record boundary
                // (reported as tokio-rustls does, as UnexpectedEof; Go clients close so).
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    if this.filled == 0 {
                        "TCP closed without close_notify"
                    } else {
                        "TCP closed in the middle of a TLS record"
                    },
                )));
            }
            this.filled += n;
            // A read that filled half its room or more: the sender is ahead, read big.
            this.busy = n * 2 >= room;
            this.small_reads = if n < IDLE_READ {
                this.small_reads.saturating_add(1)
            } else {
                0
            };
        }
    }
}

impl AsyncWrite for RecordIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if this.wbuf.len() - this.wsent >= WRITE_HIGH {
            // Pending only while the socket is full and too much is waiting.
            if this.poll_send(cx)?.is_pending() && this.wbuf.len() - this.wsent >= WRITE_HIGH {
                return Poll::Pending;
            }
        }
        let n = buf.len().min(WRITE_HIGH);
        this.wbuf
            .reserve(n + n.div_ceil(MAX_PLAIN) * (HEADER + GCM_EXPLICIT + 1 + TAG));
        for chunk in buf[..n].chunks(MAX_PLAIN) {
            this.before_seal()?;
            this.seal(APPLICATION_DATA, chunk)?;
        }
        // Send now if the socket takes it (a flush after this finds nothing left).
        let _ = this.poll_send(cx)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            this.close_sent = true;
            this.before_seal()?;
            // Alert level warning (1), close_notify.
            this.seal(ALERT, &[1, CLOSE_NOTIFY])?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    //! The record layer against rustls' own client (tokio-rustls over real loopback TCP), for
    //! every suite and both versions the relay offers: what one side seals the other opens,
    //! byte for byte, across key updates in both directions, and hostile records end the
    //! connection with an error.
    use super::*;
    use rustls::crypto::ring::{cipher_suite as cs, default_provider};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::net::TcpListener;
    use tokio_rustls::client::TlsStream;

    type Client = TlsStream<TcpStream>;

    fn configs(
        suite: SupportedCipherSuite,
    ) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert: CertificateDer<'static> = ck.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
        let version: &'static rustls::SupportedProtocolVersion = match suite {
            SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
            SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
        };
        let provider = || {
            let mut p = default_provider();
            p.cipher_suites = vec![suite];
            Arc::new(p)
        };
        let mut s = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        s.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let c = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // The hostile-record tests seal records of their own with the client's keys.
        let mut c = c;
        c.enable_secret_extraction = true;
        (Arc::new(s), Arc::new(c))
    }

    async fn pair(suite: SupportedCipherSuite) -> (RecordIo, Client) {
        let (scfg, ccfg) = configs(suite);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move { accept(l.accept().await.unwrap().0, scfg).await });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let client = tokio_rustls::TlsConnector::from(ccfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let server = server.await.unwrap().unwrap();
        let negotiated = client.get_ref().1.negotiated_cipher_suite().unwrap();
        assert_eq!(negotiated.suite(), suite.suite());
        (server, client)
    }

    /// Echoes until the client's close_notify, then closes with one of its own; returns the
    /// record layer for inspection.
    async fn echo(mut io: RecordIo) -> io::Result<RecordIo> {
        let mut buf = vec![0u8; 5000];
        loop {
            let n = io.read(&mut buf).await?;
            if n == 0 {
                io.shutdown().await?;
                return Ok(io);
            }
            io.write_all(&buf[..n]).await?;
            io.flush().await?;
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Sends `sizes` one by one (refreshing the client's keys before the ones in
    /// `update_before`), reads every byte back and compares; then a clean close both ways.
    async fn round_trip(client: &mut Client, sizes: &[usize], update_before: &[usize]) {
        for (i, &len) in sizes.iter().enumerate() {
            if update_before.contains(&i) {
                // KeyUpdate with update_requested: the relay must answer with its own.
                client.get_mut().1.refresh_traffic_keys().unwrap();
            }
            let sent = pattern(len, i as u8);
            client.write_all(&sent).await.unwrap();
            client.flush().await.unwrap();
            let mut got = vec![0u8; len];
            client.read_exact(&mut got).await.unwrap();
            assert!(got == sent, "message {i} ({len} bytes) came back changed");
        }
    }

    const ALL: [SupportedCipherSuite; 6] = [
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];

    #[tokio::test]
    async fn every_suite_round_trips_every_size_and_closes_cleanly() {
        for suite in ALL {
            let (server, mut client) = pair(suite).await;
            let server = tokio::spawn(echo(server));
            // Records cut small and large, one byte past a full record, several records.
            round_trip(&mut client, &[1, 100, 1237, 16384, 16385, 70_000, 3], &[]).await;
            client.shutdown().await.unwrap();
            // The relay's close_notify: a clean end of stream for the client, not an error.
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            let io = server.await.unwrap().unwrap();
            assert_eq!(io.key_updates, (0, 0), "{:?}", suite.suite());
        }
    }

    #[tokio::test]
    async fn a_key_update_the_client_asks_for_is_answered_and_both_keys_move_on() {
        for suite in &ALL[..3] {
            let (server, mut client) = pair(*suite).await;
            let server = tokio::spawn(echo(server));
            round_trip(&mut client, &[10, 20_000, 1237, 5, 40_000], &[1, 3]).await;
            client.shutdown().await.unwrap();
            let io = server.await.unwrap().unwrap();
            // Two updates of the client's key, and two of ours in answer (the client read
            // everything after them, so it took ours at the right record).
            assert_eq!(io.key_updates, (2, 2), "{:?}", suite.suite());
        }
    }

    #[tokio::test]
    async fn the_relay_updates_its_own_key_before_the_record_limit() {
        let (mut server, mut client) = pair(cs::TLS13_AES_128_GCM_SHA256).await;
        server.set_tx_limit(3);
        let server = tokio::spawn(echo(server));
        // 30 echoes of 3 records each: a KeyUpdate of ours every 3 records.
        let sizes = vec![40_000; 30];
        round_trip(&mut client, &sizes, &[]).await;
        client.shutdown().await.unwrap();
        let io = server.await.unwrap().unwrap();
        assert_eq!(io.key_updates.0, 0);
        assert!(io.key_updates.1 >= 29, "{:?}", io.key_updates);
    }

    #[tokio::test]
    async fn a_tls12_connection_at_its_record_limit_is_closed() {
        let (mut server, mut client) = pair(cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256).await;
        // Two more records (the handshake's Finished already took sequence number 0).
        server.set_tx_limit(server.tx.seq + 2);
        server.write_all(&[1; 20_000]).await.unwrap();
        let e = server.write_all(&[1; 10]).await.unwrap_err();
        assert!(e.to_string().contains("record limit"), "{e}");
        let mut got = vec![0u8; 20_000];
        client.read_exact(&mut got).await.unwrap();
    }

    /// Writes `raw` under the client's TLS (straight onto its TCP) and returns what the
    /// relay's read gave.
    async fn relay_reads_after(suite: SupportedCipherSuite, raw: &[u8]) -> io::Result<usize> {
        let (mut server, mut client) = pair(suite).await;
        client.write_all(b"ok").await.unwrap();
        client.flush().await.unwrap();
        client.get_mut().0.write_all(raw).await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(server.read(&mut buf).await.unwrap(), 2);
        server.read(&mut buf).await
    }

    #[tokio::test]
    async fn hostile_records_end_the_connection_with_an_error() {
        for suite in [
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ] {
            let cases: [(&str, Vec<u8>); 5] = [
                ("garbage body", [&[23, 3, 3, 0, 40][..], &[7; 40]].concat()),
                ("too short to open", vec![23, 3, 3, 0, 3, 1, 2, 3]),
                ("oversized", vec![23, 3, 3, 0x41, 0x01]),
                ("not TLS", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
                ("plaintext alert", vec![21, 3, 3, 0, 2, 2, 40]),
            ];
            for (what, raw) in cases {
                let r = relay_reads_after(suite, &raw).await;
                let e = r.expect_err(what);
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}: {e}");
            }
        }
        // A record cut off by the end of TCP is an error; the end at a record boundary
        // without close_notify is UnexpectedEof, as tokio-rustls reports it.
        let (mut server, client) = pair(cs::TLS13_AES_128_GCM_SHA256).await;
        let (mut tcp, _) = client.into_inner();
        tcp.write_all(&[23, 3, 3, 0, 50, 1, 2]).await.unwrap();
        // A FIN (the client's unread session tickets would make a close a reset).
        tcp.shutdown().await.unwrap();
        let e = server.read(&mut [0u8; 16]).await.unwrap_err();
        assert!(e.to_string().contains("middle of a TLS record"), "{e}");
        let (mut server, client) = pair(cs::TLS13_AES_128_GCM_SHA256).await;
        let (mut tcp, _) = client.into_inner();
        tcp.shutdown().await.unwrap();
        let e = server.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Records sealed with the client's own keys (so they open) but with content a hostile
    /// client could send: returns the plaintext the relay read until its read failed or
    /// ended, that failure, and the record layer.
    async fn authenticated(records: &[(u8, Vec<u8>)]) -> (Vec<u8>, io::Result<()>, RecordIo) {
        let (mut server, client) = pair(cs::TLS13_AES_128_GCM_SHA256).await;
        let (mut tcp, conn) = client.into_inner();
        let secrets = conn.dangerous_extract_secrets().unwrap();
        let (mut dir, _) = Direction::new(secrets.tx.1, secrets.tx.0).unwrap();
        let mut raw = Vec::new();
        for (typ, plain) in records {
            seal_record(&mut dir, Format::Tls13, *typ, plain, &mut raw).unwrap();
        }
        tcp.write_all(&raw).await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let end = loop {
            match server.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break Err(e),
            }
        };
        (got, end, server)
    }

    #[tokio::test]
    async fn hostile_but_authenticated_records_are_refused_or_skipped_as_rfc_8446_says() {
        let refused = |end: io::Result<()>, what: &str, kind: io::ErrorKind| {
            let e = end.expect_err(what);
            assert_eq!(e.kind(), kind, "{what}: {e}");
        };
        // Padding after the inner type is stripped (typ 0 here: the padding's last zero).
        let (got, end, _) =
            authenticated(&[(0, [&b"hello"[..], &[APPLICATION_DATA], &[0; 10]].concat())]).await;
        assert_eq!(got, b"hello");
        refused(
            end,
            "end without close_notify",
            io::ErrorKind::UnexpectedEof,
        );
        // user_canceled is skipped; the data after it arrives.
        let (got, _, _) = authenticated(&[
            (ALERT, vec![1, USER_CANCELED]),
            (APPLICATION_DATA, b"after".to_vec()),
        ])
        .await;
        assert_eq!(got, b"after");
        // close_notify: a clean end.
        let (got, end, _) = authenticated(&[
            (APPLICATION_DATA, b"x".to_vec()),
            (ALERT, vec![1, CLOSE_NOTIFY]),
        ])
        .await;
        assert_eq!(got, b"x");
        end.unwrap();
        let invalid = io::ErrorKind::InvalidData;
        for (what, records) in [
            ("padding only", vec![(0, vec![0; 5])]),
            ("unknown inner type", vec![(99, b"x".to_vec())]),
            (
                "a message after a KeyUpdate in its record",
                vec![(
                    HANDSHAKE,
                    vec![KEY_UPDATE, 0, 0, 1, 0, KEY_UPDATE, 0, 0, 1, 0],
                )],
            ),
            (
                "NewSessionTicket from a client",
                vec![(HANDSHAKE, vec![4, 0, 0, 1, 0])],
            ),
            (
                "a malformed KeyUpdate",
                vec![(HANDSHAKE, vec![KEY_UPDATE, 0, 0, 1, 7])],
            ),
            (
                "more than 2^14 bytes of plaintext",
                vec![(APPLICATION_DATA, vec![1; MAX_PLAIN + 1])],
            ),
            (
                "a post-handshake message that never ends",
                vec![(HANDSHAKE, [&[1, 0, 8, 0][..], &[0; 1000]].concat()); 2],
            ),
            (
                "a handshake message cut by application data",
                vec![
                    (HANDSHAKE, vec![KEY_UPDATE, 0]),
                    (APPLICATION_DATA, b"x".to_vec()),
                ],
            ),
            ("a malformed alert", vec![(ALERT, vec![1])]),
        ] {
            let (got, end, _) = authenticated(&records).await;
            assert!(got.is_empty(), "{what}");
            refused(end, what, invalid);
        }
        // Records without data: 32 in a row are fine (then data), the 33rd is not; at most 4
        // user_canceled warnings over the connection.
        let mut quiet = vec![(APPLICATION_DATA, Vec::new()); MAX_QUIET_RECORDS as usize];
        quiet.push((APPLICATION_DATA, b"data".to_vec()));
        let (got, _, _) = authenticated(&quiet).await;
        assert_eq!(got, b"data");
        quiet.insert(0, (APPLICATION_DATA, Vec::new()));
        let (got, end, _) = authenticated(&quiet).await;
        assert!(got.is_empty());
        refused(end, "33 empty records in a row", invalid);
        let warnings = [
            (ALERT, vec![1, USER_CANCELED]),
            (APPLICATION_DATA, b"x".to_vec()),
        ];
        let five: Vec<_> = (0..5).flat_map(|_| warnings.clone()).collect();
        let (got, end, _) = authenticated(&five).await;
        assert_eq!(got, b"xxxx");
        refused(
            end,
            "a fifth warning alert",
            io::ErrorKind::ConnectionAborted,
        );
        let (_, end, _) = authenticated(&[(ALERT, vec![2, 40])]).await;
        refused(end, "a fatal alert", io::ErrorKind::ConnectionAborted);
        // A KeyUpdate split across two records is legal: the receive key moves on, and the
        // relay owes the client one of its own (update_requested).
        let (_, end, io) =
            authenticated(&[(HANDSHAKE, vec![KEY_UPDATE, 0]), (HANDSHAKE, vec![0, 1, 1])]).await;
        refused(
            end,
            "end without close_notify",
            io::ErrorKind::UnexpectedEof,
        );
        assert_eq!(io.key_updates, (1, 0));
        assert!(io.tx_update_requested);
    }

    /// A rustls client driven by hand, so its Finished and what follows it leave in one write:
    /// the relay then reads them in one go, during its handshake.
    async fn first_flight(
        then: impl FnOnce(&mut rustls::ClientConnection),
    ) -> (
        TcpStream,
        rustls::ClientConnection,
        tokio::task::JoinHandle<io::Result<RecordIo>>,
    ) {
        let (scfg, ccfg) = configs(cs::TLS13_AES_128_GCM_SHA256);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move { accept(l.accept().await.unwrap().0, scfg).await });
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(ccfg, name).unwrap();
        let mut out = Vec::new();
        client.write_tls(&mut out).unwrap();
        tcp.write_all(&out).await.unwrap();
        let mut buf = vec![0u8; 16 << 10];
        while client.is_handshaking() {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "the relay closed during the handshake");
            client.read_tls(&mut &buf[..n]).unwrap();
            client.process_new_packets().unwrap();
        }
        then(&mut client);
        out.clear();
        while client.wants_write() {
            client.write_tls(&mut out).unwrap();
        }
        tcp.write_all(&out).await.unwrap();
        (tcp, client, server)
    }

    /// What the client reads (plaintext, until the relay's close_notify or `want` bytes).
    async fn client_reads(
        tcp: &mut TcpStream,
        client: &mut rustls::ClientConnection,
        want: usize,
    ) -> Vec<u8> {
        use std::io::Read;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 16 << 10];
        while got.len() < want {
            let mut plain = [0u8; 4096];
            match client.reader().read(&mut plain) {
                Ok(0) => break,
                Ok(n) => {
                    got.extend_from_slice(&plain[..n]);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("client read: {e}"),
            }
            let n = tcp.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            client.read_tls(&mut &buf[..n]).unwrap();
            client
                .process_new_packets()
                .expect("the client opens what the relay sent");
        }
        got
    }

    #[tokio::test]
    async fn a_key_update_in_the_clients_first_flight_is_answered() {
        let (mut tcp, mut client, server) = first_flight(|c| {
            c.refresh_traffic_keys().unwrap();
            std::io::Write::write_all(&mut c.writer(), b"hello").unwrap();
        })
        .await;
        let mut io = server.await.unwrap().unwrap();
        let mut got = [0u8; 5];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        io.write_all(b"world").await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(client_reads(&mut tcp, &mut client, 5).await, b"world");
        assert_eq!(io.key_updates, (1, 1));
    }

    #[tokio::test]
    async fn a_close_notify_in_the_clients_first_flight_ends_the_stream_after_its_data() {
        let (_tcp, _client, server) = first_flight(|c| {
            std::io::Write::write_all(&mut c.writer(), b"GET / HTTP/1.1\r\n\r\n").unwrap();
            c.send_close_notify();
        })
        .await;
        let mut io = server.await.unwrap().expect("the handshake completes");
        let mut got = Vec::new();
        io.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n");
    }
}
