//! Pieces the fuzz targets share.

use arbitrary::Arbitrary;
use bytes::BytesMut;
use ferry_proto::derp::{self as derp, FrameDecoder, PublicKey, RawFrame, SecretKey};

/// Bytes that reach a parser behind a NaCl box: sealed properly (`seal`, so the parser is
/// reached) or as they are (bad lengths, boxes that do not open).
#[derive(Arbitrary, Debug)]
pub struct MaybeSealed<'a> {
    /// Seal `bytes` with [`sealed`]'s keys first.
    pub seal: bool,
    /// The plaintext (sealed) or the whole payload (raw).
    pub bytes: &'a [u8],
}

impl MaybeSealed<'_> {
    /// `prefix` + the sender's key + the box of `bytes` from `from` to `to`, or `bytes` raw.
    pub fn payload(&self, prefix: &[u8], from: &SecretKey, to: &PublicKey) -> Vec<u8> {
        if !self.seal {
            return self.bytes.to_vec();
        }
        let mut p = prefix.to_vec();
        p.extend_from_slice(from.public().as_bytes());
        p.extend_from_slice(&derp::seal(from, to, self.bytes));
        p
    }
}

/// A fixed key, so that a crash input replays exactly.
pub fn key(b: u8) -> SecretKey {
    SecretKey::from_bytes([b; 32])
}

/// Feeds `stream` to a DERP frame decoder `chunk` bytes at a time (a read's size), calling
/// `each` for every whole frame, as a connection's reader does; stops at the first decoder
/// error, where a reader closes the connection. Checks the decoder's own promises: it takes
/// exactly header + payload, refuses lengths over `max_payload_len` before buffering them, and
/// `bytes_needed` agrees with whether a frame was ready.
pub fn decode_frames(stream: &[u8], chunk: usize, mut each: impl FnMut(RawFrame)) {
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    for piece in stream.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            let needed = dec.bytes_needed(&buf);
            match dec.decode(&mut buf) {
                Ok(Some(f)) => {
                    assert_eq!(needed, 0, "a frame was decoded while bytes_needed said {needed}");
                    assert_eq!(before - buf.len(), derp::FRAME_HEADER_LEN + f.payload.len());
                    assert!(f.payload.len() <= derp::frame::max_payload_len(f.frame_type));
                    each(f);
                }
                Ok(None) => {
                    assert!(needed > 0, "no frame, yet bytes_needed said 0");
                    break;
                }
                Err(_) => return,
            }
        }
    }
}

/// The bytes `frame` was read from: its header and payload.
pub fn encoded(frame: &RawFrame) -> BytesMut {
    let mut out = BytesMut::new();
    derp::put_header(&mut out, frame.frame_type, frame.payload.len());
    out.extend_from_slice(&frame.payload);
    out
}

/// The runtime of a target that drives an in-process relay: one worker thread, and a panic in
/// any relay task aborts the process (a crash libFuzzer sees, not a task tokio catches).
pub fn relay_runtime() -> tokio::runtime::Runtime {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("{info}");
        std::process::abort();
    }));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}
