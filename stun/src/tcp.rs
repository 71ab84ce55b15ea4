//! STUN over TCP (RFC 8489 §6.2.2): messages framed by their own length field, any number per
//! connection, pipelining allowed. Anything that is not a valid STUN message closes the
//! connection (after the replies already due are written); so does the idle timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::proto::{self, Ctx, Outcome, RequestResult};
use crate::stats::{StunMetrics, TransportCounters};

/// Largest STUN message accepted over TCP. Binding requests are tiny; this bounds memory per
/// connection.
pub(crate) const MAX_TCP_MESSAGE: usize = 2048;

/// Per-listener limits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) idle: Duration,
    pub(crate) max_connections: usize,
}

/// Accept connections until `cancel` fires; then close all of them and return.
pub(crate) async fn serve(
    listener: TcpListener,
    limits: Limits,
    ctx: Arc<Ctx>,
    metrics: StunMetrics,
    cancel: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            res = listener.accept() => match res {
                Ok((stream, peer)) => {
                    while conns.try_join_next().is_some() {}
                    if conns.len() >= limits.max_connections {
                        metrics.tcp_rejected.increment(1);
                        tracing::debug!(%peer, "STUN TCP connection cap reached; closing");
                        drop(stream);
                        continue;
                    }
                    conns.spawn(connection(stream, peer, ctx.clone(), metrics.tcp.clone(), limits.idle));
                }
                Err(e) => {
                    // Typically EMFILE/ENFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "STUN TCP accept failed; retrying in 100 ms");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

/// Serve one connection.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    counters: TransportCounters,
    idle: Duration,
) {
    let _ = stream.set_nodelay(true);
    // Room for one maximal message plus whatever follows it in the same read.
    let mut buf = vec![0u8; 2 * MAX_TCP_MESSAGE];
    let mut filled = 0;
    let mut reply = vec![0u8; proto::MAX_RESPONSE_LEN];
    let mut out = Vec::new();
    loop {
        let (consumed, close) =
            process(&buf[..filled], peer, &ctx, &counters, &mut reply, &mut out);
        if !out.is_empty() {
            match timeout(idle, stream.write_all(&out)).await {
                Ok(Ok(())) => out.clear(),
                _ => return,
            }
        }
        if close {
            return;
        }
        buf.copy_within(consumed..filled, 0);
        filled -= consumed;
        match timeout(idle, stream.read(&mut buf[filled..])).await {
            Ok(Ok(n)) if n > 0 => filled += n,
            // EOF, error or idle timeout.
            _ => return,
        }
    }
}

/// Handle every complete message at the front of `data`, appending replies to `out`. Returns
/// the bytes consumed and whether to close the connection.
fn process(
    data: &[u8],
    peer: SocketAddr,
    ctx: &Ctx,
    counters: &TransportCounters,
    reply: &mut [u8],
    out: &mut Vec<u8>,
) -> (usize, bool) {
    let mut tally = [0u64; 5];
    let mut start = 0;
    let mut close = false;
    while data.len() - start >= 4 {
        let rest = &data[start..];
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        // Reject garbage as soon as the first four bytes show it, without waiting for more.
        if rest[0] & 0xC0 != 0
            || !len.is_multiple_of(4)
            || proto::HEADER_LEN + len > MAX_TCP_MESSAGE
        {
            tally[RequestResult::Malformed.index()] += 1;
            close = true;
            break;
        }
        let total = proto::HEADER_LEN + len;
        if rest.len() < total {
            break;
        }
        let outcome = proto::handle(&rest[..total], peer, ctx, reply);
        tally[outcome.result().index()] += 1;
        start += total;
        match outcome {
            Outcome::Malformed | Outcome::BadFingerprint => {
                close = true;
                break;
            }
            _ => {
                if let Some(r) = outcome.reply() {
                    out.extend_from_slice(&reply[..r.len]);
                }
            }
        }
    }
    counters.add(&tally);
    (start, close)
}
