//! Admission control (allowlist file, derper-compatible verify URL) and rate limits (per-client
//! receive bucket, accept rate, per-IP cap), against an in-process relay on loopback.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{eventually, ping_pong, relay_plain, test_limits, ts_connect, RawClient, Relay, T};
use ferry_relay::proto::{self, frame_type as ft, ClientInfo, PublicKey, SecretKey, ServerInfo};
use ferry_relay::server::{AdmissionConfig, Limits, VerifyFail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn relay_with(
    limits: Limits,
    admission: Option<AdmissionConfig>,
    mesh_key: Option<[u8; 32]>,
) -> Relay {
    common::Options::plain()
        .limits(limits)
        .start_with(|c| {
            c.admission = admission;
            c.mesh_key = mesh_key;
        })
        .await
}

/// Upgrades and sends ClientInfo. `Some` with the ServerInfo if admitted; `None` if the relay
/// closed the connection instead (what a refusal looks like, as with derper).
async fn try_handshake(
    relay: &Relay,
    secret: SecretKey,
    info: ClientInfo,
) -> Option<(RawClient, ServerInfo)> {
    let mut c = RawClient::from_parts(common::upgrade(relay).await, secret, PublicKey([0; 32]));
    let f = c.frame().await.expect("ServerKey");
    assert_eq!(f.frame_type, ft::SERVER_KEY);
    c.server_key = proto::parse_server_key(&f.payload).unwrap();
    let payload = proto::client_info_payload(&c.secret, &c.server_key, &info);
    c.send_frame(ft::CLIENT_INFO, &[&payload]).await;
    let f = c.frame().await?;
    assert_eq!(
        f.frame_type,
        ft::SERVER_INFO,
        "the only frame after ClientInfo"
    );
    let si =
        ServerInfo::from_json(&proto::open(&c.secret, &c.server_key, &f.payload).unwrap()).unwrap();
    Some((c, si))
}

fn v2() -> ClientInfo {
    ClientInfo {
        version: 2,
        ..Default::default()
    }
}

async fn admitted(relay: &Relay, secret: &SecretKey) -> bool {
    try_handshake(relay, secret.clone(), v2()).await.is_some()
}

fn nodekey(k: &PublicKey) -> String {
    format!("nodekey:{}\n", k.to_hex())
}

fn admission_sample(relay: &Relay, result: &str) -> f64 {
    relay.server.metrics().sample(
        "ferry_relay_admission_total",
        &format!("result=\"{result}\""),
    )
}

/// Replaces a mounted-ConfigMap-style directory's contents the way the kubelet does: a new
/// timestamped directory, a new `..data` symlink renamed over the old one. `keys.txt` is a
/// symlink to `..data/keys.txt`, so its path never changes.
fn k8s_write(dir: &Path, generation: u32, text: &str) {
    let ts = dir.join(format!("..gen_{generation}"));
    std::fs::create_dir(&ts).unwrap();
    std::fs::write(ts.join("keys.txt"), text).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(ts.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let visible = dir.join("keys.txt");
    if std::fs::symlink_metadata(&visible).is_err() {
        std::os::unix::fs::symlink("..data/keys.txt", &visible).unwrap();
    }
}

#[tokio::test]
async fn allowlist_refuses_strangers_admits_listed_and_follows_a_configmap_swap() {
    let cm = tempfile::tempdir().unwrap();
    let listed = ts_keys::NodeKeyPair::random();
    let listed2 = ts_keys::NodeKeyPair::random();
    let later = SecretKey::generate();
    let removed = SecretKey::generate();
    k8s_write(
        cm.path(),
        1,
        &format!(
            "# team laptops\n{}{}   # ci\n\n{}",
            nodekey(&common::ts_pub(&listed.public)),
            nodekey(&common::ts_pub(&listed2.public)).trim_end(),
            nodekey(&removed.public())
        ),
    );
    let relay = relay_with(
        test_limits(),
        Some(AdmissionConfig {
            allowlist_file: Some(cm.path().join("keys.txt")),
            reload_interval: Duration::from_millis(20),
            ..Default::default()
        }),
        None,
    )
    .await;

    // A stranger is closed right after ClientInfo, without ServerInfo, and counted.
    let stranger = SecretKey::generate();
    assert!(
        !admitted(&relay, &stranger).await,
        "a key not on the list is refused"
    );
    assert_eq!(admission_sample(&relay, "refused_allowlist"), 1.0);
    assert_eq!(relay.server.client_count(), 0);

    // Listed keys get through and exchange packets (Tailscale's own client).
    let a = common::ts_connect_kp(&relay, listed).await;
    let b = common::ts_connect_kp(&relay, listed2).await;
    ping_pong(&a, &b, "listed").await;
    assert!(admitted(&relay, &removed).await);
    assert_eq!(admission_sample(&relay, "allowed"), 3.0);

    // Edit the list the way Kubernetes does (new directory, `..data` symlink swapped): the new
    // key gets in without a restart, and a key taken off the list no longer does.
    k8s_write(cm.path(), 2, &nodekey(&later.public()));
    let deadline = Instant::now() + T;
    while !admitted(&relay, &later).await {
        assert!(
            Instant::now() < deadline,
            "the new allowlist was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!admitted(&relay, &SecretKey::generate()).await);
    assert!(
        !admitted(&relay, &removed).await,
        "a key taken off the list is refused"
    );
    // Established connections are not cut by a list change (as derper: admission is at connect).
    ping_pong(&a, &b, "still connected").await;
}

/// A tiny stand-in for Headscale's `/verify`: answers `{"Allow": <key in the set>}`, records
/// every request body, and can be told to answer 500 or not at all.
#[derive(Clone, Default)]
struct VerifyServer {
    allow: Arc<Mutex<HashSet<String>>>,
    seen: Arc<Mutex<Vec<(String, String, serde_json::Value)>>>,
    mode: Arc<Mutex<&'static str>>,
}

impl VerifyServer {
    async fn start(&self) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let me = me.clone();
                tokio::spawn(async move { me.serve(s).await });
            }
        });
        addr
    }

    async fn serve(&self, mut s: TcpStream) {
        let mut buf = Vec::new();
        loop {
            // One request: head, then Content-Length bytes of body.
            let (head_len, method, ctype, clen) = loop {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut req = httparse::Request::new(&mut headers);
                if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                    let h = |name: &str| {
                        req.headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .map(|h| String::from_utf8_lossy(h.value).to_string())
                    };
                    let clen = h("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0usize);
                    break (
                        n,
                        req.method.unwrap().to_string(),
                        h("content-type").unwrap_or_default(),
                        clen,
                    );
                }
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            while buf.len() < head_len + clen {
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body: serde_json::Value =
                serde_json::from_slice(&buf[head_len..head_len + clen]).unwrap();
            buf.drain(..head_len + clen);
            let key = body["NodePublic"].as_str().unwrap_or("").to_string();
            self.seen.lock().unwrap().push((method, ctype, body));
            let mode = *self.mode.lock().unwrap();
            let resp = match mode {
                "hang" => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
                "500" => {
                    "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".to_string()
                }
                _ => {
                    let allow = self.allow.lock().unwrap().contains(&key);
                    let b = format!("{{\"Allow\":{allow}}}");
                    format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len())
                }
            };
            if s.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

fn verify_cfg(url: String, fail: VerifyFail, timeout: Duration) -> Option<AdmissionConfig> {
    Some(AdmissionConfig {
        verify_url: Some(url),
        verify_fail: fail,
        verify_timeout: timeout,
        ..Default::default()
    })
}

#[tokio::test]
async fn verify_url_allows_refuses_caches_and_sends_derpers_request() {
    let vs = VerifyServer::default();
    let addr = vs.start().await;
    let yes = SecretKey::generate();
    let no = SecretKey::generate();
    vs.allow
        .lock()
        .unwrap()
        .insert(format!("nodekey:{}", yes.public().to_hex()));
    let relay = relay_with(
        test_limits(),
        verify_cfg(
            format!("http://{addr}/verify"),
            VerifyFail::Closed,
            Duration::from_secs(2),
        ),
        None,
    )
    .await;

    assert!(admitted(&relay, &yes).await, "the URL said Allow:true");
    {
        let seen = vs.seen.lock().unwrap();
        let (method, ctype, body) = &seen[0];
        assert_eq!(method, "POST");
        assert_eq!(ctype, "application/json");
        // tailcfg.DERPAdmitClientRequest: {"NodePublic":"nodekey:<hex>","Source":"<ip>"}
        assert_eq!(
            body,
            &serde_json::json!({"NodePublic": format!("nodekey:{}", yes.public().to_hex()), "Source": "127.0.0.1"})
        );
    }
    assert!(!admitted(&relay, &no).await, "the URL said Allow:false");
    assert_eq!(admission_sample(&relay, "allowed"), 1.0);
    assert_eq!(admission_sample(&relay, "refused_verify"), 1.0);

    // Answers are cached: reconnecting does not ask again (both ways).
    let asked = vs.requests();
    assert!(admitted(&relay, &yes).await);
    assert!(!admitted(&relay, &no).await);
    assert_eq!(vs.requests(), asked, "cached answers were reused");

    // A 500 is a failure of the URL, not an answer: fail-closed refuses a new key.
    *vs.mode.lock().unwrap() = "500";
    assert!(!admitted(&relay, &SecretKey::generate()).await);
    assert_eq!(admission_sample(&relay, "verify_error_closed"), 1.0);
}

#[tokio::test]
async fn verify_url_down_fail_closed_refuses_and_fail_open_admits() {
    // Nothing listens on this port (bound, then released).
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let url = format!("http://{dead}/verify");
    let closed = relay_with(
        test_limits(),
        verify_cfg(url.clone(), VerifyFail::Closed, Duration::from_secs(2)),
        None,
    )
    .await;
    assert!(
        !admitted(&closed, &SecretKey::generate()).await,
        "fail-closed refuses"
    );
    assert_eq!(admission_sample(&closed, "verify_error_closed"), 1.0);

    let open = relay_with(
        test_limits(),
        verify_cfg(url, VerifyFail::Open, Duration::from_secs(2)),
        None,
    )
    .await;
    let a = ts_connect(&open).await;
    let b = ts_connect(&open).await;
    ping_pong(&a, &b, "fail-open").await;
    assert_eq!(admission_sample(&open, "verify_error_open"), 2.0);

    // A URL that accepts but never answers: verify_timeout bounds the wait.
    let vs = VerifyServer::default();
    *vs.mode.lock().unwrap() = "hang";
    let addr = vs.start().await;
    let hung = relay_with(
        test_limits(),
        verify_cfg(
            format!("http://{addr}/verify"),
            VerifyFail::Closed,
            Duration::from_millis(200),
        ),
        None,
    )
    .await;
    let t0 = Instant::now();
    assert!(!admitted(&hung, &SecretKey::generate()).await);
    assert!(t0.elapsed() < T, "refused after the timeout, not hung");
    assert_eq!(admission_sample(&hung, "verify_error_closed"), 1.0);
}

#[tokio::test]
async fn mesh_peers_bypass_the_allowlist_and_the_verify_url() {
    let cm = tempfile::tempdir().unwrap();
    let list = cm.path().join("keys.txt");
    std::fs::write(&list, "# nobody\n").unwrap();
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let mesh_key = [7u8; 32];
    let relay = relay_with(
        Limits {
            client_rate_limit: 100_000,
            ..test_limits()
        },
        Some(AdmissionConfig {
            allowlist_file: Some(list),
            verify_url: Some(format!("http://{dead}/verify")),
            ..Default::default()
        }),
        Some(mesh_key),
    )
    .await;
    assert!(
        !admitted(&relay, &SecretKey::generate()).await,
        "an ordinary client is refused"
    );
    let (_peer, si) = try_handshake(
        &relay,
        SecretKey::generate(),
        ClientInfo {
            version: 2,
            mesh_key: Some(mesh_key),
            ..Default::default()
        },
    )
    .await
    .expect("a mesh peer is admitted");
    assert_eq!(
        si.token_bucket_bytes_per_second, None,
        "mesh peers are not rate limited"
    );
    let wrong = try_handshake(
        &relay,
        SecretKey::generate(),
        ClientInfo {
            version: 2,
            mesh_key: Some([8u8; 32]),
            ..Default::default()
        },
    )
    .await;
    assert!(
        wrong.is_none(),
        "a wrong mesh key does not bypass admission"
    );
    assert_eq!(admission_sample(&relay, "refused_allowlist"), 2.0);
    assert_eq!(admission_sample(&relay, "allowed"), 0.0);
}

/// N payload bytes at R bytes/s with a burst of B cannot be forwarded in less than (N-B)/R:
/// a lower bound the bucket guarantees, so the assertion cannot flake on a slow machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_is_slowed_not_cut_and_others_keep_flowing() {
    const RATE: u64 = 1_000_000;
    const PKT: usize = 1000;
    const COUNT: usize = 2000; // 2 MB of payload
    let relay = relay_with(
        Limits {
            client_rate_limit: RATE,
            client_rate_burst: 0,
            // Queueing is not under test: every packet must be able to wait for the receiver.
            queue_depth: COUNT,
            ..test_limits()
        },
        None,
        None,
    )
    .await;

    // ServerInfo advertises the bucket (burst raised to derper's minimum, one whole packet).
    let (mut tx, si) = try_handshake(&relay, SecretKey::generate(), v2())
        .await
        .unwrap();
    assert_eq!(si.token_bucket_bytes_per_second, Some(RATE as u32));
    assert_eq!(si.token_bucket_bytes_burst, Some(65_568));
    let burst = 65_568f64;
    let (mut rx, _) = try_handshake(&relay, SecretKey::generate(), v2())
        .await
        .unwrap();
    let rx_key = rx.key();
    let tx_key = tx.key();

    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let got = Arc::clone(&received);
    let reader = tokio::spawn(async move {
        for i in 0..COUNT {
            let (src, data) = rx.recv().await;
            assert_eq!(src, tx_key);
            assert_eq!(data.len(), PKT);
            assert_eq!(
                u32::from_be_bytes(data[..4].try_into().unwrap()) as usize,
                i,
                "in order, none lost"
            );
            got.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        rx
    });
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        let mut frames = Vec::with_capacity(COUNT * (PKT + 40));
        for i in 0..COUNT {
            let mut p = vec![0u8; PKT];
            p[..4].copy_from_slice(&(i as u32).to_be_bytes());
            proto::put_frame(&mut frames, ft::SEND_PACKET, &[rx_key.as_bytes(), &p]);
        }
        // One big write: the relay's pauses push back through TCP, so this takes a while.
        tx.io.write_all(&frames).await.unwrap();
        tx.io.flush().await.unwrap();
        tx
    });

    // Meanwhile, two other clients exchange packets at their own pace.
    let a = ts_connect(&relay).await;
    let b = ts_connect(&relay).await;
    eventually("the sender's burst is through", || {
        received.load(std::sync::atomic::Ordering::Relaxed) > 10
    })
    .await;
    for i in 0..5 {
        assert!(
            received.load(std::sync::atomic::Ordering::Relaxed) < COUNT,
            "the throttled transfer is still under way"
        );
        ping_pong(&a, &b, &format!("bystander {i}")).await;
    }

    let mut rx = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("every packet arrived")
        .unwrap();
    let elapsed = t0.elapsed().as_secs_f64();
    let bound = ((COUNT * PKT) as f64 - burst) / RATE as f64;
    assert!(
        elapsed >= bound,
        "2 MB at 1 MB/s took {elapsed:.3}s, less than {bound:.3}s"
    );
    let mut tx = writer.await.unwrap();
    // Slowed, not cut: the sender's connection is still up and still delivers.
    tx.send(rx_key, b"after").await;
    assert_eq!(rx.recv().await, (tx_key, b"after".to_vec()));
    let m = relay.server.metrics();
    assert!(m.sample("ferry_relay_rate_limit_delay_seconds_count", "") > 0.0);
    assert_eq!(
        m.sample(
            "ferry_relay_connections_closed_total",
            "reason=\"read_error\""
        ),
        0.0
    );

    // Without a limit, ServerInfo carries no bucket.
    let plain = relay_plain(test_limits()).await;
    let (_c, si) = try_handshake(&plain, SecretKey::generate(), v2())
        .await
        .unwrap();
    assert_eq!(
        (
            si.token_bucket_bytes_per_second,
            si.token_bucket_bytes_burst
        ),
        (None, None)
    );
}

/// Connects and waits for the relay to close at once (a refusal at accept) or not.
async fn refused_at_accept(addr: SocketAddr) -> bool {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // A served connection answers the probe; a refused one is closed before reading it.
    let _ = s
        .write_all(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut b = [0u8; 12];
    match tokio::time::timeout(T, s.read(&mut b))
        .await
        .expect("an answer or a close")
    {
        Ok(0) | Err(_) => true,
        Ok(_) => {
            assert!(b.starts_with(b"HTTP/1.1 200"));
            false
        }
    }
}

#[tokio::test]
async fn accept_rate_and_per_ip_cap_refuse_the_excess_and_count_it() {
    // Three at once, then (practically) none: 0.001/s refills one token in 1000 s.
    let relay = relay_with(
        Limits {
            accept_rate: 0.001,
            accept_burst: 3,
            ..test_limits()
        },
        None,
        None,
    )
    .await;
    for _ in 0..3 {
        assert!(!refused_at_accept(relay.addr()).await);
    }
    assert!(
        refused_at_accept(relay.addr()).await,
        "the fourth is over the burst"
    );
    assert!(refused_at_accept(relay.addr()).await);
    let m = relay.server.metrics();
    assert_eq!(
        m.sample("ferry_relay_rejected_total", "reason=\"accept_rate\""),
        2.0
    );
    assert_eq!(m.sample("ferry_relay_accepts_total", ""), 5.0);

    // Two connections at once per IP: a third is refused while they are open.
    let relay = relay_with(
        Limits {
            max_connections_per_ip: 2,
            ..test_limits()
        },
        None,
        None,
    )
    .await;
    let first = RawClient::connect(&relay).await;
    let _second = RawClient::connect(&relay).await;
    assert!(
        refused_at_accept(relay.addr()).await,
        "a third from 127.0.0.1"
    );
    assert_eq!(
        relay
            .server
            .metrics()
            .sample("ferry_relay_rejected_total", "reason=\"per_ip\""),
        1.0
    );
    // When one closes, its slot is free again.
    drop(first);
    eventually("the closed connection is gone", || {
        relay.server.client_count() == 1
    })
    .await;
    let deadline = Instant::now() + T;
    while refused_at_accept(relay.addr()).await {
        assert!(Instant::now() < deadline, "the slot was not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
