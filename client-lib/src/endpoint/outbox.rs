//! The datagrams one actor event sends from the main sockets, kept until the event ends and
//! then handed to the kernel together (Linux): consecutive datagrams of one size to one address
//! go as one UDP GSO message (`UDP_SEGMENT`, Linux 4.18+) that the kernel cuts into the same
//! datagrams, the rest side by side in the same `sendmmsg`. What leaves is the datagrams one
//! `send_to` each would have sent, in the same order per socket. What must not wait (a punch,
//! a birthday socket's probes, a CallMeMaybe via DERP that announces pings) first flushes what
//! is kept, so it still follows what the event sent before it; `send`/`send_batch` answer
//! after the flush.
//!
//! Why: a burst from [`super::Endpoint::send_batch`] (a `ferry tunnel` under load) is one event,
//! so its datagrams to the peer's address, or to its UDP relay, cross the kernel's UDP and IP
//! layers once per run instead of once per datagram, and a UDP relay that reads with GRO takes
//! the run in one piece too (docs/notes-udp-relay.md §7.3). A single datagram costs what it did.
//!
//! The batch code is `ferry_proto::mmsg::GsoSendBatch`, the one the relay's UDP relay path uses:
//! only datagrams that fit a 1,500-byte MTU under IPv6 are coalesced, and a kernel that refuses
//! a GSO message gets its datagrams one by one (after `EIO`, GSO stays off).

use std::net::SocketAddr;

use tracing::debug;

use crate::udp::Sockets;

/// Bytes kept per socket before the event's sends must go out early: about a hundred
/// 1,280-byte datagrams, more than one [`super::Endpoint::send_batch`] of [`MAX_BATCH`].
#[cfg(target_os = "linux")]
const OUTBOX_BYTES: usize = 128 << 10;

/// The most datagrams one [`super::Endpoint::send_batch`] carries in one command.
pub const MAX_BATCH: usize = 64;

/// What a flush handed to the kernel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Flushed {
    /// Datagrams.
    pub(super) datagrams: u64,
    /// Messages they went as (a GSO run is one).
    pub(super) messages: u64,
}

/// Datagrams waiting for the end of the event, per main socket (IPv4, IPv6 if there is one).
pub(super) struct Outbox {
    #[cfg(target_os = "linux")]
    fams: [Option<ferry_proto::mmsg::GsoSendBatch>; 2],
    #[cfg(not(target_os = "linux"))]
    kept: Vec<(SocketAddr, Vec<u8>)>,
}

impl Outbox {
    /// `gso`: coalesce runs into GSO messages (else one message per datagram, still batched);
    /// `v6`: there is an IPv6 socket.
    #[cfg_attr(not(target_os = "linux"), allow(unused_variables))]
    pub(super) fn new(gso: bool, v6: bool) -> Outbox {
        #[cfg(target_os = "linux")]
        {
            use ferry_proto::mmsg::{GsoSendBatch, UDP_BATCH};
            let batch = || GsoSendBatch::new(UDP_BATCH, OUTBOX_BYTES, gso);
            Outbox {
                fams: [Some(batch()), v6.then(batch)],
            }
        }
        #[cfg(not(target_os = "linux"))]
        Outbox { kept: Vec::new() }
    }

    /// Keeps `d` for `to`. False, keeping nothing, when that socket's room is used up: flush
    /// and push again.
    pub(super) fn push(&mut self, to: SocketAddr, d: &[u8]) -> bool {
        #[cfg(target_os = "linux")]
        {
            // No socket of that family: nothing to keep (the caller checks first).
            self.fams[usize::from(to.is_ipv6())]
                .as_mut()
                .is_none_or(|b| b.push(d, to))
        }
        #[cfg(not(target_os = "linux"))]
        {
            self.kept.push((to, d.to_vec()));
            true
        }
    }

    /// Whether GSO is (still) on for the IPv4 socket: a test hook.
    #[cfg(test)]
    pub(super) fn gso(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            self.fams[0].as_ref().is_some_and(|b| b.gso())
        }
        #[cfg(not(target_os = "linux"))]
        false
    }

    /// Sends everything kept, waiting while a socket's send buffer is full. A datagram the
    /// kernel refuses (no route, say) is skipped and logged, as a failed `send_to` was.
    pub(super) async fn flush(&mut self, sockets: &Sockets) -> Flushed {
        let mut out = Flushed::default();
        #[cfg(target_os = "linux")]
        for (i, batch) in self.fams.iter_mut().enumerate() {
            let Some(batch) = batch else {
                continue;
            };
            if batch.is_empty() {
                continue;
            }
            let sock = if i == 0 {
                Some(&sockets.v4)
            } else {
                sockets.v6.as_ref()
            };
            if let Some(sock) = sock {
                out.datagrams += batch.datagrams() as u64;
                out.messages += batch.len() as u64;
                crate::udp::send_gso_batch(sock, batch, |_, e| {
                    if let Some(e) = e {
                        debug!("UDP send failed: {e}");
                    }
                })
                .await;
            }
            batch.clear();
        }
        #[cfg(not(target_os = "linux"))]
        for (to, d) in self.kept.drain(..) {
            if let Some(sock) = sockets.for_addr(&to) {
                out.datagrams += 1;
                out.messages += 1;
                if let Err(e) = sock.send_to(&d, to).await {
                    debug!(%to, "UDP send failed: {e}");
                }
            }
        }
        out
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use ferry_proto::mmsg::RecvBatch;
    use std::os::fd::AsRawFd;
    use tokio::net::UdpSocket;

    /// A receiver that reads with GRO (set before anything is sent to it: the kernel decides
    /// on arrival whether to keep a GSO message whole).
    async fn gro_receiver() -> (UdpSocket, RecvBatch) {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut batch = RecvBatch::new(64, 65_536);
        assert!(batch.enable_gro(sock.as_raw_fd()));
        (sock, batch)
    }

    /// Reads `want` datagrams: each entry as (its bytes, segment size: its length when it is one
    /// datagram).
    async fn read_runs(
        rx: &UdpSocket,
        batch: &mut RecvBatch,
        want: usize,
    ) -> Vec<(Vec<u8>, usize)> {
        let mut got = Vec::new();
        let mut datagrams = 0;
        while datagrams < want {
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                rx.async_io(tokio::io::Interest::READABLE, || batch.recv(rx.as_raw_fd())),
            )
            .await
            .expect("datagrams in time")
            .expect("recv");
            for i in 0..n {
                let (d, _) = batch.get(i).expect("entry");
                let seg = batch.segment_size(i);
                datagrams += d.len().div_ceil(seg.max(1));
                got.push((d.to_vec(), seg));
            }
        }
        got
    }

    async fn sockets() -> Sockets {
        Sockets::bind("127.0.0.1:0".parse().unwrap(), None, None)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_run_to_one_address_leaves_as_one_gso_message() {
        let s = sockets().await;
        let (a, mut ra) = gro_receiver().await;
        let (b, mut rb) = gro_receiver().await;
        let (to_a, to_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let mut ob = Outbox::new(true, false);
        // Ten to a (the last shorter), two to b, one more to a.
        for i in 0..10u8 {
            let len = if i == 9 { 700 } else { 1200 };
            assert!(ob.push(to_a, &vec![i; len]));
        }
        assert!(ob.push(to_b, &[20; 80]));
        assert!(ob.push(to_b, &[21; 80]));
        assert!(ob.push(to_a, &[22; 1200]));
        let f = ob.flush(&s).await;
        assert_eq!(
            f,
            Flushed {
                datagrams: 13,
                messages: 3
            }
        );
        // A GRO reader sees the first run as one buffer cut at 1,200 bytes: it went as one
        // GSO message. Its bytes are the ten datagrams back to back.
        let runs = read_runs(&a, &mut ra, 11).await;
        let mut want: Vec<u8> = (0..9u8).flat_map(|i| vec![i; 1200]).collect();
        want.extend(vec![9u8; 700]);
        assert_eq!(
            (runs[0].0.len(), runs[0].1),
            (want.len(), 1200),
            "one GSO run"
        );
        assert!(
            runs[0].0 == want,
            "the run's bytes are the ten datagrams in order"
        );
        assert!(runs[1].0 == vec![22; 1200]);
        let runs = read_runs(&b, &mut rb, 2).await;
        let all: Vec<u8> = runs.iter().flat_map(|r| r.0.clone()).collect();
        assert!(all == [vec![20; 80], vec![21; 80]].concat());
    }

    #[tokio::test]
    async fn without_gso_each_datagram_is_its_own_message_and_arrives_alone() {
        let s = sockets().await;
        let (a, mut ra) = gro_receiver().await;
        let to_a = a.local_addr().unwrap();
        let mut ob = Outbox::new(false, false);
        for i in 0..5u8 {
            assert!(ob.push(to_a, &[i; 1200]));
        }
        assert_eq!(
            ob.flush(&s).await,
            Flushed {
                datagrams: 5,
                messages: 5
            }
        );
        let runs = read_runs(&a, &mut ra, 5).await;
        assert_eq!(
            runs.len(),
            5,
            "five datagrams, five entries: nothing coalesced"
        );
        for (i, (d, seg)) in runs.iter().enumerate() {
            assert!(d == &vec![i as u8; 1200] && *seg == 1200, "datagram {i}");
        }
    }

    #[tokio::test]
    async fn a_full_outbox_says_so_and_a_flush_empties_it() {
        let s = sockets().await;
        let (a, mut ra) = gro_receiver().await;
        let to_a = a.local_addr().unwrap();
        let mut ob = Outbox::new(true, false);
        let mut kept = 0;
        while ob.push(to_a, &[7; 1400]) {
            kept += 1;
        }
        assert_eq!(kept, OUTBOX_BYTES / 1400);
        assert!(ob.gso());
        let f = ob.flush(&s).await;
        assert_eq!(f.datagrams, kept as u64);
        assert!(ob.push(to_a, &[7; 1400]), "room again after the flush");
        let runs = read_runs(&a, &mut ra, kept).await;
        let bytes: usize = runs.iter().map(|r| r.0.len()).sum();
        assert_eq!(bytes, kept * 1400);
    }
}
