//! What a DERP server reads from a client: the frame decoder fed in arbitrary read sizes, then
//! `ClientFrame::parse`. Oracles: the decoder never takes more than it was given, agrees with
//! `bytes_needed`, refuses lengths over `max_payload_len` before buffering them, and every frame
//! that parses re-encodes to the bytes it was read from.
#![no_main]
use bytes::BytesMut;
use ferry_proto::derp::{self as derp, frame_type as ft, ClientFrame, RawFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else { return };
    ferry_fuzz::decode_frames(stream, usize::from(chunk), check);
});

fn check(f: RawFrame) {
    let raw = f.clone();
    let Ok(parsed) = ClientFrame::parse(f) else { return };
    let mut out = BytesMut::new();
    match &parsed {
        ClientFrame::SendPacket { dst, packet } => derp::put_send_packet(&mut out, dst, packet),
        ClientFrame::ForwardPacket { src, dst, packet } => {
            derp::put_forward_packet(&mut out, src, dst, packet)
        }
        ClientFrame::NotePreferred(b) => derp::put_frame(&mut out, ft::NOTE_PREFERRED, &[&[u8::from(*b)]]),
        ClientFrame::WatchConns => derp::put_frame(&mut out, ft::WATCH_CONNS, &[]),
        ClientFrame::ClosePeer(k) => derp::put_frame(&mut out, ft::CLOSE_PEER, &[k.as_bytes()]),
        // A Ping may carry up to 1000 bytes; only the first 8 are kept (and echoed).
        ClientFrame::Ping(d) => {
            assert_eq!(&raw.payload[..8], d);
            return;
        }
        ClientFrame::Pong(d) => derp::put_frame(&mut out, ft::PONG, &[d]),
        ClientFrame::AllocateUdpRelay(r) => {
            derp::put_frame(&mut out, ferry_proto::udprelay::FRAME_ALLOCATE, &[&r.encode()])
        }
        ClientFrame::Other(t) => {
            assert_eq!(*t, raw.frame_type);
            return;
        }
    }
    if let ClientFrame::NotePreferred(_) = parsed {
        // Any non-zero byte means true; compare the meaning, not the byte.
        assert_eq!(out[5] != 0, raw.payload[0] != 0);
        return;
    }
    assert_eq!(out, ferry_fuzz::encoded(&raw), "{parsed:?} does not re-encode to its bytes");
}
