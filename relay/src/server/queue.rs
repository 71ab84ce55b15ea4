//! The relay's use of [`ferry_proto::queue`]: every forwarded packet waits in a
//! [`DropOldest`] (a receiver's disco and data queues, a mesh link's forward queue), and a small
//! packet that will wait is copied out of its sender's read buffer ([`detach`]).

use bytes::Bytes;
pub(crate) use ferry_proto::queue::{Cost, DropOldest, QueueLimits, QUEUED_OVERHEAD};

/// A packet is a slice of the sender's read buffer (8 KiB, or more around a large frame), so
/// one small packet left waiting keeps that whole buffer alive: a sender that spreads its
/// packets over many slow receivers made each of them hold ~90× what the byte budget counts
/// (`examples/queue_memory.rs`: 10.9 MiB per receiver for 119 KiB of queued packets). So a small
/// packet that will wait (its queue already holds this many) gets an allocation of its own; one
/// that goes out at once is not copied. (Measured: 272 KiB per receiver in that case with the
/// copy, 241 KiB with batched senders; the copy costs 0–13 % of packets per CPU-second in
/// floods, within the noise when the relay is not overloaded. An arena per queue instead of one
/// allocation per packet measured no faster and held more.)
pub(crate) const COPY_AFTER: usize = 4;
/// ... and only packets under this size are copied: a larger one makes up at least half of an
/// 8 KiB read, and copying it would cost more than the little it pins.
pub(crate) const COPY_BELOW: usize = 4096;

/// The packet itself or, when it will wait behind [`COPY_AFTER`] others in `q` and is small, a
/// copy that does not keep the sender's read buffer alive.
pub(crate) fn detach<T: Cost>(q: &DropOldest<T>, data: Bytes) -> Bytes {
    if q.len() < COPY_AFTER || data.len() >= COPY_BELOW {
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
            let p = detach(&q, read.slice(i * 100..i * 100 + 100));
            let shares =
                p.as_ptr() >= read.as_ptr() && p.as_ptr() < read.as_ptr().wrapping_add(8192);
            assert_eq!(shares, i < COPY_AFTER, "packet {i}");
            assert_eq!(&p[..], &read[i * 100..i * 100 + 100]);
            kept.push(p);
            q.push(P(100), lim);
        }
        // A large packet is never copied.
        let big = Bytes::from(vec![1u8; COPY_BELOW]);
        assert_eq!(detach(&q, big.clone()).as_ptr(), big.as_ptr());
    }
}
