//! The birthday coordinator's gates on a fake clock, and the target choice.

use super::*;
use ferry_proto::SecretKey;

fn key() -> PublicKey {
    SecretKey::generate().public()
}

fn public() -> Vec<SocketAddr> {
    vec!["203.0.113.6:41641".parse().unwrap()]
}

#[test]
fn one_birthday_session_at_a_time_held_10s_and_once_per_probe_interval_per_peer() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let (p1, p2) = (key(), key());
    let mut b = Birthday::new(s(5));
    let private: Vec<SocketAddr> = vec!["192.168.1.2:41641".parse().unwrap()];
    assert_eq!(b.gate(t0, p1, &private), Gate::No, "no public IPv4 target");
    assert_eq!(b.gate(t0, p1, &public()), Gate::Open(public()));
    assert_eq!(b.start(t0, p1, 256), Some(256));
    assert_eq!(
        b.gate(t0 + s(1), p2, &public()),
        Gate::No,
        "p1's session is held"
    );
    assert!(!b.session_over(t0 + s(9)));
    assert_eq!(
        b.gate(t0 + s(4), p1, &public()),
        Gate::Held,
        "once per probe_interval: not reopened, but held (announced as punched)"
    );
    assert_eq!(
        b.gate(t0 + s(5), p1, &public()),
        Gate::Open(public()),
        "p1 replaces its own"
    );
    assert!(b.session_over(t0 + s(5)), "the gate ended the old session");
    assert_eq!(b.start(t0 + s(5), p1, 256), Some(256));
    assert!(b.session_over(t0 + s(15)));
    assert_eq!(b.gate(t0 + s(15), p2, &public()), Gate::Open(public()));
    assert_eq!(
        b.start(t0 + s(15), p2, BIRTHDAY_SOCKETS_MIN - 1),
        None,
        "too few descriptors"
    );
    assert!(b.session_over(t0 + s(15)));
}

#[test]
fn a_spray_needs_an_eligible_peer_runs_alone_at_500_per_second_and_stops_when_found() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let (p1, p2) = (key(), key());
    let mut b = Birthday::new(Duration::from_secs(5));
    assert!(!b.start_spray(t0, p1, &public(), false), "not eligible");
    assert!(b.start_spray(t0, p1, &public(), true));
    assert_eq!(b.spray_peer(), Some(p1));
    assert!(!b.start_spray(t0, p2, &public(), true), "one at a time");
    let (peer, first) = b.spray_step(t0, |_| false).unwrap();
    assert_eq!((peer, first.len()), (p1, 1));
    let (_, next) = b.spray_step(t0 + ms(100), |_| false).unwrap();
    assert_eq!(next.len(), 50, "500 per second");
    assert!(
        b.spray_step(t0 + ms(200), |_| true).is_none(),
        "found: it ends"
    );
    assert_eq!(b.spray_peer(), None);
    // Node-wide: not again within 0.8 × probe_interval, even towards another peer.
    assert!(!b.start_spray(t0 + ms(3999), p2, &public(), true));
    assert!(b.start_spray(t0 + ms(4000), p2, &public(), true));
    // A round that found nothing goes on to a second one at once (fresh ports); then it ends.
    let round1 = b.spray_step(t0 + ms(4000 + 2046), |_| false).unwrap().1;
    assert_eq!(round1.len(), BIRTHDAY_PROBES, "a round of 1024 takes ~2 s");
    let round2 = b.spray_step(t0 + ms(4000 + 10_000), |_| false).unwrap().1;
    assert_eq!(
        round2.len(),
        BIRTHDAY_PROBES,
        "the second round follows at once"
    );
    assert!(round2.iter().all(|a| !round1.contains(a)), "fresh ports");
    assert!(b.spray_step(t0 + ms(14_100), |_| false).is_none());
}

/// Issue 14.3, the race: both sides' probe timers fire together; the hard side opens its
/// session for its own round, and the easy peer's CallMeMaybe of the same round arrives
/// meanwhile. Answering it must still say "punched" (the mappings are open), or the easy side
/// never sprays and the round is lost — and the next one is a whole probe interval away.
#[test]
fn a_call_me_maybe_during_a_held_session_is_answered_as_punched() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let (p1, p2) = (key(), key());
    let mut b = Birthday::new(Duration::from_secs(5));
    assert_eq!(b.gate(t0, p1, &public()), Gate::Open(public()));
    b.start(t0, p1, 256);
    // The peer's CallMeMaybe, handled 0.3 s later (after the sockets were bound).
    assert_eq!(b.gate(t0 + ms(300), p1, &public()), Gate::Held);
    assert!(b.holds(p1, t0 + ms(300)));
    assert!(
        !b.holds(p2, t0 + ms(300)),
        "another peer's session is not held"
    );
    assert!(!b.holds(p1, t0 + BIRTHDAY_HOLD), "the hold ends");
}

#[test]
fn spray_targets_are_distinct_random_ports_on_public_addresses() {
    let ips: Vec<IpAddr> = vec![[203, 0, 113, 6].into(), [198, 51, 100, 9].into()];
    let known: SocketAddr = "203.0.113.6:40000".parse().unwrap();
    let t = spray_targets(&ips, BIRTHDAY_PROBES, &[known]);
    assert_eq!(t.len(), BIRTHDAY_PROBES);
    let set: std::collections::HashSet<_> = t.iter().collect();
    assert_eq!(set.len(), t.len(), "no port probed twice");
    assert!(t.iter().all(|a| a.port() >= 1024 && ips.contains(&a.ip())));
    assert!(!t.contains(&known));
    // Interleaved: both addresses get half.
    assert_eq!(
        t.iter().filter(|a| a.ip() == ips[0]).count(),
        BIRTHDAY_PROBES / 2
    );
    // Random: two sprays differ.
    assert_ne!(t, spray_targets(&ips, BIRTHDAY_PROBES, &[]));
    assert!(spray_targets(&[], 10, &[]).is_empty());
}

#[test]
fn only_public_ipv4_endpoints_are_birthday_targets() {
    for (a, public) in [
        ("203.0.113.6:1", true),
        ("8.8.8.8:53", true),
        ("192.168.1.2:1", false),
        ("10.0.0.1:1", false),
        ("172.16.0.1:1", false),
        ("127.0.0.1:1", false),
        ("169.254.1.1:1", false),
        ("0.0.0.0:1", false),
        ("[2001:db8::1]:1", false),
    ] {
        assert_eq!(is_public_v4(&a.parse().unwrap()), public, "{a}");
    }
}
