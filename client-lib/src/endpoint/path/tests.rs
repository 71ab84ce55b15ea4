//! [`PeerPath`]'s rules on a fake clock: `t0 = Instant::now()`, advanced by hand. Each test
//! names the rule it pins; `/tmp/notes/path-mutations.md` (closing note of issue 13) lists a
//! one-line mutation per rule that makes it fail.

use super::*;
use ferry_proto::SecretKey;

const A: &str = "198.51.100.7:41641";
const B: &str = "198.51.100.8:41641";
const V6: &str = "[2001:db8::7]:41641";
const OBSERVED: &str = "203.0.113.5:1234";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn new_pp() -> PeerPath {
    PeerPath::new(
        SecretKey::generate().public(),
        DirectOptions::default(),
        false,
    )
}

fn env() -> Env {
    Env::default()
}

fn pkt(len: usize) -> Bytes {
    Bytes::from(vec![7; len])
}

/// The pings among `actions`: (address, socket, txid, pad).
fn pings(actions: &[Action]) -> Vec<(SocketAddr, u32, TxId, usize)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Ping {
                addr,
                via,
                txid,
                pad,
            } => Some((*addr, *via, *txid, *pad)),
            _ => None,
        })
        .collect()
}

fn has_relay(actions: &[Action]) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::SendRelay { .. }))
}

fn has_direct(actions: &[Action]) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::SendDirect { .. }))
}

/// Packets queued for a paced resend.
fn resent(actions: &[Action]) -> usize {
    actions
        .iter()
        .map(|a| match a {
            Action::QueuePaced { pkts, resend: true } => pkts.len(),
            _ => 0,
        })
        .sum()
}

/// Pings `a` and answers it 10 ms later: `a` is the direct path (rtt 10 ms). The pong's time.
fn establish(pp: &mut PeerPath, t: Instant, a: SocketAddr) -> Instant {
    let Action::Ping { txid, .. } = pp.ping(t, a, udp::MAIN) else {
        unreachable!()
    };
    let t = t + ms(10);
    let out = pp.on_pong(t, a, udp::MAIN, txid, addr(OBSERVED));
    assert!(out.contains(&Action::SetPath(PathChoice::Direct(a))));
    t
}

/// Sends `n` packets at `t` direct-only (asserts it).
fn send_direct_only(pp: &mut PeerPath, t: Instant, n: usize) {
    for _ in 0..n {
        let out = pp.on_send(t, pkt(100), &env());
        assert!(has_direct(&out) && !has_relay(&out), "{out:?}");
    }
}

// ----- R1 / R12: path selection and relay fallback -----

#[test]
fn relay_until_a_pong_then_direct_and_back_to_the_relay_at_expiry() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    pp.on_activity(t0);
    let out = pp.on_send(t0, pkt(100), &env());
    assert_eq!(out[0], Action::SetPath(PathChoice::Relay));
    assert_eq!(out[1], Action::SendRelay { pkt: pkt(100) });
    assert!(out.contains(&Action::CallMeMaybe { punched: false }));
    let a = addr(A);
    let t1 = establish(&mut pp, t0, a);
    let out = pp.on_send(t1, pkt(100), &env());
    assert_eq!(
        out,
        vec![
            Action::SetPath(PathChoice::Direct(a)),
            Action::SendDirect {
                addr: a,
                via: udp::MAIN,
                pkt: pkt(100)
            }
        ]
    );
    // Just before trust: still direct (stale, so also via the relay). At trust: no direct
    // path, even before the tick clears it.
    let before = pp.on_send(t1 + pp.cfg.trust - ms(1), pkt(100), &env());
    assert!(has_direct(&before));
    let expiry = t1 + pp.cfg.trust;
    assert!(pp.direct(expiry).is_none());
    // The tick expires it: the kept packet goes via the relay, the path leaves Direct(a),
    // and the active peer is probed again.
    let out = pp.tick(expiry, &env());
    assert_eq!(resent(&out), 1, "{out:?}");
    assert!(out.contains(&Action::LeaveDirect(a)));
    assert!(out.contains(&Action::CallMeMaybe { punched: false }));
    assert!(pp.best_via().is_none());
    let at = pp.on_send(expiry, pkt(100), &env());
    assert!(!has_direct(&at) && has_relay(&at), "{at:?}");
    assert_eq!(at[0], Action::SetPath(PathChoice::Relay));
}

// ----- R2 / R3: both paths while stale or suspect -----

#[test]
fn a_stale_path_carries_data_on_both_paths_and_keeps_nothing() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let t1 = establish(&mut pp, t0, addr(A));
    let hb2 = pp.cfg.heartbeat * 2;
    // Exactly two heartbeats: not stale yet (strict).
    let out = pp.on_send(t1 + hb2, pkt(100), &env());
    assert!(has_direct(&out) && !has_relay(&out));
    assert_eq!(pp.unacked.len(), 1);
    let out = pp.on_send(t1 + hb2 + ms(1), pkt(100), &env());
    assert!(has_direct(&out) && has_relay(&out), "{out:?}");
    assert_eq!(pp.unacked.len(), 1, "a packet on both paths is not kept");
}

#[test]
fn a_suspect_path_carries_data_on_both_paths_until_a_pong() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let t1 = establish(&mut pp, t0, addr(A));
    send_direct_only(&mut pp, t1, 1);
    assert_eq!(pings(&pp.tick(t1 + ACK_INTERVAL, &env())).len(), 1);
    let out = pp.tick(t1 + ACK_INTERVAL + ACK_TIMEOUT_MIN, &env());
    assert_eq!(resent(&out), 1);
    let out = pp.on_send(t1 + ACK_INTERVAL + ACK_TIMEOUT_MIN, pkt(100), &env());
    assert!(has_direct(&out) && has_relay(&out), "{out:?}");
    assert!(pp.unacked.is_empty());
}

// ----- R6: ack pings -----

#[test]
fn an_ack_ping_goes_out_after_100ms_and_only_one_waits_at_a_time() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let a = addr(A);
    let t1 = establish(&mut pp, t0, a);
    send_direct_only(&mut pp, t1, 3);
    assert!(pings(&pp.tick(t1 + ACK_INTERVAL - ms(1), &env())).is_empty());
    let out = pp.tick(t1 + ACK_INTERVAL, &env());
    let p = pings(&out);
    assert_eq!(p.len(), 1, "{out:?}");
    assert_eq!((p[0].0, p[0].1), (a, udp::MAIN));
    // Waiting for its pong (not overdue yet): no second ack ping, by tick or send.
    assert!(pings(&pp.tick(t1 + ACK_INTERVAL + ms(150), &env())).is_empty());
    assert!(pings(&pp.on_send(t1 + ACK_INTERVAL + ms(150), pkt(100), &env())).is_empty());
}

#[test]
fn an_ack_ping_goes_out_with_the_128th_kept_packet() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let t1 = establish(&mut pp, t0, addr(A));
    for _ in 0..ACK_COUNT - 1 {
        assert!(pings(&pp.on_send(t1, pkt(10), &env())).is_empty());
    }
    assert_eq!(pings(&pp.on_send(t1, pkt(10), &env())).len(), 1);
}

// ----- R8: a pong acknowledges -----

#[test]
fn a_pong_acknowledges_what_was_sent_before_its_ping() {
    let mut pp = new_pp();
    let t = Instant::now();
    let pkt = |i: u8| Bytes::from(vec![i; 10]);
    for i in 0..3 {
        assert!(pp.keep_unacked(&pkt(i), t));
    }
    let mark = pp.next_seq; // a ping sent now
    assert!(pp.keep_unacked(&pkt(3), t));
    pp.ack(mark);
    assert_eq!(pp.unacked.len(), 1);
    assert_eq!(
        pp.unacked[0].1,
        pkt(3),
        "the packet sent after the ping stays"
    );
    assert_eq!(pp.unacked_bytes, 10);
    pp.ack(mark); // a late duplicate changes nothing
    assert_eq!(pp.unacked.len(), 1);
    assert_eq!(pp.take_unacked(), vec![pkt(3)]);
    assert_eq!((pp.unacked.len(), pp.unacked_bytes), (0, 0));
    // Full: the caller sends on both paths instead.
    for _ in 0..MAX_UNACKED {
        assert!(pp.keep_unacked(&pkt(0), t));
    }
    assert!(!pp.keep_unacked(&pkt(0), t));
    let big = Bytes::from(vec![0; MAX_UNACKED_BYTES + 1]);
    assert!(!new_pp().keep_unacked(&big, t));
}

#[test]
fn the_ack_pings_pong_forgets_the_packets_sent_before_it() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let a = addr(A);
    let t1 = establish(&mut pp, t0, a);
    send_direct_only(&mut pp, t1, 3);
    let t2 = t1 + ACK_INTERVAL;
    let (_, _, txid, _) = pings(&pp.tick(t2, &env()))[0];
    send_direct_only(&mut pp, t2, 1);
    let out = pp.on_pong(t2 + ms(10), a, udp::MAIN, txid, addr(OBSERVED));
    assert_eq!(resent(&out), 0);
    assert_eq!(
        pp.unacked.len(),
        1,
        "only the packet sent after the ping is kept"
    );
    // When the path expires, only that one is resent.
    let out = pp.tick(t2 + ms(10) + pp.cfg.trust, &env());
    assert_eq!(resent(&out), 1);
}

// ----- R7: ack timeout → suspect + resend -----

#[test]
fn an_unanswered_ack_ping_makes_the_path_suspect_and_resends_what_is_kept() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let a = addr(A);
    let t1 = establish(&mut pp, t0, a);
    send_direct_only(&mut pp, t1, 3);
    let t2 = t1 + ACK_INTERVAL;
    assert_eq!(pings(&pp.tick(t2, &env())).len(), 1);
    // rtt 10 ms: the timeout is the 200 ms floor.
    let out = pp.tick(t2 + ACK_TIMEOUT_MIN - ms(1), &env());
    assert!(out.is_empty(), "{out:?}");
    let out = pp.tick(t2 + ACK_TIMEOUT_MIN, &env());
    assert_eq!(resent(&out), 3, "{out:?}");
    assert!(
        matches!(out[0], Action::QueuePaced { .. }),
        "resend, then ping"
    );
    assert_eq!(pings(&out).len(), 1, "and a new awaited ping");
    assert!(pp.suspect && pp.unacked.is_empty());
    // Still unanswered: again one timeout later (nothing left to resend).
    let out = pp.tick(t2 + ACK_TIMEOUT_MIN * 2, &env());
    assert_eq!((resent(&out), pings(&out).len()), (0, 1));
}

#[test]
fn ack_timeout_follows_the_round_trip_within_bounds() {
    let mut pp = new_pp();
    assert_eq!(pp.ack_timeout(), ACK_TIMEOUT_MIN);
    pp.rtt = Some(ms(1));
    assert_eq!(pp.ack_timeout(), ACK_TIMEOUT_MIN);
    pp.rtt = Some(ms(150));
    assert_eq!(pp.ack_timeout(), ms(600));
    pp.rtt = Some(Duration::from_secs(5));
    assert_eq!(pp.ack_timeout(), ACK_TIMEOUT_MAX);
}

// ----- R9: heal, and path switching -----

#[test]
fn a_pong_heals_a_suspect_path_but_a_pong_to_an_older_ping_does_not() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let a = addr(A);
    let t1 = establish(&mut pp, t0, a);
    send_direct_only(&mut pp, t1, 1);
    let t2 = t1 + ACK_INTERVAL;
    let (_, _, old, _) = pings(&pp.tick(t2, &env()))[0];
    let t3 = t2 + ACK_TIMEOUT_MIN;
    let (_, _, new, _) = pings(&pp.tick(t3, &env()))[0];
    assert!(pp.suspect);
    // The late pong of the first ping: the path answers, but that ping was older than the
    // one awaited: still suspect.
    pp.on_pong(t3 + ms(5), a, udp::MAIN, old, addr(OBSERVED));
    assert!(has_relay(&pp.on_send(t3 + ms(5), pkt(100), &env())));
    pp.on_pong(t3 + ms(10), a, udp::MAIN, new, addr(OBSERVED));
    let out = pp.on_send(t3 + ms(10), pkt(100), &env());
    assert!(has_direct(&out) && !has_relay(&out), "healed: {out:?}");
}

#[test]
fn a_pong_from_another_address_is_ignored_while_the_path_is_fresh_and_moves_it_when_not() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let (a, b) = (addr(A), addr(B));
    let t1 = establish(&mut pp, t0, a);
    send_direct_only(&mut pp, t1, 2);
    let Action::Ping { txid, .. } = pp.ping(t1, b, udp::MAIN) else {
        unreachable!()
    };
    let out = pp.on_pong(t1 + ms(10), b, udp::MAIN, txid, addr(OBSERVED));
    assert!(
        !out.iter().any(|x| matches!(x, Action::SetPath(_))),
        "{out:?}"
    );
    assert_eq!(pp.direct(t1 + ms(10)).map(|d| d.0), Some(a));
    // A's pong is `trust` old (not yet expired by a tick): B's pong moves the path, and
    // what was kept for A goes via the relay.
    let t2 = t1 + pp.cfg.trust;
    let Action::Ping { txid, .. } = pp.ping(t2, b, udp::MAIN) else {
        unreachable!()
    };
    let out = pp.on_pong(t2 + ms(10), b, udp::MAIN, txid, addr(OBSERVED));
    assert_eq!(resent(&out), 2, "{out:?}");
    assert!(out.contains(&Action::SetPath(PathChoice::Direct(b))));
    assert!(out.contains(&Action::Observed {
        addr: addr(OBSERVED)
    }));
    assert_eq!(pp.direct(t2 + ms(10)).map(|d| d.0), Some(b));
}

#[test]
fn a_pong_must_come_from_the_address_and_socket_pinged() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let (a, b) = (addr(A), addr(B));
    let Action::Ping { txid, .. } = pp.ping(t0, a, udp::MAIN) else {
        unreachable!()
    };
    assert!(pp
        .on_pong(t0, b, udp::MAIN, txid, addr(OBSERVED))
        .is_empty());
    assert!(pp
        .on_pong(t0, a, udp::MAIN, [9; 12], addr(OBSERVED))
        .is_empty());
    assert!(pp.direct(t0).is_none());
}

// ----- R4 / R5: padded ack pings, too_big -----

#[test]
fn ack_pings_are_padded_and_a_lost_padded_ping_sends_that_size_on_both_paths_for_a_while() {
    let t0 = Instant::now();
    // Long timers so the path stays fresh (not stale) through TOO_BIG_RETRY.
    let cfg = DirectOptions {
        trust: Duration::from_secs(120),
        heartbeat: Duration::from_secs(60),
        ..DirectOptions::default()
    };
    let mut pp = PeerPath::new(SecretKey::generate().public(), cfg, false);
    let a = addr(A);
    let t1 = establish(&mut pp, t0, a);
    let out = pp.on_send(t1, pkt(1400), &env());
    assert!(!has_relay(&out));
    let t2 = t1 + ACK_INTERVAL;
    let p = pings(&pp.tick(t2, &env()));
    assert_eq!(p[0].3, 1400, "the ack ping is padded to the kept packet");
    let t3 = t2 + ACK_TIMEOUT_MIN;
    let out = pp.tick(t3, &env());
    assert_eq!(resent(&out), 1);
    let (_, _, txid, pad) = pings(&out)[0];
    assert_eq!(pad, 0, "the padding went with the lost ping");
    // The unpadded ping is answered: healed, but 1,400-byte packets go on both paths.
    pp.on_pong(t3 + ms(10), a, udp::MAIN, txid, addr(OBSERVED));
    let t4 = t3 + ms(10);
    let out = pp.on_send(t4, pkt(1400), &env());
    assert!(has_direct(&out) && has_relay(&out), "{out:?}");
    let out = pp.on_send(t4, pkt(1000), &env());
    assert!(
        has_direct(&out) && !has_relay(&out),
        "smaller ones go direct only"
    );
    // 30 s after the loss, large packets are tried direct again.
    let out = pp.on_send(t3 + TOO_BIG_RETRY, pkt(1400), &env());
    assert!(has_direct(&out) && !has_relay(&out), "{out:?}");
}

#[test]
fn a_lost_small_ping_says_nothing_about_packet_sizes() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let t1 = establish(&mut pp, t0, addr(A));
    send_direct_only(&mut pp, t1, 1); // 100 bytes: pad 100 ≤ SMALL_PING_MAX
    pp.tick(t1 + ACK_INTERVAL, &env());
    pp.tick(t1 + ACK_INTERVAL + ACK_TIMEOUT_MIN, &env());
    assert_eq!(pp.too_big, None);
}

// ----- R11: heartbeat -----

#[test]
fn an_active_peers_idle_direct_path_is_pinged_every_heartbeat() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    pp.on_activity(t0);
    let a = addr(A);
    let t1 = establish(&mut pp, t0, a);
    let hb = pp.cfg.heartbeat;
    let (_, _, txid, _) = pings(&pp.tick(t1, &env()))[0];
    pp.on_pong(t1 + ms(10), a, udp::MAIN, txid, addr(OBSERVED));
    assert!(pings(&pp.tick(t1 + hb - ms(1), &env())).is_empty());
    let p = pings(&pp.tick(t1 + hb, &env()));
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].0, a);
    // A lost heartbeat makes the path suspect like a lost ack ping (B18).
    pp.tick(t1 + hb + ACK_TIMEOUT_MIN, &env());
    assert!(pp.suspect);
}

#[test]
fn an_inactive_peers_direct_path_is_not_pinged_and_expires() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let a = addr(A);
    let t1 = establish(&mut pp, t0, a);
    let mut t = t1;
    while t < t1 + pp.cfg.trust {
        assert!(pp.tick(t, &env()).is_empty(), "at {:?}", t - t1);
        t += ms(100);
    }
    assert_eq!(pp.tick(t, &env()), vec![Action::LeaveDirect(a)]);
}

// ----- R13 / R14: probes and TTL-2 punches -----

#[test]
fn probes_punch_known_candidates_then_call_me_maybe_at_most_every_probe_interval() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let a = addr(A);
    pp.on_ping(t0, a, udp::MAIN, [1; 12]); // a candidate, fresh
    let t1 = t0 + ms(10);
    let out = pp.on_send(t1, pkt(100), &env());
    assert_eq!(
        out[2..],
        [
            Action::Punch { addr: a },
            Action::CallMeMaybe { punched: true }
        ]
    );
    let again = pp.on_send(t1 + pp.cfg.probe_interval - ms(1), pkt(100), &env());
    assert_eq!(again.len(), 2, "no probe within probe_interval: {again:?}");
    // The candidate is older than probe_interval now: punched, but not said so.
    let out = pp.on_send(t1 + pp.cfg.probe_interval, pkt(100), &env());
    assert_eq!(
        out[2..],
        [
            Action::Punch { addr: a },
            Action::CallMeMaybe { punched: false }
        ]
    );
}

#[test]
fn ipv4_candidates_get_a_ttl_2_punch_and_ipv6_ones_a_tracked_ping() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let (a, v6) = (addr(A), addr(V6));
    let out = pp.on_call_me_maybe(t0, vec![a, v6], false, false, &env());
    assert!(out.contains(&Action::Punch { addr: a }));
    assert!(!out.contains(&Action::Punch { addr: v6 }));
    let p = pings(&out);
    assert_eq!(p.len(), 1, "{out:?}");
    assert_eq!(p[0].0, v6);
    let out = pp.on_pong(t0 + ms(5), v6, udp::MAIN, p[0].2, addr(OBSERVED));
    assert!(out.contains(&Action::SetPath(PathChoice::Direct(v6))));
}

#[test]
fn probing_is_off_for_ourselves_and_when_disabled() {
    let t0 = Instant::now();
    let me = PeerPath::new(
        SecretKey::generate().public(),
        DirectOptions::default(),
        true,
    );
    let off = PeerPath::new(
        SecretKey::generate().public(),
        DirectOptions {
            enabled: false,
            ..DirectOptions::default()
        },
        false,
    );
    for mut pp in [me, off] {
        assert_eq!(pp.on_send(t0, pkt(1), &env()).len(), 2);
    }
}

// ----- R15 / R19: CallMeMaybe and pings received -----

#[test]
fn an_unpunched_call_me_maybe_is_answered_by_punches_and_a_punched_one_once_a_second() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let (a, b) = (addr(A), addr(B));
    let out = pp.on_call_me_maybe(t0, vec![a, b], false, false, &env());
    assert_eq!(
        out,
        vec![
            Action::Punch { addr: a },
            Action::Punch { addr: b },
            Action::CallMeMaybe { punched: true }
        ],
        "no full-TTL ping: the conntrack trap"
    );
    assert!(pp
        .on_call_me_maybe(t0 + ms(999), vec![a, b], false, false, &env())
        .is_empty());
    assert_eq!(
        pp.on_call_me_maybe(t0 + ms(1000), vec![a], false, false, &env())
            .len(),
        2
    );
    // It counts as our probe: no probe of our own right after.
    assert_eq!(pp.on_send(t0 + ms(1001), pkt(1), &env()).len(), 2);
}

#[test]
fn a_punched_call_me_maybe_pings_every_endpoint_not_pinged_within_500ms() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let (a, b) = (addr(A), addr(B));
    let out = pp.on_call_me_maybe(t0, vec![a, b], false, true, &env());
    let p: Vec<SocketAddr> = pings(&out).iter().map(|p| p.0).collect();
    assert_eq!(p, vec![a, b]);
    assert!(pings(&out).iter().all(|p| p.1 == udp::MAIN && p.3 == 0));
    let out = pp.on_call_me_maybe(t0 + PING_AGAIN_AFTER - ms(1), vec![a], false, true, &env());
    assert!(pings(&out).is_empty(), "{out:?}");
    let out = pp.on_call_me_maybe(t0 + PING_AGAIN_AFTER, vec![a], false, true, &env());
    assert_eq!(pings(&out).len(), 1);
}

#[test]
fn a_ping_is_answered_from_its_socket_and_a_new_source_is_pinged_back() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let a = addr(A);
    let out = pp.on_ping(t0, a, 7, [1; 12]);
    assert_eq!(out[0], Action::MapAddr { addr: a });
    assert_eq!(
        out[1],
        Action::Pong {
            addr: a,
            via: 7,
            txid: [1; 12]
        }
    );
    let p = pings(&out);
    assert_eq!((p.len(), p[0].0, p[0].1), (1, a, 7));
    let out = pp.on_ping(t0 + ms(100), a, 7, [2; 12]);
    assert_eq!(out.len(), 2, "pinged lately: {out:?}");
}

// ----- R17 / R18: birthday probing asked for -----

#[test]
fn a_hard_node_asks_for_birthday_sockets_and_an_easy_one_for_a_spray() {
    let t0 = Instant::now();
    let a = addr(A);
    let hard = Env {
        me_hard: true,
        ..Env::default()
    };
    // Hard facing easy, unpunched: sockets first, then the punched answer.
    let mut pp = new_pp();
    let out = pp.on_call_me_maybe(t0, vec![a], false, false, &hard);
    let open = Action::OpenBirthday {
        endpoints: vec![a],
        announce: false,
    };
    assert_eq!(out[1..], [open, Action::CallMeMaybe { punched: true }]);
    // Punched: open, announced by its own CallMeMaybe.
    let mut pp = new_pp();
    let out = pp.on_call_me_maybe(t0, vec![a], false, true, &hard);
    assert_eq!(
        out[0],
        Action::OpenBirthday {
            endpoints: vec![a],
            announce: true
        }
    );
    // Our own probe of an easy peer opens sockets too.
    let out = pp.on_send(t0 + pp.cfg.probe_interval, pkt(1), &hard);
    assert!(out.iter().any(|x| matches!(
        x,
        Action::OpenBirthday {
            announce: false,
            ..
        }
    )));
    // Hard ↔ hard: no birthday probing.
    let mut pp = new_pp();
    let out = pp.on_call_me_maybe(t0, vec![a], true, true, &hard);
    assert!(!out
        .iter()
        .any(|x| matches!(x, Action::OpenBirthday { .. } | Action::StartSpray { .. })));
    // Easy facing a hard peer's punched CallMeMaybe: a spray, eligible only when the peer
    // is active or has a session.
    let mut pp = new_pp();
    let out = pp.on_call_me_maybe(t0, vec![a], true, true, &env());
    assert_eq!(
        out[0],
        Action::StartSpray {
            endpoints: vec![a],
            eligible: false
        }
    );
    pp.on_activity(t0);
    let out = pp.on_call_me_maybe(t0 + ms(1), vec![a], true, true, &env());
    assert!(out.contains(&Action::StartSpray {
        endpoints: vec![a],
        eligible: true
    }));
    // With a fresh direct path: neither.
    establish(&mut pp, t0, a);
    let out = pp.on_call_me_maybe(t0 + ms(20), vec![a], true, true, &env());
    assert!(!out.iter().any(|x| matches!(x, Action::StartSpray { .. })));
}

// ----- R16: a handshake's flush -----

#[test]
fn many_packets_released_by_a_handshake_go_paced_via_the_relay() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let out = pp.on_flush(t0, vec![pkt(1); RESEND_BURST + 1], &env());
    assert_eq!(out[0], Action::SetPath(PathChoice::Relay));
    assert_eq!(
        out[1],
        Action::QueuePaced {
            pkts: vec![pkt(1); RESEND_BURST + 1],
            resend: false
        }
    );
    let mut pp = new_pp();
    let out = pp.on_flush(t0, vec![pkt(1); RESEND_BURST], &env());
    assert_eq!(
        out.iter()
            .filter(|x| matches!(x, Action::SendRelay { .. }))
            .count(),
        RESEND_BURST
    );
}

// ----- R20 / R21: expiry of pings and candidates, idle peers -----

#[test]
fn a_peer_is_idle_only_with_nothing_in_flight_for_ten_minutes() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    assert!(pp.is_idle(t0));
    pp.on_activity(t0);
    assert!(!pp.is_idle(t0 + PEER_IDLE - ms(1)));
    assert!(pp.is_idle(t0 + PEER_IDLE));
    pp.ping(t0, addr(A), udp::MAIN);
    assert!(!pp.is_idle(t0 + PEER_IDLE), "a ping in flight");
    pp.tick(t0 + PEER_IDLE, &env()); // pings older than trust are dropped
    assert!(pp.is_idle(t0 + PEER_IDLE));
}

// ----- B1: a CallMeMaybe cannot make us an amplifier -----

/// `n` distinct public addresses, starting at port `base`.
fn many(n: usize, base: u16) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| SocketAddr::from(([198, 18, (i / 200) as u8, 1], base + (i % 200) as u16)))
        .collect()
}

#[test]
fn a_call_me_maybe_is_cut_to_max_endpoints_and_its_full_pings_are_budgeted_per_second() {
    let t0 = Instant::now();
    // A relay frame fits about 3,600 addresses.
    let mut pp = new_pp();
    let out = pp.on_call_me_maybe(t0, many(3600, 1000), false, false, &env());
    let punches = out
        .iter()
        .filter(|a| matches!(a, Action::Punch { .. }))
        .count();
    assert_eq!(punches, disco::MAX_ENDPOINTS, "unpunched: punches capped");
    let mut pp = new_pp();
    let out = pp.on_call_me_maybe(t0, many(3600, 1000), false, true, &env());
    assert_eq!(
        pings(&out).len(),
        disco::MAX_ENDPOINTS,
        "punched: pings capped"
    );
    // Another list within RESPONSE_INTERVAL: no more full-TTL pings for this peer ...
    let out = pp.on_call_me_maybe(t0 + ms(600), many(3600, 3000), false, true, &env());
    assert!(pings(&out).is_empty(), "{} pings", pings(&out).len());
    // ... until it is over.
    let out = pp.on_call_me_maybe(
        t0 + RESPONSE_INTERVAL,
        many(3600, 5000),
        false,
        true,
        &env(),
    );
    assert_eq!(pings(&out).len(), disco::MAX_ENDPOINTS);
}

// ----- issue 15: the UDP relay path -----

const RELAY: &str = "203.0.113.1:3480";

/// Sets up a UDP relay slot at `RELAY`, pings through it and answers 10 ms later (the path is
/// proven). The pong's time and its actions.
fn prove_udp_relay(pp: &mut PeerPath, t: Instant) -> (Instant, Vec<Action>) {
    let r = addr(RELAY);
    assert!(pp.on_udp_relay(t, r, true).is_empty());
    let Action::Ping { txid, via, .. } = pp.ping(t, r, VIA_UDP_RELAY) else {
        unreachable!()
    };
    assert_eq!(via, VIA_UDP_RELAY);
    let t = t + ms(10);
    let out = pp.on_pong(t, r, VIA_UDP_RELAY, txid, addr(OBSERVED));
    (t, out)
}

fn allocates(actions: &[Action]) -> bool {
    actions.contains(&Action::AllocateUdpRelay)
}

#[test]
fn a_udp_relay_session_is_asked_for_after_a_second_without_direct_path_or_at_once_when_both_are_hard(
) {
    let t0 = Instant::now();
    let first = Env {
        udp_relay_first: true,
        ..Env::default()
    };
    let mut pp = new_pp();
    pp.on_activity(t0);
    let out = pp.on_send(t0, pkt(100), &first);
    assert!(!allocates(&out), "not before UDP_RELAY_AFTER: {out:?}");
    assert!(!allocates(&pp.tick(t0 + UDP_RELAY_AFTER - ms(1), &first)));
    assert!(allocates(&pp.tick(t0 + UDP_RELAY_AFTER, &first)));
    // Once per UDP_RELAY_RETRY.
    assert!(!allocates(&pp.tick(t0 + UDP_RELAY_AFTER + ms(100), &first)));
    assert!(allocates(
        &pp.tick(t0 + UDP_RELAY_AFTER + UDP_RELAY_RETRY, &first)
    ));

    // The other side waits longer (the first side's relay may not offer it).
    let mut other = new_pp();
    other.on_activity(t0);
    other.on_send(t0, pkt(100), &env());
    assert!(!allocates(
        &other.tick(t0 + UDP_RELAY_AFTER_OTHER - ms(1), &env())
    ));
    assert!(allocates(&other.tick(t0 + UDP_RELAY_AFTER_OTHER, &env())));

    // Both hard: at once, once the peer has said so.
    let both_hard = Env {
        me_hard: true,
        udp_relay_first: true,
        ..Env::default()
    };
    let mut hard = new_pp();
    hard.on_activity(t0);
    hard.on_send(t0, pkt(100), &both_hard);
    hard.on_call_me_maybe(t0 + ms(5), vec![addr(A)], true, true, &both_hard);
    assert!(allocates(&hard.tick(t0 + ms(10), &both_hard)));

    // A direct path: never.
    let mut direct = new_pp();
    direct.on_activity(t0);
    direct.on_send(t0, pkt(100), &first);
    let t1 = establish(&mut direct, t0, addr(A));
    for t in [t1 + UDP_RELAY_AFTER, t1 + UDP_RELAY_AFTER * 3] {
        assert!(!allocates(&direct.tick(t, &first)));
    }
    // Turned off: never.
    let mut off = PeerPath::new(
        SecretKey::generate().public(),
        DirectOptions {
            udp_relay: false,
            ..DirectOptions::default()
        },
        false,
    );
    off.on_activity(t0);
    off.on_send(t0, pkt(100), &first);
    assert!(!allocates(&off.tick(t0 + UDP_RELAY_AFTER * 2, &first)));
}

#[test]
fn the_udp_relay_path_carries_data_once_proven_and_a_direct_path_takes_over_without_loss() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    pp.on_activity(t0);
    let r = addr(RELAY);
    // Unproven: data stays on DERP.
    assert!(pp.on_udp_relay(t0, r, true).is_empty());
    let out = pp.on_send(t0, pkt(100), &env());
    assert!(has_relay(&out) && !has_direct(&out));
    let (t1, out) = prove_udp_relay(&mut pp, t0);
    assert!(
        out.contains(&Action::SetPath(PathChoice::UdpRelay)),
        "{out:?}"
    );
    // No address book entries for the relay's address.
    assert!(!out
        .iter()
        .any(|a| matches!(a, Action::MapAddr { .. } | Action::Observed { .. })));
    // Proven: data goes through it only, kept until a pong through it.
    for _ in 0..3 {
        let out = pp.on_send(t1, pkt(100), &env());
        assert_eq!(
            out,
            vec![
                Action::SetPath(PathChoice::UdpRelay),
                Action::SendDirect {
                    addr: r,
                    via: VIA_UDP_RELAY,
                    pkt: pkt(100)
                }
            ]
        );
    }
    // A direct path wins: what the UDP relay path has not had acknowledged goes again via
    // DERP (the peer's replay window drops copies), and data goes direct.
    let a = addr(A);
    let Action::Ping { txid, .. } = pp.ping(t1, a, udp::MAIN) else {
        unreachable!()
    };
    let out = pp.on_pong(t1 + ms(5), a, udp::MAIN, txid, addr(OBSERVED));
    assert_eq!(resent(&out), 3, "{out:?}");
    assert!(out.contains(&Action::SetPath(PathChoice::Direct(a))));
    let out = pp.on_send(t1 + ms(6), pkt(100), &env());
    assert!(out.contains(&Action::SendDirect {
        addr: a,
        via: udp::MAIN,
        pkt: pkt(100)
    }));
    // A pong through the UDP relay now keeps it warm but does not take the data back.
    let Action::Ping { txid, .. } = pp.ping(t1 + ms(7), r, VIA_UDP_RELAY) else {
        unreachable!()
    };
    let out = pp.on_pong(t1 + ms(9), r, VIA_UDP_RELAY, txid, addr(OBSERVED));
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(pp.current(t1 + ms(10)).map(|c| c.1), Some(udp::MAIN));
}

#[test]
fn when_the_direct_path_expires_data_goes_back_to_the_warm_udp_relay_path_and_a_silent_one_is_given_up(
) {
    let t0 = Instant::now();
    let mut pp = new_pp();
    pp.on_activity(t0);
    let (t1, _) = prove_udp_relay(&mut pp, t0);
    let a = addr(A);
    let t2 = establish(&mut pp, t1, a);
    send_direct_only(&mut pp, t2, 2);
    // The UDP relay path is pinged every heartbeat while direct carries the data (active
    // peer): keep it warm by answering each.
    let r = addr(RELAY);
    let mut t = t2;
    let expiry = t2 + pp.cfg.trust;
    let mut kept_warm = 0;
    let mut resent_total = 0;
    let mut out = Vec::new();
    while t < expiry {
        t += ms(100);
        pp.on_activity(t);
        out = pp.tick(t, &env());
        resent_total += resent(&out);
        for (addr, via, txid, _) in pings(&out) {
            if via == VIA_UDP_RELAY {
                assert_eq!(addr, r);
                assert!(pp.on_pong(t, r, VIA_UDP_RELAY, txid, addr).is_empty());
                kept_warm += 1;
            }
        }
    }
    assert!(
        kept_warm >= 2,
        "heartbeats through the UDP relay: {kept_warm}"
    );
    // The direct path's ack pings went unanswered (suspect: the two direct packets went again
    // via DERP, once) and it expired at the last tick: the path is the UDP relay again.
    assert_eq!(resent_total, 2);
    assert!(
        !out.contains(&Action::LeaveDirect(a)),
        "one path change, not two: {out:?}"
    );
    assert!(
        out.contains(&Action::SetPath(PathChoice::UdpRelay)),
        "{out:?}"
    );
    let out = pp.on_send(t, pkt(100), &env());
    assert!(out.contains(&Action::SendDirect {
        addr: r,
        via: VIA_UDP_RELAY,
        pkt: pkt(100)
    }));
    // Now the relay goes silent: stale after `trust` (back to DERP, the kept packet resent),
    // given up after UDP_RELAY_GIVE_UP.
    let last_pong = t;
    let stale = last_pong + pp.cfg.trust;
    let out = pp.tick(stale, &env());
    assert_eq!(resent(&out), 1, "{out:?}");
    assert!(out.contains(&Action::SetPath(PathChoice::Relay)), "{out:?}");
    let out = pp.tick(last_pong + UDP_RELAY_GIVE_UP, &env());
    assert!(out.contains(&Action::DropUdpRelay), "{out:?}");
    assert!(pp.current(last_pong + UDP_RELAY_GIVE_UP).is_none());
}

#[test]
fn pings_through_the_udp_relay_are_answered_there_and_never_become_direct_candidates() {
    let t0 = Instant::now();
    let mut pp = new_pp();
    let r = addr(RELAY);
    // No session: ignored.
    assert!(pp.on_ping(t0, r, VIA_UDP_RELAY, [1; 12]).is_empty());
    pp.on_udp_relay(t0, r, true);
    let out = pp.on_ping(t0, r, VIA_UDP_RELAY, [2; 12]);
    assert_eq!(
        out[0],
        Action::Pong {
            addr: r,
            via: VIA_UDP_RELAY,
            txid: [2; 12]
        }
    );
    // Unproven: pinged back through the relay (the other half of proving it).
    assert_eq!(pings(&out).len(), 1);
    assert_eq!(pings(&out)[0].1, VIA_UDP_RELAY);
    assert!(!out.iter().any(|a| matches!(a, Action::MapAddr { .. })));
    assert!(pp.candidates.is_empty());
    // Another address claiming the session: ignored.
    assert!(pp.on_ping(t0, addr(B), VIA_UDP_RELAY, [3; 12]).is_empty());
}
