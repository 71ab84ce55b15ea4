//! Shared helpers for the integration tests: a server with a local metrics recorder, a STUN
//! client over real sockets, and a decoder that is not ours (stun_codec).

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytecodec::DecodeExt;
use ferry_stun::{StunConfig, StunMetrics, StunServer};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use stun_codec::rfc5389::attributes::{
    ErrorCode, Fingerprint, MappedAddress, Software, UnknownAttributes, XorMappedAddress,
};
use stun_codec::rfc5780::attributes::{OtherAddress, ResponseOrigin};
use stun_codec::MessageDecoder;

stun_codec::define_attribute_enums!(
    Attr,
    AttrDecoder,
    AttrEncoder,
    [
        MappedAddress,
        XorMappedAddress,
        Software,
        Fingerprint,
        ErrorCode,
        UnknownAttributes,
        ResponseOrigin,
        OtherAddress
    ]
);

/// Upper bound for anything a test waits for: a failure guard, never a synchronisation.
pub const GUARD: Duration = Duration::from_secs(10);

/// A running server plus its private metrics recorder.
pub struct Harness {
    pub server: StunServer,
    metrics: Counters,
    _recorder: DebuggingRecorder,
}

/// Cumulative counter values. `Snapshotter::snapshot` resets counters to zero as it reads
/// them, so the deltas are added up here.
struct Counters {
    snapshotter: Snapshotter,
    totals: Mutex<BTreeMap<MetricId, u64>>,
}

/// A metric name and its sorted labels.
type MetricId = (String, Vec<(String, String)>);

impl Counters {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let mut totals = self.totals.lock().unwrap();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            if let DebugValue::Counter(n) = value {
                let key = key.key();
                let mut l: Vec<(String, String)> = key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                l.sort();
                *totals.entry((key.name().to_owned(), l)).or_default() += n;
            }
        }
        let mut want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        want.sort();
        totals.get(&(name.to_owned(), want)).copied().unwrap_or(0)
    }
}

impl Harness {
    pub async fn start(cfg: StunConfig) -> Harness {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let metrics = metrics::with_local_recorder(&recorder, StunMetrics::register);
        let server = StunServer::spawn_with_metrics(cfg, metrics)
            .await
            .expect("server starts");
        Harness {
            server,
            metrics: Counters {
                snapshotter,
                totals: Mutex::default(),
            },
            _recorder: recorder,
        }
    }

    pub fn udp(&self) -> SocketAddr {
        self.server.udp_addrs()[0]
    }

    pub fn tcp(&self) -> SocketAddr {
        self.server.tcp_addrs()[0]
    }

    /// `ferry_stun_requests_total{transport, result}`.
    pub fn count(&self, transport: &str, result: &str) -> u64 {
        self.counter(
            ferry_stun::REQUESTS_TOTAL,
            &[("transport", transport), ("result", result)],
        )
    }

    /// Any counter, by name and exact label set (0 if never incremented).
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.metrics.get(name, labels)
    }
}

/// Server config for tests: only the given addresses.
pub fn config(udp: &[&str], tcp: &[&str]) -> StunConfig {
    StunConfig {
        udp_addrs: udp.iter().map(|a| a.parse().unwrap()).collect(),
        tcp_addrs: tcp.iter().map(|a| a.parse().unwrap()).collect(),
        ..Default::default()
    }
}

/// Whether this machine can use IPv6 loopback; prints why a test is skipped if not.
pub fn ipv6_available(test: &str) -> bool {
    match std::net::UdpSocket::bind("[::1]:0") {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped {test}: IPv6 loopback ::1 is unavailable here ({e})");
            false
        }
    }
}

/// Decode with stun_codec (which also verifies FINGERPRINT).
pub fn decode(bytes: &[u8]) -> stun_codec::Message<Attr> {
    MessageDecoder::<Attr>::new()
        .decode_from_bytes(bytes)
        .expect("header")
        .unwrap_or_else(|b| panic!("broken reply: {b:?}"))
}

/// Send `req` from `sock` to `to` and wait for one datagram back.
pub async fn udp_exchange(
    sock: &tokio::net::UdpSocket,
    to: SocketAddr,
    req: &[u8],
) -> (Vec<u8>, SocketAddr) {
    sock.send_to(req, to).await.unwrap();
    recv(sock).await
}

/// Wait for one datagram (failing after [`GUARD`]).
pub async fn recv(sock: &tokio::net::UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 2048];
    let (n, from) = tokio::time::timeout(GUARD, sock.recv_from(&mut buf))
        .await
        .expect("no reply within the guard time")
        .unwrap();
    buf.truncate(n);
    (buf, from)
}

/// Read one STUN message (header + length) from a TCP stream.
pub async fn read_stun<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 20];
    tokio::time::timeout(GUARD, r.read_exact(&mut head))
        .await
        .expect("no reply within the guard time")
        .unwrap();
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let mut msg = head.to_vec();
    msg.resize(20 + len, 0);
    tokio::time::timeout(GUARD, r.read_exact(&mut msg[20..]))
        .await
        .expect("truncated reply")
        .unwrap();
    msg
}

/// Wait until the peer closes the connection (EOF or reset); panics after [`GUARD`].
pub async fn expect_closed(stream: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(GUARD, stream.read(&mut buf))
            .await
            .expect("connection was not closed within the guard time")
        {
            Ok(0) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

/// A transaction id unique within a test run.
pub fn txid(n: u32) -> [u8; 12] {
    let mut t = [0x42u8; 12];
    t[8..].copy_from_slice(&n.to_be_bytes());
    t
}
