//! What a DERP client (ferry's client, load tester and mesh links) reads from a server: the frame
//! decoder fed in arbitrary read sizes, then `ServerFrame::parse`. Oracle: frames that parse and
//! have an encoder re-encode to the bytes they were read from.
#![no_main]
use bytes::BytesMut;
use ferry_proto::derp::{self as derp, frame_type as ft, RawFrame, ServerFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else { return };
    ferry_fuzz::decode_frames(stream, usize::from(chunk), check);
});

fn check(f: RawFrame) {
    let raw = f.clone();
    let Ok(parsed) = ServerFrame::parse(f) else { return };
    let mut out = BytesMut::new();
    match &parsed {
        ServerFrame::RecvPacket { src, packet } => derp::put_recv_packet(&mut out, src, packet),
        // A KeepAlive's payload, if any, is ignored.
        ServerFrame::KeepAlive => return,
        ServerFrame::Restarting { reconnect_in_ms, try_for_ms } => {
            derp::put_restarting(&mut out, *reconnect_in_ms, *try_for_ms)
        }
        ServerFrame::Pong(d) => derp::put_frame(&mut out, ft::PONG, &[d]),
        ServerFrame::Health(s) => {
            assert_eq!(*s, String::from_utf8_lossy(&raw.payload), "Health text altered");
            return;
        }
        // Lenient by design (extra bytes ignored, as Tailscale's client does): only check that
        // what was read is what the bytes say.
        ServerFrame::PeerGone { key, .. } | ServerFrame::PeerPresent { key, .. } => {
            assert_eq!(key.as_bytes(), &raw.payload[..32]);
            return;
        }
        ServerFrame::Ping(d) => derp::put_frame(&mut out, ft::PING, &[d]),
        // A refusal's reason is read lossily (UTF-8); a grant ignores bytes after its last whole
        // address, so it re-encodes to a prefix of what was read, and reads back the same.
        ServerFrame::UdpRelayEndpoint(r) => {
            if let Err(why) = &r.result {
                assert_eq!(*why, String::from_utf8_lossy(&raw.payload[5..]));
                return;
            }
            let again = r.encode();
            assert!(raw.payload.starts_with(&again), "{r:?} is not what was read");
            let back = ferry_proto::udprelay::AllocResponse::parse(&again).expect("re-parses");
            assert_eq!(&back, r);
            return;
        }
        ServerFrame::Other(t) => {
            assert_eq!(*t, raw.frame_type);
            return;
        }
    }
    assert_eq!(out, ferry_fuzz::encoded(&raw), "{parsed:?} does not re-encode to its bytes");
}
