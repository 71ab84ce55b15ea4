//! The record layer against rustls' own client (tokio-rustls over real loopback TCP), for
//! every suite and both versions the relay offers: what one side seals the other opens,
//! byte for byte, across key updates in both directions, and hostile records end the
//! connection with an error.
use std::sync::Arc;

use super::*;
use rustls::crypto::ring::{cipher_suite as cs, default_provider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::SupportedCipherSuite;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::client::TlsStream;

type Client = TlsStream<TcpStream>;

fn configs(suite: SupportedCipherSuite) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
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

/// Several whole records that arrive together are handed out by one read (one pass of the
/// relay's read loop for all a large `recvfrom` brought, not one per record), and a record that
/// fails after them is reported by the next read, with its own error, after their plaintext.
#[tokio::test]
async fn records_received_together_are_read_at_once_and_a_bad_one_after_them_fails_next() {
    let full = pattern(MAX_PLAIN, 7);
    let want = [&b"one"[..], &full, b"three"].concat();
    for (small, alert) in [(false, [2, 40]), (true, [1, CLOSE_NOTIFY])] {
        let (mut server, client) = pair(cs::TLS13_AES_128_GCM_SHA256).await;
        let (mut tcp, conn) = client.into_inner();
        let secrets = conn.dangerous_extract_secrets().unwrap();
        let (mut dir, _) = Direction::new(secrets.tx.1, secrets.tx.0).unwrap();
        // A full record first, read whole: the connection is busy (reads big) from then on.
        let mut raw = Vec::new();
        seal_record(&mut dir, Format::Tls13, APPLICATION_DATA, &full, &mut raw).unwrap();
        tcp.write_all(&raw).await.unwrap();
        let mut first = vec![0u8; full.len()];
        server.read_exact(&mut first).await.unwrap();
        assert!(first == full);
        // Three records and an alert (handshake_failure, or close_notify) in one write.
        let mut raw = Vec::new();
        for plain in [&b"one"[..], &full, b"three"] {
            seal_record(&mut dir, Format::Tls13, APPLICATION_DATA, plain, &mut raw).unwrap();
        }
        seal_record(&mut dir, Format::Tls13, ALERT, &alert, &mut raw).unwrap();
        tcp.write_all(&raw).await.unwrap();
        // All of it in the relay's socket before it reads.
        let mut peek = vec![0u8; raw.len()];
        while server.tcp.peek(&mut peek).await.unwrap() < raw.len() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let mut buf = vec![0u8; if small { 1000 } else { 64 << 10 }];
        let (mut got, mut reads) = (Vec::new(), 0);
        let end = loop {
            match server.read(&mut buf).await {
                Ok(0) => break None,
                Ok(n) => {
                    reads += 1;
                    got.extend_from_slice(&buf[..n]);
                }
                Err(e) => break Some(e),
            }
        };
        assert!(
            got == want,
            "the plaintext came out changed (small reads: {small})"
        );
        if small {
            assert_eq!(reads, want.len().div_ceil(1000));
            assert!(end.is_none(), "close_notify is a clean end: {end:?}");
        } else {
            assert_eq!(
                reads, 1,
                "three records received together took {reads} reads"
            );
            let e = end.expect("the fatal alert fails the read after the data");
            assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
        }
    }
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

/// Records cut anywhere by TCP, read with buffers of every size: reads of 4 KiB and more go
/// straight into the caller's buffer, smaller ones through the layer's own, and a record begun
/// in one kind of read and finished in the other comes out whole; records for the layer itself
/// (warning alerts) and empty ones in between give the reader nothing; a record that fails (a
/// flipped tag bit) after good ones fails a read after their plaintext, whichever path read it.
/// (KeyUpdates on the direct path: the round trips above, whose reads are 5,000 bytes.)
#[tokio::test]
async fn records_cut_anywhere_come_out_whole_whatever_the_read_sizes() {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut rand = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    for suite in ALL {
        let (mut server, client) = pair(suite).await;
        let format = server.format;
        let (mut tcp, conn) = client.into_inner();
        let secrets = conn.dangerous_extract_secrets().unwrap();
        let (mut dir, _) = Direction::new(secrets.tx.1, secrets.tx.0).unwrap();
        let mut raw = Vec::new();
        let mut want = Vec::new();
        for i in 0..300 {
            let len = match rand(4) {
                0 => rand(64),
                1 => 1200 + rand(100),
                2 => rand(MAX_PLAIN + 1),
                _ => MAX_PLAIN,
            };
            let plain = pattern(len, i as u8);
            seal_record(&mut dir, format, APPLICATION_DATA, &plain, &mut raw).unwrap();
            want.extend_from_slice(&plain);
            if i % 97 == 50 {
                // A record for the layer itself (a warning alert), between data records.
                seal_record(&mut dir, format, ALERT, &[1, USER_CANCELED], &mut raw).unwrap();
            }
        }
        // Then a record whose tag does not verify.
        let good = raw.len();
        seal_record(&mut dir, format, APPLICATION_DATA, b"bad", &mut raw).unwrap();
        *raw.last_mut().unwrap() ^= 1;
        let writer = tokio::spawn(async move {
            let mut at = 0;
            while at < raw.len() {
                let n = (1 + rand(40_000)).min(raw.len() - at);
                tcp.write_all(&raw[at..at + n]).await.unwrap();
                at += n;
                tokio::task::yield_now().await;
            }
            tcp
        });
        let mut got = Vec::new();
        let mut sizes = [1000usize, 4 << 10, 5000, 16 << 10, 64 << 10]
            .into_iter()
            .cycle();
        let err = loop {
            let mut buf = vec![0u8; sizes.next().unwrap()];
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(10), server.read(&mut buf));
            match read.await.expect("a read within 10 s") {
                Ok(0) => panic!("{:?}: a clean end where a bad record was", suite.suite()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        assert!(
            got == want,
            "{:?}: {} of {} bytes, not the same ({good} raw bytes were good)",
            suite.suite(),
            got.len(),
            want.len()
        );
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let _tcp = writer.await.unwrap();
    }
}

/// A connection that read through the layer's own buffer (small reads) and then waits with a
/// large one gives that buffer back once quiet, although the old path left its read position
/// at the end of the buffer rather than at 0 (nothing is held).
#[tokio::test]
async fn a_quiet_connection_gives_its_read_buffer_back_after_small_reads() {
    let (mut server, mut client) = pair(cs::TLS13_AES_128_GCM_SHA256).await;
    let sent = pattern(MAX_PLAIN, 3);
    client.write_all(&sent).await.unwrap();
    client.flush().await.unwrap();
    let mut got = Vec::new();
    let mut small = [0u8; 1000];
    while got.len() < sent.len() {
        let n = server.read(&mut small).await.unwrap();
        got.extend_from_slice(&small[..n]);
    }
    assert!(got == sent);
    assert!(server.rbuf.len() > IDLE_READ, "the record grew the buffer");
    let mut big = vec![0u8; 64 << 10];
    let t0 = std::time::Instant::now();
    while server.rbuf.len() > IDLE_READ {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "{} bytes still held 10 s after the last read",
            server.rbuf.len()
        );
        let wait =
            tokio::time::timeout(std::time::Duration::from_millis(200), server.read(&mut big));
        assert!(wait.await.is_err(), "nothing was sent");
    }
    // And it still reads.
    client.write_all(b"again").await.unwrap();
    client.flush().await.unwrap();
    let n = server.read(&mut big).await.unwrap();
    assert_eq!(&big[..n], b"again");
}

/// A backlog of a few KB (what an idle connection finds after the relay stalled for a moment,
/// or at the start of a reconnect storm) is not a busy sender: its buffer grows step by step
/// with what keeps coming, not to the busy size at once. (It did: one read that filled half of
/// the idle buffer made it `BUSY_READ`, zero-filled, so 64 KiB of every such connection became
/// resident; the heap kept them after the quiet release, docs/reliability-scale.md.)
#[tokio::test]
async fn a_small_backlog_grows_the_buffer_step_by_step_not_to_the_busy_size() {
    let (mut server, mut client) = pair(cs::TLS13_AES_128_GCM_SHA256).await;
    // 20 packets' worth of small records, about 5 KB on the wire, all there before the read.
    let mut sent = Vec::new();
    for i in 0..20u8 {
        let p = pattern(200, i);
        client.write_all(&p).await.unwrap();
        client.flush().await.unwrap();
        sent.extend_from_slice(&p);
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    // Read as the relay's reader does while idle: 512 bytes at a time.
    let mut got = Vec::new();
    let mut small = [0u8; 512];
    while got.len() < sent.len() {
        let n = server.read(&mut small).await.unwrap();
        got.extend_from_slice(&small[..n]);
    }
    assert!(got == sent);
    assert!(
        server.rbuf.len() <= 16 << 10,
        "a 5 KB backlog grew the record buffer to {} bytes",
        server.rbuf.len()
    );
}
