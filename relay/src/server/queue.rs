//! The relay's use of [`ferry_proto::queue`]: every forwarded packet waits in a
//! [`DropOldest`] (a receiver's disco and data queues, a mesh link's forward queue), and a small
//! packet that will wait is copied out of its sender's read buffer ([`detach`]).

use bytes::Bytes;
pub(crate) use ferry_proto::queue::{Cost, DropOldest, QueueLimits, QUEUED_OVERHEAD};

/// A packet is a slice of the sender's read buffer (8 KiB, up to 64 KiB for a sender whose reads
/// fill it, or more around a large frame), so one small packet left waiting keeps that whole
/// buffer alive: a sender that spreads its packets over many slow receivers made each of them
/// hold ~90× what the byte budget counts (`examples/queue_memory.rs`: 10.9 MiB per receiver for
/// 119 KiB of queued packets, with 8 KiB buffers). So a small packet that will wait gets an
/// allocation of its own; one that goes out at once is not copied. "Will wait": its queue
/// already holds [`COPY_AFTER`] packets for an 8 KiB buffer, fewer for a larger one (one for 32
/// KiB and more), so that the packets of a queue that are not copied pin about
/// `COPY_AFTER` × 8 KiB of read buffers, or one buffer when it is larger than that. (Measured
/// with 8 KiB buffers: 272 KiB per receiver in that case with the copy, 241 KiB with batched
/// senders; the copy costs 0–13 % of packets per CPU-second in floods, within the noise when
/// the relay is not overloaded. An arena per queue instead of one allocation per packet
/// measured no faster and held more.)
pub(crate) const COPY_AFTER: usize = 4;
/// The read buffer size [`COPY_AFTER`] is for.
const COPY_AFTER_BUF: usize = 8 << 10;

/// The read buffer the packets of one read are slices of, and what follows from its size for
/// [`detach`]: worked out once per read, not per packet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SourceBuf {
    size: usize,
    copy_after: usize,
}

impl SourceBuf {
    pub(crate) fn new(size: usize) -> Self {
        SourceBuf {
            size,
            copy_after: (COPY_AFTER * COPY_AFTER_BUF / size.max(1)).clamp(1, COPY_AFTER),
        }
    }
}

/// The packet itself or, when it will wait (see [`COPY_AFTER`]) and is small next to the read
/// buffer it is a slice of (under half of it: a larger one pins little more than itself), a
/// copy that does not keep that buffer alive.
pub(crate) fn detach<T: Cost>(q: &DropOldest<T>, data: Bytes, src: SourceBuf) -> Bytes {
    if q.len() < src.copy_after || data.len() * 2 >= src.size {
        return data;
    }
    Bytes::copy_from_slice(&data)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct P(usize);
    impl Cost for P {
        fn cost(&self) -> usize {
            self.0 + QUEUED_OVERHEAD
        }
    }

    #[test]
    fn waiting_small_packets_are_copied_out_of_their_read_buffer() {
        let lim = QueueLimits::receiver(100, usize::MAX);
        let mut q = DropOldest::default();
        let read = Bytes::from(vec![7u8; 8192]);
        let mut kept = Vec::new();
        for i in 0..8 {
            let p = detach(&q, read.slice(i * 100..i * 100 + 100), SourceBuf::new(8192));
            let shares =
                p.as_ptr() >= read.as_ptr() && p.as_ptr() < read.as_ptr().wrapping_add(8192);
            assert_eq!(shares, i < COPY_AFTER, "packet {i}");
            assert_eq!(&p[..], &read[i * 100..i * 100 + 100]);
            kept.push(p);
            q.push(P(100), lim);
        }
        // A packet of half its buffer or more is never copied.
        let big = Bytes::from(vec![1u8; 4096]);
        assert_eq!(
            detach(&q, big.clone(), SourceBuf::new(8192)).as_ptr(),
            big.as_ptr()
        );
        // From a 64 KiB read buffer, a small packet is copied once one waits before it, and
        // one of 32 KiB is not.
        let mut q = DropOldest::default();
        let read = Bytes::from(vec![7u8; 64 << 10]);
        assert_eq!(
            detach(&q, read.slice(..1200), SourceBuf::new(64 << 10)).as_ptr(),
            read.as_ptr()
        );
        q.push(P(1200), lim);
        assert_ne!(
            detach(&q, read.slice(..1200), SourceBuf::new(64 << 10)).as_ptr(),
            read.as_ptr()
        );
        let half = read.slice(..32 << 10);
        assert_eq!(
            detach(&q, half.clone(), SourceBuf::new(64 << 10)).as_ptr(),
            half.as_ptr()
        );
    }
}
