//! The handshake half: rustls' unbuffered server connection, fed one record at a time, then
//! the hand-over of its secrets to the record layer ([`RecordIo`]).

use std::io;
use std::sync::Arc;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls::{ProtocolVersion, SupportedCipherSuite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{bad, tls_err, Direction, Format, RecordIo, HEADER, MAX_HANDSHAKE_BUF};

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
        deferred: None,
        reads: 0,
        quiet_done: u64::MAX,
        quiet: None,
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
