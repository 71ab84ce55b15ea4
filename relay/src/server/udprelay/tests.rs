//! The UDP relay sessions on a fake clock: allocation, the bind handshake, forwarding, expiry,
//! and each abuse case of issue 15's acceptance 5 (spoofed-source bind, replayed answer, expired
//! cookie, flood to an unbound session, caps), plus the no-amplification rule.

use super::*;
use ferry_proto::udprelay::PROTO_WIREGUARD;

const S: Duration = Duration::from_secs(1);

struct Client {
    key: SecretKey,
    addr: SocketAddr,
}

fn client(port: u16) -> Client {
    Client {
        key: SecretKey::generate(),
        addr: SocketAddr::from(([198, 51, 100, 7], port)),
    }
}

fn msg(
    kind: BindKind,
    vni: u32,
    generation: u32,
    remote: PublicKey,
    challenge: [u8; 32],
) -> BindMsg {
    BindMsg {
        kind,
        vni,
        generation,
        remote_key: remote,
        challenge,
    }
}

/// Bind from `from` (normally `c.addr`): returns the relay's challenge.
fn bind_from(
    s: &mut Sessions,
    c: &Client,
    from: SocketAddr,
    a: &Allocation,
    other: PublicKey,
    generation: u32,
    now: Instant,
) -> [u8; 32] {
    let d = msg(BindKind::Bind, a.vni, generation, other, [0; 32]).seal(&c.key, &a.server_key);
    let Outcome::Reply(r) = s.handle(from, &d, now) else {
        panic!("no challenge")
    };
    assert!(
        r.len() <= d.len(),
        "a challenge is never larger than the bind"
    );
    let m = BindMsg::open(&c.key, &a.server_key, &r).expect("the challenge opens for the client");
    assert_eq!(
        (m.kind, m.generation, m.remote_key),
        (BindKind::Challenge, generation, other)
    );
    m.challenge
}

fn answer(
    c: &Client,
    a: &Allocation,
    other: PublicKey,
    generation: u32,
    challenge: [u8; 32],
) -> Vec<u8> {
    msg(BindKind::Answer, a.vni, generation, other, challenge).seal(&c.key, &a.server_key)
}

/// Both sides bound (generation 1).
fn bound_pair(s: &mut Sessions, now: Instant) -> (Client, Client, Allocation) {
    let (ca, cb) = (client(1000), client(2000));
    let requester = ca.key.public();
    let a = s
        .allocate(requester, ca.key.public(), cb.key.public(), now)
        .unwrap();
    for (c, o) in [(&ca, cb.key.public()), (&cb, ca.key.public())] {
        let ch = bind_from(s, c, c.addr, &a, o, 1, now);
        assert_eq!(
            s.handle(c.addr, &answer(c, &a, o, 1, ch), now),
            Outcome::Bound
        );
    }
    (ca, cb, a)
}

fn data(vni: u32) -> Vec<u8> {
    let mut d = Geneve {
        control: false,
        protocol: PROTO_WIREGUARD,
        vni,
    }
    .encode()
    .to_vec();
    d.extend_from_slice(b"ciphertext");
    d
}

#[test]
fn both_sides_bind_then_data_goes_unchanged_between_them_only() {
    let t0 = Instant::now();
    let mut s = Sessions::new(Limits::default(), t0);
    let (ca, cb) = (client(1000), client(2000));
    let a = s
        .allocate(ca.key.public(), ca.key.public(), cb.key.public(), t0)
        .unwrap();
    assert_eq!(a.vni, 1, "VNIs are sequential from 1");
    assert_eq!(a.server_key, s.server_key());
    let mut sorted = [ca.key.public(), cb.key.public()];
    sorted.sort_by(|x, y| x.as_bytes().cmp(y.as_bytes()));
    assert_eq!(a.keys, sorted);
    // The same pair (either order, either side asking) gets the same session, and asking
    // again before both bound restarts the bind window.
    let t1 = t0 + Duration::from_secs(20);
    let again = s
        .allocate(cb.key.public(), cb.key.public(), ca.key.public(), t1)
        .unwrap();
    assert_eq!((again.vni, again.lamport), (a.vni, a.lamport));
    assert_eq!(
        s.expire(t0 + BIND_LIFETIME + S),
        0,
        "the window restarted at t1"
    );
    assert_eq!(s.counts(), (1, 0));

    // A binds; data before B has bound goes nowhere.
    let ch = bind_from(&mut s, &ca, ca.addr, &a, cb.key.public(), 7, t0);
    assert_eq!(
        s.handle(ca.addr, &answer(&ca, &a, cb.key.public(), 7, ch), t0),
        Outcome::Bound
    );
    assert_eq!(
        s.handle(ca.addr, &data(a.vni), t0),
        Outcome::Drop(Drop::NotBound)
    );
    let ch = bind_from(&mut s, &cb, cb.addr, &a, ca.key.public(), 9, t0);
    assert_eq!(
        s.handle(cb.addr, &answer(&cb, &a, ca.key.public(), 9, ch), t0),
        Outcome::Bound
    );
    assert_eq!(s.counts(), (0, 1));

    assert_eq!(
        s.handle(ca.addr, &data(a.vni), t0),
        Outcome::Forward(cb.addr)
    );
    assert_eq!(
        s.handle(cb.addr, &data(a.vni), t0),
        Outcome::Forward(ca.addr)
    );
    let stranger = SocketAddr::from(([203, 0, 113, 66], 1000));
    assert_eq!(
        s.handle(stranger, &data(a.vni), t0),
        Outcome::Drop(Drop::UnknownSource)
    );
    assert_eq!(
        s.handle(ca.addr, &data(a.vni + 1), t0),
        Outcome::Drop(Drop::UnknownVni)
    );
    assert_eq!(s.handle(ca.addr, &[0u8; 7], t0), Outcome::Drop(Drop::Short));
}

#[test]
fn a_side_that_moves_rebinds_and_data_follows_it() {
    let t0 = Instant::now();
    let mut s = Sessions::new(Limits::default(), t0);
    let (ca, cb, a) = bound_pair(&mut s, t0);
    let moved = SocketAddr::from(([198, 51, 100, 8], 4444));
    let ch = bind_from(&mut s, &ca, moved, &a, cb.key.public(), 2, t0 + S);
    assert_eq!(
        s.handle(moved, &answer(&ca, &a, cb.key.public(), 2, ch), t0 + S),
        Outcome::Bound
    );
    assert_eq!(
        s.handle(cb.addr, &data(a.vni), t0 + S),
        Outcome::Forward(moved)
    );
    assert_eq!(
        s.handle(ca.addr, &data(a.vni), t0 + S),
        Outcome::Drop(Drop::UnknownSource)
    );
}

/// Acceptance 5: a spoofed-source bind. The attacker sends A's (captured) Bind with A's address
/// as source: the Challenge goes to A, not to the attacker. An Answer from the attacker's own
/// address with a challenge made for another address fails: the MAC covers the source.
#[test]
fn a_challenge_binds_only_the_address_it_was_sent_to() {
    let t0 = Instant::now();
    let mut s = Sessions::new(Limits::default(), t0);
    let (ca, cb) = (client(1000), client(2000));
    let a = s
        .allocate(ca.key.public(), ca.key.public(), cb.key.public(), t0)
        .unwrap();
    let attacker = SocketAddr::from(([203, 0, 113, 66], 1000));
    // A's challenge, for A's address, presented from the attacker's address.
    let ch = bind_from(&mut s, &ca, ca.addr, &a, cb.key.public(), 1, t0);
    assert_eq!(
        s.handle(attacker, &answer(&ca, &a, cb.key.public(), 1, ch), t0),
        Outcome::Drop(Drop::BadChallenge)
    );
    // A guessed challenge.
    bind_from(&mut s, &ca, attacker, &a, cb.key.public(), 2, t0);
    assert_eq!(
        s.handle(
            attacker,
            &answer(&ca, &a, cb.key.public(), 2, [0x42; 32]),
            t0
        ),
        Outcome::Drop(Drop::BadChallenge)
    );
    // Without A's key nothing opens: a Bind sealed by another key claiming to be A's fails,
    // and one from a key that is not in the session too.
    let mallory = SecretKey::generate();
    let forged =
        msg(BindKind::Bind, a.vni, 3, cb.key.public(), [0; 32]).seal(&mallory, &a.server_key);
    assert_eq!(
        s.handle(attacker, &forged, t0),
        Outcome::Drop(Drop::BadControl)
    );
    let mut claimed = forged.clone();
    claimed[8 + 6..8 + 6 + 32].copy_from_slice(ca.key.public().as_bytes());
    assert_eq!(
        s.handle(attacker, &claimed, t0),
        Outcome::Drop(Drop::BadControl)
    );
    // Nothing got bound.
    assert_eq!(s.counts(), (1, 0));
    assert_eq!(
        s.handle(attacker, &data(a.vni), t0),
        Outcome::Drop(Drop::NotBound)
    );
}

/// Acceptance 5: a replayed answer. Once A has bound, its Answer replayed (from anywhere) binds
/// nothing: the handshake's generation is used up; after a new Bind, an old Answer's generation
/// is not the one in progress.
#[test]
fn a_replayed_answer_binds_nothing() {
    let t0 = Instant::now();
    let mut s = Sessions::new(Limits::default(), t0);
    let (ca, cb) = (client(1000), client(2000));
    let a = s
        .allocate(ca.key.public(), ca.key.public(), cb.key.public(), t0)
        .unwrap();
    let ch = bind_from(&mut s, &ca, ca.addr, &a, cb.key.public(), 1, t0);
    let ans = answer(&ca, &a, cb.key.public(), 1, ch);
    assert_eq!(s.handle(ca.addr, &ans, t0), Outcome::Bound);
    assert_eq!(
        s.handle(ca.addr, &ans, t0 + S),
        Outcome::Drop(Drop::BadControl)
    );
    bind_from(&mut s, &ca, ca.addr, &a, cb.key.public(), 2, t0 + S);
    assert_eq!(
        s.handle(ca.addr, &ans, t0 + S),
        Outcome::Drop(Drop::BadControl)
    );
    // The remote key must be the session's other side, and a Challenge is never accepted.
    let ch = bind_from(&mut s, &ca, ca.addr, &a, cb.key.public(), 3, t0 + S);
    let wrong_remote = answer(&ca, &a, SecretKey::generate().public(), 3, ch);
    assert_eq!(
        s.handle(ca.addr, &wrong_remote, t0 + S),
        Outcome::Drop(Drop::BadControl)
    );
    let mut as_challenge = msg(BindKind::Answer, a.vni, 3, cb.key.public(), ch);
    as_challenge.kind = BindKind::Challenge;
    let d = as_challenge.seal(&ca.key, &a.server_key);
    assert_eq!(
        s.handle(ca.addr, &d, t0 + S),
        Outcome::Drop(Drop::BadControl)
    );
}

/// Acceptance 5: an expired cookie. A challenge holds across one secret rotation (2 min) and
/// not across two.
#[test]
fn a_challenge_expires_after_two_secret_rotations() {
    let t0 = Instant::now();
    let mut s = Sessions::new(Limits::default(), t0);
    let (ca, cb) = (client(1000), client(2000));
    let a = s
        .allocate(ca.key.public(), ca.key.public(), cb.key.public(), t0)
        .unwrap();
    let other = cb.key.public();
    let ch = bind_from(&mut s, &ca, ca.addr, &a, other, 1, t0);
    // One rotation (triggered by the next control datagram after 2 min): still good.
    let t1 = t0 + SECRET_ROTATION;
    assert_eq!(
        s.handle(ca.addr, &answer(&ca, &a, other, 1, ch), t1),
        Outcome::Bound
    );
    // A new handshake's challenge, then two rotations.
    let ch = bind_from(&mut s, &ca, ca.addr, &a, other, 2, t1);
    let t2 = t1 + SECRET_ROTATION;
    bind_from(&mut s, &cb, cb.addr, &a, ca.key.public(), 5, t2); // rotates
    let t3 = t2 + SECRET_ROTATION;
    assert_eq!(
        s.handle(ca.addr, &answer(&ca, &a, other, 2, ch), t3),
        Outcome::Drop(Drop::BadChallenge)
    );
}

/// Acceptance 5: a flood to an unbound session, and garbage: dropped, counted by reason, and
/// never answered. Only a Bind sealed by a session key gets a reply, and that reply is no larger.
#[test]
fn floods_and_garbage_are_dropped_without_a_reply() {
    let t0 = Instant::now();
    let mut s = Sessions::new(Limits::default(), t0);
    let (ca, cb) = (client(1000), client(2000));
    let a = s
        .allocate(ca.key.public(), ca.key.public(), cb.key.public(), t0)
        .unwrap();
    let from = SocketAddr::from(([203, 0, 113, 66], 53));
    for len in [0usize, 7, 8, 100, 160, 1200] {
        for control in [false, true] {
            let mut d = vec![0xA5u8; len];
            if len >= 8 {
                d[..8].copy_from_slice(
                    &Geneve {
                        control,
                        protocol: 0x7A11,
                        vni: a.vni,
                    }
                    .encode(),
                );
            }
            match s.handle(from, &d, t0) {
                Outcome::Drop(_) => {}
                other => panic!("{len} bytes (control {control}) got {other:?}"),
            }
        }
    }
    assert_eq!(
        s.handle(from, &data(a.vni), t0),
        Outcome::Drop(Drop::NotBound)
    );
    assert_eq!(s.counts(), (1, 0));
}

/// Acceptance 5: more allocations than the caps.
#[test]
fn allocations_are_capped_per_requester_and_in_total() {
    let t0 = Instant::now();
    let mut s = Sessions::new(
        Limits {
            total: 5,
            per_client: 2,
        },
        t0,
    );
    let r = SecretKey::generate().public();
    let k = || SecretKey::generate().public();
    s.allocate(r, r, k(), t0).unwrap();
    s.allocate(r, k(), r, t0).unwrap();
    assert_eq!(s.allocate(r, r, k(), t0), Err(AllocError::PerClient(2)));
    for _ in 0..3 {
        let x = k();
        s.allocate(x, x, k(), t0).unwrap();
    }
    let x = k();
    assert_eq!(s.allocate(x, x, k(), t0), Err(AllocError::Total(5)));
    assert_eq!(s.allocate(x, x, x, t0), Err(AllocError::BadPair));
    assert_eq!(
        s.allocate(x, x, s.server_key(), t0),
        Err(AllocError::BadPair)
    );
    // Only for itself: a third node cannot allocate (or hold open) a pair's session.
    assert_eq!(s.allocate(k(), x, k(), t0), Err(AllocError::NotMember));
    // Expired sessions free their places (30 s unbound).
    assert_eq!(s.expire(t0 + BIND_LIFETIME), 0);
    assert_eq!(s.expire(t0 + BIND_LIFETIME + S), 5);
    s.allocate(r, r, k(), t0 + BIND_LIFETIME + S).unwrap();
}

#[test]
fn a_bound_session_lives_while_both_sides_send_and_ends_5_min_after_either_stops() {
    let t0 = Instant::now();
    let mut s = Sessions::new(Limits::default(), t0);
    let (ca, cb, a) = bound_pair(&mut s, t0);
    let mut t = t0;
    for _ in 0..10 {
        t += Duration::from_secs(60);
        assert_eq!(
            s.handle(ca.addr, &data(a.vni), t),
            Outcome::Forward(cb.addr)
        );
        assert_eq!(
            s.handle(cb.addr, &data(a.vni), t),
            Outcome::Forward(ca.addr)
        );
        assert_eq!(s.expire(t), 0);
    }
    // Only A sends from now on: B's side goes idle.
    let quiet = t;
    t += IDLE_LIFETIME;
    assert_eq!(
        s.handle(ca.addr, &data(a.vni), t),
        Outcome::Forward(cb.addr)
    );
    assert_eq!(s.expire(t), 0);
    assert_eq!(s.expire(quiet + IDLE_LIFETIME + S), 1);
    assert_eq!(
        s.handle(ca.addr, &data(a.vni), t + S),
        Outcome::Drop(Drop::UnknownVni)
    );
    // The pair gets a new session (a new VNI).
    let again = s
        .allocate(ca.key.public(), ca.key.public(), cb.key.public(), t + S)
        .unwrap();
    assert_eq!(again.vni, a.vni + 1);
}
