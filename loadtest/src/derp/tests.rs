//! Unit tests of the packet format, the window and the roles.

use super::*;

#[test]
fn packets_round_trip_through_the_header() {
    let mut out = BytesMut::new();
    let dst = PublicKey([7; 32]);
    put_packet(&mut out, &dst, KIND_DATA, 42, 123_456, 64);
    assert_eq!(out.len(), 5 + 32 + 64);
    let mut dec = FrameDecoder::new();
    let f = dec.decode(&mut out).unwrap().unwrap();
    assert_eq!(f.frame_type, ft::SEND_PACKET);
    assert_eq!(&f.payload[..32], &[7; 32]);
    assert_eq!(
        parse_packet(&f.payload[32..]),
        Some((KIND_DATA, 42, 123_456))
    );
    assert_eq!(parse_packet(b"short"), None);
    assert_eq!(parse_packet(&[0u8; 64]), None);
}

#[test]
fn a_window_sends_until_full_then_waits_for_progress() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut w = WindowCtl::new(16, ms(200), t0);
    assert_eq!(w.step(0, 0, t0), Step::Send(16));
    // 16 in flight: full, wait at most the timeout (from the last send).
    assert_eq!(w.step(16, 0, t0 + ms(1)), Step::WaitUntil(t0 + ms(200)));
    // The receiver read 5: 5 free slots, and the no-progress clock restarts.
    assert_eq!(w.step(16, 5, t0 + ms(2)), Step::Send(5));
    assert_eq!(w.step(21, 5, t0 + ms(3)), Step::WaitUntil(t0 + ms(202)));
    // A dropped packet below the highest read one is not in flight: read_to jumps past it.
    assert_eq!(w.step(21, 12, t0 + ms(4)), Step::Send(7));
    assert_eq!((w.timeouts, w.written_off), (0, 0));
}

#[test]
fn a_stalled_window_is_written_off_after_the_timeout_and_opens_again() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut w = WindowCtl::new(8, ms(200), t0);
    assert_eq!(w.step(0, 0, t0), Step::Send(8));
    // The relay dropped the last 3 of the 8 (it never says so): 5 read, then nothing.
    assert_eq!(w.step(8, 5, t0 + ms(1)), Step::Send(5));
    assert_eq!(w.step(13, 5, t0 + ms(2)), Step::WaitUntil(t0 + ms(201)));
    assert_eq!(w.step(13, 5, t0 + ms(200)), Step::WaitUntil(t0 + ms(201)));
    // Timeout: the 8 outstanding are written off and a whole window is free.
    assert_eq!(w.step(13, 5, t0 + ms(201)), Step::Send(8));
    assert_eq!((w.timeouts, w.written_off), (1, 8));
    // One of them arrives late: it is not counted twice, and frees nothing.
    assert_eq!(w.step(21, 6, t0 + ms(203)), Step::WaitUntil(t0 + ms(401)));
    // Packets sent after the write-off arrive: progress as usual.
    assert_eq!(w.step(21, 15, t0 + ms(204)), Step::Send(2));
    assert_eq!((w.timeouts, w.written_off), (1, 8));
}

#[test]
fn the_receiver_side_of_a_window_only_moves_forward() {
    let w = Window::default();
    assert!(w.read(0));
    assert!(w.read(4));
    assert!(
        !w.read(2),
        "an older packet (or a duplicate) is no progress"
    );
    assert!(!w.read(4));
    assert_eq!(w.read_to.load(Ordering::Relaxed), 5);
}

#[test]
fn topologies() {
    let r = roles(4, Topology::Pairs);
    assert!(matches!(
        r[0],
        Role::Sender {
            dst: 1,
            marks_end: true
        }
    ));
    assert!(matches!(&r[3], Role::Receiver { senders } if senders == &vec![2]));
    let r = roles(4, Topology::FanIn);
    assert!(matches!(&r[0], Role::Receiver { senders } if senders == &vec![1, 2, 3]));
    assert!(matches!(
        r[1],
        Role::Sender {
            dst: 0,
            marks_end: true
        }
    ));
    assert!(matches!(
        r[2],
        Role::Sender {
            dst: 0,
            marks_end: false
        }
    ));
}
