//! The relay's own TLS record layer (issue 17): rustls does the handshake and keeps the
//! secrets; this module seals and opens the records after it.
//!
//! Why: a relay decrypts and encrypts every byte it forwards. Through tokio-rustls each
//! received record was read in 4 KiB `recvfrom`s, decrypted, copied into a fresh buffer and
//! copied again into the reader's; each sent record was copied into a fresh buffer before it was
//! sealed (docs/notes-tls-perf.md has the profile). Here a busy connection's read (a caller's
//! buffer of 4 KiB or more) goes straight into the caller's buffer, and each whole record is
//! opened where it lies, its plaintext moved down over the headers and tags before it by the
//! AEAD's own pass (no copy at all; the start of a record left at the end waits here for the
//! next read). A quiet connection's small reads go through a buffer of this layer's, one copy
//! out. The writer seals straight into the buffer it sends.
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

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::ConnectionTrafficSecrets;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::server::client::QUIET_RELEASE;

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

/// Read size of a connection that stays busy (reads fill half their room or more; the buffer
/// doubles at each such read up to this): several 16 KiB records, all opened and handed out
/// by one `poll_read` (fewer `recvfrom`s per byte).
const BUSY_READ: usize = 64 << 10;
/// A read of half this (or half its room, if less) keeps a connection busy: a burst of a whole
/// record and then some, not necessarily half of [`BUSY_READ`].
const BUSY_ROOM: usize = 20 << 10;
/// Read size of a quiet connection (keepalives, pings); most of a relay's connections are.
const IDLE_READ: usize = 1 << 10;
/// Reads in a row smaller than `IDLE_READ` after which a connection counts as quiet and gives
/// its big buffer back. Not one: a busy connection's reads vary in size, and a buffer that
/// shrank and grew again at every short read was reallocated and zeroed at every read.
const QUIET_READS: u8 = 8;
/// A caller's read of at least this much goes straight into its buffer (`poll_read_direct`);
/// a smaller one (a quiet connection's) is served from this layer's own.
const DIRECT_MIN: usize = 4 << 10;
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

/// TCP ended without close_notify, with `held` bytes of a record received: a clean end only at
/// a record boundary (reported as tokio-rustls does, as UnexpectedEof; Go clients close so).
fn tcp_ended(held: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        if held == 0 {
            "TCP closed without close_notify"
        } else {
            "TCP closed in the middle of a TLS record"
        },
    )
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
    /// The error of a record that failed while plaintext before it was being handed out: it is
    /// returned by the next read, after that plaintext.
    deferred: Option<io::Error>,
    /// Socket reads that brought bytes, and the timer that gives a big read buffer back once
    /// the connection has been quiet for `QUIET_RELEASE` (armed only while the buffer is big),
    /// with the count when it was armed: unchanged when it fires means quiet.
    reads: u64,
    quiet: Option<(Pin<Box<tokio::time::Sleep>>, u64)>,
    /// `reads` when the buffer was last given back (no timer until a read after it).
    quiet_done: u64,
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

impl RecordIo {
    /// For tests: set the number of records after which our send key changes.
    #[cfg(test)]
    fn set_tx_limit(&mut self, n: u64) {
        self.tx_limit = n;
    }

    /// Opens the record at `pos` of the layer's own buffer, if it is whole, in place.
    fn open_next(&mut self) -> io::Result<Opened> {
        let mut rbuf = std::mem::take(&mut self.rbuf);
        let mut pos = self.pos;
        let in_place = pos + HEADER;
        let r = self.open_in(&mut rbuf[..self.filled], &mut pos, in_place);
        (self.rbuf, self.pos) = (rbuf, pos);
        r
    }

    /// Opens the record at `*pos` of `buf` (received bytes, to its end), if it is whole, and
    /// moves `*pos` past it. The plaintext goes to `buf[dst..]`, with `dst` at most the start
    /// of the record's body: the AEAD writes it there in the same pass in which it decrypts
    /// (ring's `open_within`), so records opened one after another can close the gaps their
    /// headers and tags leave, at no extra copy.
    fn open_in(&mut self, buf: &mut [u8], pos: &mut usize, dst: usize) -> io::Result<Opened> {
        let avail = buf.len() - *pos;
        if avail < HEADER {
            return Ok(Opened::NeedMore(HEADER));
        }
        let h = &buf[*pos..*pos + HEADER];
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
        let start = *pos + HEADER;
        let end = start + len;
        debug_assert!(dst <= start);
        let header: [u8; HEADER] = buf[*pos..start].try_into().expect("5 bytes");
        *pos = end;
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
                let plain = self
                    .rx
                    .key
                    .open_within(nonce, Aad::from(header), &mut buf[dst..end], start - dst..)
                    .map_err(|_| bad("bad_record_mac: a TLS record did not open"))?;
                // The inner type is the last non-zero byte; zeros after it are padding.
                let Some(at) = plain.iter().rposition(|&b| b != 0) else {
                    return Err(bad("unexpected_message: a TLS record of padding only"));
                };
                // (At most 2^14 bytes before the inner type, by the bound above.)
                (plain[at], dst, dst + at)
            }
            Format::Tls12Gcm => {
                if len < GCM_EXPLICIT + TAG {
                    return Err(bad("a TLS record too short to open"));
                }
                let mut n = [0u8; 12];
                n[..4].copy_from_slice(&self.rx.iv[..4]);
                n[4..].copy_from_slice(&buf[start..start + GCM_EXPLICIT]);
                let aad = tls12_aad(self.rx.seq, typ, len - GCM_EXPLICIT - TAG);
                let plain_len = self
                    .rx
                    .key
                    .open_within(
                        Nonce::assume_unique_for_key(n),
                        Aad::from(aad),
                        &mut buf[dst..end],
                        start - dst + GCM_EXPLICIT..,
                    )
                    .map_err(|_| bad("bad_record_mac: a TLS record did not open"))?
                    .len();
                (typ, dst, dst + plain_len)
            }
            Format::Tls12Chacha => {
                if len < TAG {
                    return Err(bad("a TLS record too short to open"));
                }
                let nonce = Nonce::assume_unique_for_key(self.rx.nonce_bytes());
                let aad = tls12_aad(self.rx.seq, typ, len - TAG);
                let plain_len = self
                    .rx
                    .key
                    .open_within(nonce, Aad::from(aad), &mut buf[dst..end], start - dst..)
                    .map_err(|_| bad("bad_record_mac: a TLS record did not open"))?
                    .len();
                (typ, dst, dst + plain_len)
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
                let a = &buf[from..to];
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
                hs.extend_from_slice(&buf[from..to]);
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

/// A client's sealing half, for tests and the fuzzer (feature `testing`): records sealed as a
/// client holding these secrets would seal them (TLS 1.3, or TLS 1.2 when `tls12`), to send
/// the relay content that is hostile but authenticated.
#[cfg(any(test, feature = "testing"))]
pub struct ClientSealer {
    dir: Direction,
    format: Format,
}

#[cfg(any(test, feature = "testing"))]
impl ClientSealer {
    /// From a client's extracted send secrets (`ExtractedSecrets::tx`).
    pub fn new(tx: (u64, ConnectionTrafficSecrets), tls12: bool) -> io::Result<Self> {
        let (dir, chacha) = Direction::new(tx.1, tx.0)?;
        let format = match (tls12, chacha) {
            (false, _) => Format::Tls13,
            (true, true) => Format::Tls12Chacha,
            (true, false) => Format::Tls12Gcm,
        };
        Ok(ClientSealer { dir, format })
    }

    /// Appends one record of (inner, for TLS 1.3) type `typ` carrying `plain` to `out`.
    pub fn seal(&mut self, typ: u8, plain: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        seal_record(&mut self.dir, self.format, typ, plain, out)
    }
}

impl RecordIo {
    /// Called when the socket has nothing to read: a big read buffer is given back once nothing
    /// has arrived for one to two periods of `QUIET_RELEASE` (the timer wakes the reader for
    /// it); the start of a record it holds, if any, moves to a buffer of its own size. Without
    /// this a connection that sent a burst and went quiet kept 64 KiB here until it spoke
    /// again, the small-read rule above needing reads to apply.
    fn poll_quiet(&mut self, cx: &mut Context<'_>) {
        if self.rbuf.len() <= IDLE_READ || self.quiet_done == self.reads {
            self.quiet = None;
            return;
        }
        let reads = self.reads;
        let (timer, armed_at) = self
            .quiet
            .get_or_insert_with(|| (Box::pin(tokio::time::sleep(QUIET_RELEASE)), reads));
        // Armed again (not at every read) when reads came in since: released between one and
        // two periods after the last read, with no clock read per read.
        while timer.as_mut().poll(cx).is_ready() {
            if *armed_at == reads {
                // Quiet: what is held (the start of a record, if any) moves to a buffer of
                // its size, and no timer again until the next read.
                let held = self.filled - self.pos;
                let mut small = vec![0; held.max(IDLE_READ)];
                small[..held].copy_from_slice(&self.rbuf[self.pos..self.filled]);
                self.rbuf = small;
                (self.pos, self.filled, self.plain) = (0, held, (0, 0));
                self.busy = false;
                self.quiet = None;
                self.quiet_done = reads;
                return;
            }
            timer
                .as_mut()
                .reset(tokio::time::Instant::now() + QUIET_RELEASE);
            *armed_at = reads;
        }
    }

    /// After a socket read of `n` bytes into `room`: counted (the quiet timer), and a read that
    /// filled half its room (of at most `BUSY_ROOM`) or more means the sender is ahead: read
    /// big.
    fn note_read(&mut self, n: usize, room: usize) {
        self.reads += 1;
        self.busy = n * 2 >= room.min(BUSY_ROOM);
        self.small_reads = if n < IDLE_READ {
            self.small_reads.saturating_add(1)
        } else {
            0
        };
    }

    /// Whether the next read can go straight into the caller's buffer (`room` bytes): it is
    /// large enough, the bytes held here are only the start of one record (none whole), and
    /// that record, if its length is known yet, fits.
    fn direct_fits(&self, room: usize) -> bool {
        let held = self.filled - self.pos;
        if room < DIRECT_MIN || held >= room {
            return false;
        }
        if held < HEADER {
            return true;
        }
        let h = &self.rbuf[self.pos..self.pos + HEADER];
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        // A header `open_next` refuses is refused now, not after waiting for its body.
        h[1] == 3 && len <= MAX_BODY && held < HEADER + len && HEADER + len <= room
    }

    /// One socket read into the caller's buffer, after the start of a record held here, and
    /// every whole record in it opened where it lies, its plaintext moved down over the
    /// headers and tags before it by the AEAD itself: the reader gets the plaintext without
    /// the copy out of a buffer of this layer's (which was a fifth of the relay's CPU over TLS
    /// at 1,200 B). The start of a record left at the end is kept here for the next read.
    /// `Ok(true)`: plaintext handed out, or the end of the stream; `Ok(false)`: nothing for
    /// the caller yet, read again.
    fn poll_read_direct(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<bool>> {
        // Readiness first, so that the held bytes are copied only when there is something to
        // read after them.
        if self.tcp.poll_read_ready(cx)?.is_pending() {
            self.poll_quiet(cx);
            return Poll::Pending;
        }
        let base = out.filled().len();
        let room = out.remaining();
        let held = self.filled - self.pos;
        out.put_slice(&self.rbuf[self.pos..self.filled]);
        match Pin::new(&mut self.tcp).poll_read(cx, out) {
            Poll::Ready(Ok(())) => {}
            other => {
                // Nothing read (readiness was stale) or an error: the caller's buffer is as it
                // was, the held bytes still here.
                out.set_filled(base);
                if other.is_pending() {
                    self.poll_quiet(cx);
                }
                return other.map_ok(|()| false);
            }
        }
        let end = out.filled().len();
        let n = end - base - held;
        if n == 0 {
            out.set_filled(base);
            return Poll::Ready(Err(tcp_ended(held)));
        }
        self.note_read(n, room - held);
        (self.pos, self.filled) = (0, 0);
        let region = &mut out.filled_mut()[base..end];
        let (mut at, mut plain) = (0, 0);
        loop {
            match self.open_in(region, &mut at, plain) {
                Ok(Opened::Data(_, to)) => plain = to,
                Ok(Opened::Control) => {}
                Ok(Opened::Closed) => {
                    self.read_eof = true;
                    break;
                }
                Ok(Opened::NeedMore(_)) => {
                    // The start of the next record: kept here (at most one record's bytes).
                    let rest = &region[at..];
                    if self.rbuf.len() < rest.len() {
                        self.rbuf.resize(rest.len().max(IDLE_READ), 0);
                    }
                    self.rbuf[..rest.len()].copy_from_slice(rest);
                    self.filled = rest.len();
                    break;
                }
                Err(e) => {
                    self.broken = true;
                    if plain == 0 {
                        out.set_filled(base);
                        return Poll::Ready(Err(e));
                    }
                    // Returned by the next read, after the plaintext before it.
                    self.deferred = Some(e);
                    break;
                }
            }
        }
        out.set_filled(base + plain);
        Poll::Ready(Ok(plain > 0 || self.read_eof))
    }
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
                // Hand out this record's plaintext and then that of every whole record already
                // received (no socket read): the caller gets all a large read brought at once.
                while this.plain.0 < this.plain.1 {
                    let n = out.remaining().min(this.plain.1 - this.plain.0);
                    out.put_slice(&this.rbuf[this.plain.0..this.plain.0 + n]);
                    this.plain.0 += n;
                    while this.plain.0 == this.plain.1 && out.remaining() > 0 && !this.read_eof {
                        match this.open_next() {
                            Ok(Opened::Data(from, to)) => this.plain = (from, to),
                            Ok(Opened::Control) => {}
                            Ok(Opened::Closed) => this.read_eof = true,
                            Ok(Opened::NeedMore(_)) => break,
                            Err(e) => {
                                // Returned by the next read, after what was handed out.
                                this.broken = true;
                                this.deferred = Some(e);
                                break;
                            }
                        }
                    }
                    if this.broken || out.remaining() == 0 {
                        break;
                    }
                }
                return Poll::Ready(Ok(()));
            }
            if this.broken {
                return Poll::Ready(Err(this
                    .deferred
                    .take()
                    .unwrap_or_else(|| bad("the TLS stream failed before"))));
            }
            if this.read_eof || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.direct_fits(out.remaining()) {
                match this.poll_read_direct(cx, out) {
                    // Only records without data (a KeyUpdate...), or no whole record yet.
                    Poll::Ready(Ok(false)) => continue,
                    Poll::Ready(Ok(true)) => return Poll::Ready(Ok(())),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
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
            // A busy connection's buffer doubles up to BUSY_READ, read by read: a one-off
            // backlog (a stall, a reconnect storm) is not a busy sender, and a buffer that
            // jumped to BUSY_READ at once (zero-filled, so resident) stayed in the heap's
            // high-water mark after the quiet release.
            let want = need.max(if this.busy {
                (this.rbuf.len() * 2).clamp(IDLE_READ, BUSY_READ)
            } else {
                IDLE_READ
            });
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
            let polled = Pin::new(&mut this.tcp).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            if polled.is_pending() {
                this.poll_quiet(cx);
                return Poll::Pending;
            }
            ready!(polled)?;
            if n == 0 {
                return Poll::Ready(Err(tcp_ended(this.filled)));
            }
            this.filled += n;
            this.note_read(n, room);
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

mod handshake;
#[cfg(test)]
mod tests;

pub(crate) use self::handshake::accept;
