//! Unit tests of `e2e.rs`.

use super::*;

struct Pair {
    a: Sessions,
    b: Sessions,
    ka: PublicKey,
    kb: PublicKey,
    now: Instant,
}

fn pair() -> Pair {
    let (sa, sb) = (SecretKey::generate(), SecretKey::generate());
    Pair {
        ka: sa.public(),
        kb: sb.public(),
        a: Sessions::new(sa),
        b: Sessions::new(sb),
        now: Instant::now(),
    }
}

/// A pair with an A–B session (A initiated).
fn established() -> Pair {
    let mut p = pair();
    let first = p.a.seal(&p.kb, b"x", p.now).unwrap();
    pump(&mut p, first);
    p
}

/// Delivers packets back and forth until quiet; returns what each side decrypted.
fn pump(p: &mut Pair, mut to_b: Vec<Vec<u8>>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let mut to_a: Vec<Vec<u8>> = Vec::new();
    while !to_a.is_empty() || !to_b.is_empty() {
        for pkt in std::mem::take(&mut to_b) {
            let o = p.b.open(&p.ka, &pkt, p.now).unwrap();
            to_a.extend(o.replies);
            got_b.extend(o.plaintext);
        }
        for pkt in std::mem::take(&mut to_a) {
            let o = p.a.open(&p.kb, &pkt, p.now).unwrap();
            to_b.extend(o.replies);
            got_a.extend(o.plaintext);
        }
    }
    (got_a, got_b)
}

#[test]
fn handshake_then_data_both_ways_first_packet_kept() {
    let mut p = pair();
    let first = p.a.seal(&p.kb, b"hello", p.now).unwrap();
    assert_eq!(first.len(), 1, "initiation only; data waits");
    assert_eq!(first[0][0], T_INIT);
    let more = p.a.seal(&p.kb, b"second", p.now).unwrap();
    assert!(
        more.is_empty(),
        "no second initiation within the retry time"
    );
    let (_, got_b) = pump(&mut p, first);
    assert_eq!(got_b, vec![b"hello".to_vec(), b"second".to_vec()]);
    // Now B → A on the session B answered.
    let back = p.b.seal(&p.ka, b"reply", p.now).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0][0], T_DATA);
    let o = p.a.open(&p.kb, &back[0], p.now).unwrap();
    assert_eq!(o.plaintext.as_deref(), Some(&b"reply"[..]));
    // Ciphertext does not contain the plaintext.
    let d = p.a.seal(&p.kb, b"secret-marker-123", p.now).unwrap();
    assert!(!d[0].windows(17).any(|w| w == b"secret-marker-123"));
}

#[test]
fn tampered_packets_are_rejected() {
    let mut p = established();
    let d = p.a.seal(&p.kb, b"payload", p.now).unwrap().remove(0);
    for i in [HEADER_DATA, d.len() - 1, 6] {
        let mut t = d.clone();
        t[i] ^= 0x40;
        let e = p.b.open(&p.ka, &t, p.now).unwrap_err();
        assert!(matches!(e, E2eError::Decrypt), "byte {i}: {e:?}");
    }
    // The untampered packet still opens: failed attempts did not move the window.
    assert!(p.b.open(&p.ka, &d, p.now).unwrap().plaintext.is_some());
    // A tampered initiation is rejected.
    let mut q = pair();
    let mut init = q.a.seal(&q.kb, b"x", q.now).unwrap().remove(0);
    let last = init.len() - 1;
    init[last] ^= 1;
    assert!(matches!(
        q.b.open(&q.ka, &init, q.now),
        Err(E2eError::Handshake(_))
    ));
}

#[test]
fn replays_are_rejected_reordering_within_window_accepted() {
    let mut p = established();
    let pkts: Vec<Vec<u8>> = (0..10)
        .map(|i| p.a.seal(&p.kb, &[i], p.now).unwrap().remove(0))
        .collect();
    // Out of order is fine, each once.
    for i in [3usize, 1, 2, 0, 9, 4, 8, 5, 7, 6] {
        let o = p.b.open(&p.ka, &pkts[i], p.now).unwrap();
        assert_eq!(o.plaintext, Some(vec![i as u8]));
    }
    for pkt in &pkts {
        assert!(matches!(
            p.b.open(&p.ka, pkt, p.now),
            Err(E2eError::Replay(_))
        ));
    }
    // Older than the window: rejected even if never seen.
    let late = p.a.seal(&p.kb, b"late", p.now).unwrap().remove(0);
    for _ in 0..REPLAY_WINDOW + 1 {
        let pkt = p.a.seal(&p.kb, b"n", p.now).unwrap().remove(0);
        p.b.open(&p.ka, &pkt, p.now).unwrap();
    }
    assert!(matches!(
        p.b.open(&p.ka, &late, p.now),
        Err(E2eError::Replay(_))
    ));
}

#[test]
fn replayed_handshake_initiation_is_rejected() {
    let mut p = pair();
    let init = p.a.seal(&p.kb, b"x", p.now).unwrap().remove(0);
    p.b.open(&p.ka, &init, p.now).unwrap();
    assert!(matches!(
        p.b.open(&p.ka, &init, p.now),
        Err(E2eError::ReplayedHandshake(_))
    ));
}

#[test]
fn wrong_keys_are_rejected() {
    // A initiates to a key that is not B's: B cannot open it.
    let mut p = pair();
    let other = SecretKey::generate().public();
    let init = p.a.seal(&other, b"x", p.now).unwrap().remove(0);
    assert!(matches!(
        p.b.open(&p.ka, &init, p.now),
        Err(E2eError::Handshake(_))
    ));
    // A's initiation relayed with a forged source: the Noise static key gives it away.
    let mut p = pair();
    let init = p.a.seal(&p.kb, b"x", p.now).unwrap().remove(0);
    let mallory = SecretKey::generate().public();
    assert!(matches!(
        p.b.open(&mallory, &init, p.now),
        Err(E2eError::WrongPeerKey { .. })
    ));
    // A data packet of the A–B session presented as coming from someone else.
    let mut p = established();
    let d = p.a.seal(&p.kb, b"y", p.now).unwrap().remove(0);
    assert!(matches!(
        p.b.open(&mallory, &d, p.now),
        Err(E2eError::WrongSender { .. })
    ));
    // A third node with its own session cannot decrypt A–B traffic.
    let mut c = Sessions::new(SecretKey::generate());
    assert!(c.open(&p.ka, &d, p.now).is_err());
}

#[test]
fn simultaneous_initiation_converges() {
    let mut p = pair();
    let ia = p.a.seal(&p.kb, b"from a", p.now).unwrap();
    let ib = p.b.seal(&p.ka, b"from b", p.now).unwrap();
    // Cross-deliver both initiations, then pump.
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let ob = p.b.open(&p.ka, &ia[0], p.now).unwrap();
    let oa = p.a.open(&p.kb, &ib[0], p.now).unwrap();
    let (ga, gb) = pump(&mut p, oa.replies);
    got_a.extend(ga);
    got_b.extend(gb);
    let mut to_a = ob.replies;
    while !to_a.is_empty() {
        let mut next = Vec::new();
        for pkt in to_a {
            let o = p.a.open(&p.kb, &pkt, p.now).unwrap();
            got_a.extend(o.plaintext);
            for r in o.replies {
                let o2 = p.b.open(&p.ka, &r, p.now).unwrap();
                got_b.extend(o2.plaintext);
                next.extend(o2.replies);
            }
        }
        to_a = next;
    }
    assert_eq!(got_a, vec![b"from b".to_vec()]);
    assert_eq!(got_b, vec![b"from a".to_vec()]);
    // And traffic continues both ways.
    let d = p.a.seal(&p.kb, b"more", p.now).unwrap();
    let (_, gb) = pump(&mut p, d);
    assert_eq!(gb, vec![b"more".to_vec()]);
}

#[test]
fn rekey_replaces_session_and_old_packets_still_open() {
    let mut p = established();
    let old = p.a.seal(&p.kb, b"in flight", p.now).unwrap().remove(0);
    p.now += REKEY_AFTER;
    let out = p.a.seal(&p.kb, b"trigger", p.now).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[1][0], T_INIT, "rekey starts a handshake");
    let (_, got_b) = pump(&mut p, out);
    assert_eq!(got_b, vec![b"trigger".to_vec()]);
    let fresh = p.a.seal(&p.kb, b"new", p.now).unwrap().remove(0);
    assert_ne!(fresh[1..5], old[1..5], "a new session index");
    assert!(p.b.open(&p.ka, &fresh, p.now).unwrap().plaintext.is_some());
    assert!(p.b.open(&p.ka, &old, p.now).unwrap().plaintext.is_some());
    // After PREVIOUS_KEEP the old session is gone.
    p.now += PREVIOUS_KEEP;
    p.b.poll(p.now);
    assert!(matches!(
        p.b.open(&p.ka, &old, p.now),
        Err(E2eError::UnknownSession(_))
    ));
}

#[test]
fn idle_sessions_expire_and_the_next_packet_waits_for_a_new_handshake() {
    let mut p = established();
    let early = p.a.seal(&p.kb, b"early", p.now).unwrap().remove(0);
    // Idle past the send limit: a's next packet is queued behind a new initiation.
    p.now += SEND_LIMIT;
    let out = p.a.seal(&p.kb, b"after idle", p.now).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0][0], T_INIT, "no data on a session past SEND_LIMIT");
    // Past REJECT_AFTER_TIME, poll drops b's session: the early packet opens no more.
    p.now += REJECT_AFTER_TIME - SEND_LIMIT;
    p.b.poll(p.now);
    assert!(!p.b.has_session(&p.ka));
    assert!(matches!(
        p.b.open(&p.ka, &early, p.now),
        Err(E2eError::UnknownSession(_))
    ));
    // The handshake completes and delivers the queued packet, once.
    let (_, got_b) = pump(&mut p, out);
    assert_eq!(got_b, vec![b"after idle".to_vec()]);
    assert!(p.a.has_session(&p.kb) && p.b.has_session(&p.ka));
}

#[test]
fn lost_initiation_is_retried_by_poll() {
    let mut p = pair();
    let _lost = p.a.seal(&p.kb, b"q", p.now).unwrap();
    assert!(p.a.poll(p.now).is_empty());
    p.now += HANDSHAKE_RETRY;
    let retry = p.a.poll(p.now);
    assert_eq!(retry.len(), 1);
    let (_, got_b) = pump(&mut p, vec![retry[0].1.clone()]);
    assert_eq!(got_b, vec![b"q".to_vec()]);
}

#[test]
fn the_largest_packet_fits_one_ipv4_udp_datagram() {
    let mut p = established();
    let pkts = p.a.seal(&p.kb, &vec![0u8; MAX_PLAINTEXT], p.now).unwrap();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].len(), 65_507);
    assert!(p
        .a
        .seal(&p.kb, &vec![0u8; MAX_PLAINTEXT + 1], p.now)
        .is_err());
}

#[test]
fn peer_of_finds_the_sender_by_receiver_index() {
    let mut p = established();
    let pkt = p.a.seal(&p.kb, b"to b", p.now).unwrap().remove(0);
    assert_eq!(p.b.peer_of(&pkt), Some(p.ka));
    assert_eq!(p.a.peer_of(&pkt), None, "a's index space is not b's");
    // A fresh initiation names no index of ours.
    let mut q = pair();
    let init = q.a.seal(&q.kb, b"x", q.now).unwrap().remove(0);
    assert_eq!(q.b.peer_of(&init), None);
    assert_eq!(q.b.peer_of(&[T_DATA, 1]), None, "short packet");
}

#[test]
fn replay_window_unit() {
    let mut w = ReplayWindow::default();
    assert!(w.check(0));
    w.mark(0);
    assert!(!w.check(0));
    let top = REPLAY_WINDOW + 5000;
    w.mark(top);
    assert!(!w.check(top - REPLAY_WINDOW - 1));
    assert!(w.check(top - REPLAY_WINDOW + 1));
    assert!(w.check(top - 1));
    w.mark(top - 1);
    assert!(!w.check(top - 1));
    assert!(w.check(top + 1));
}
