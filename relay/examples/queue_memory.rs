//! What full receiver queues really hold: an in-process relay, N receivers that read a trickle
//! (2 KiB every 200 ms: just enough that the relay's 2 s write timeout never cuts them, the
//! way a slow or hostile client would), and a sender that fills every receiver's queue with small
//! packets. Prints the process's RSS
//! growth per receiver next to the bytes the queues account for (payload + 64 per packet).
//!
//! Two sender patterns:
//! - `batched`: one packet to each receiver in turn, written in large batches (each 8 KiB read
//!   of the relay carries packets for many receivers);
//! - `spread`: every write carries one packet for a stalled receiver and fills the rest of the
//!   relay's 8 KiB read with packets for a receiver that reads (the worst case for buffer
//!   sharing: each queued packet is the only long-lived slice of its read buffer).
//!
//! ```text
//! cargo run --release -p ferry-relay --example queue_memory -- batched|spread [receivers] [size]
//! ```
//! (defaults: 500 receivers, 100-byte packets; one pattern per run, since freed heap is reused
//! and would hide the second run's growth). Clients live in the same process but keep no
//! payload in user space (unread data sits in kernel socket buffers), so the growth is the
//! relay's queues and write buffers.
//!
//! The kernel's socket buffers must be small for the queues to fill: with the default limits
//! (send buffers autotuned up to 4 MiB) they absorb every packet and the example reports 0
//! queued. Run it in a network namespace with small limits (as root; the figures in
//! docs/operating.md were taken so):
//!
//! ```text
//! ip netns add qm && ip -n qm link set lo up
//! ip netns exec qm sysctl -qw net.ipv4.tcp_wmem="4096 16384 65536" net.ipv4.tcp_rmem="4096 16384 65536"
//! ip netns exec qm target/release/examples/queue_memory spread
//! ip netns del qm
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use ferry_relay::proto::client::{ClientHandshake, HttpUpgrade, Step, Upgrade};
use ferry_relay::proto::{self, ClientInfo, PublicKey, SecretKey};
use ferry_relay::server::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Plain-HTTP upgrade and DERP handshake. A small receive buffer makes a client that never
/// reads stall the relay's writer for it after a few KiB.
async fn connect(addr: SocketAddr, small_rcvbuf: bool) -> (TcpStream, PublicKey) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    if small_rcvbuf {
        sock.set_recv_buffer_size(4096).unwrap();
    }
    let mut io = sock.connect(addr).await.unwrap();
    let secret = SecretKey::generate();
    let up = Upgrade::Http(HttpUpgrade::new(addr.to_string(), "queue-memory/1"));
    let (mut hs, first) = ClientHandshake::new(secret.clone(), ClientInfo::default(), up);
    io.write_all(&first).await.unwrap();
    let mut buf = BytesMut::new();
    loop {
        match hs.feed(&mut buf).unwrap() {
            Step::NeedMore => assert!(io.read_buf(&mut buf).await.unwrap() > 0, "closed"),
            Step::ServerKey { client_info, .. } => io.write_all(&client_info).await.unwrap(),
            Step::Established(_) => return (io, secret.public()),
        }
    }
}

async fn settle_rss() -> u64 {
    // Let writers block and queues fill; RSS settles once nothing moves.
    let mut last = rss_kib();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_kib();
        if now.abs_diff(last) < 256 {
            return now;
        }
        last = now;
    }
}

async fn run(pattern: &str, n: usize, size: usize) {
    let server = Server::spawn(Config::dev_loopback()).await.unwrap();
    let addr = server.listen_addr();
    let mut receivers = Vec::with_capacity(n);
    for _ in 0..n {
        let (mut io, key) = connect(addr, true).await;
        tokio::spawn(async move {
            let mut b = [0u8; 2048];
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if io.read_exact(&mut b).await.is_err() {
                    return;
                }
            }
        });
        receivers.push(((), key));
    }
    // A sink that reads everything (the `spread` filler goes there).
    let (mut sink, sink_key) = connect(addr, false).await;
    tokio::spawn(async move {
        let mut b = vec![0u8; 1 << 16];
        while sink.read(&mut b).await.map(|n| n > 0).unwrap_or(false) {}
    });
    let (mut sender, _) = connect(addr, false).await;
    let before = settle_rss().await;
    let payload = vec![0x5au8; size];
    // Enough rounds that every queue is full many times over.
    let per_queue = (128 << 10) / (size + 64) + 32;
    let rounds = 3 * per_queue;
    let mut out = Vec::with_capacity(1 << 20);
    match pattern {
        "batched" => {
            for _ in 0..rounds {
                for (_, k) in &receivers {
                    proto::put_send_packet(&mut out, k, &payload);
                }
                sender.write_all(&out).await.unwrap();
                out.clear();
            }
        }
        "spread" => {
            // One packet for a stalled receiver, then filler to the sink up to 8 KiB, each as
            // its own write so the relay reads them apart.
            let filler = vec![0u8; 8192 - 2 * (size + 37) - 37];
            for _ in 0..rounds {
                for (_, k) in &receivers {
                    proto::put_send_packet(&mut out, k, &payload);
                    proto::put_send_packet(&mut out, &sink_key, &filler);
                    sender.write_all(&out).await.unwrap();
                    out.clear();
                    tokio::task::yield_now().await;
                }
            }
        }
        other => panic!("unknown pattern {other}"),
    }
    let after = settle_rss().await;
    let (queued, accounted) = server.queued();
    let cut = server.metrics().sample(
        "ferry_relay_connections_closed_total",
        "reason=\"write_timeout\"",
    );
    assert_eq!(
        cut, 0.0,
        "receivers were cut by the write timeout: the measurement is void"
    );
    let accounted_kib = accounted as u64 / 1024;
    println!(
        "{pattern:8} {n} receivers, {size} B packets: RSS +{} KiB (+{:.1} KiB per receiver); \
         queued {queued} packets = {accounted_kib} KiB accounted ({:.1} KiB per receiver); RSS / accounted = {:.2}",
        after - before,
        (after - before) as f64 / n as f64,
        accounted_kib as f64 / n as f64,
        (after - before) as f64 / accounted_kib.max(1) as f64,
    );
    drop(receivers);
    drop(sender);
    drop(server);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let pattern = args.get(1).map(String::as_str).unwrap_or("spread");
    let n: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(500);
    let size: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(100);
    run(pattern, n, size).await;
}
