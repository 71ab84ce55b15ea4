//! What a connection keeps after a burst. A busy sender's reads grow to 64 KiB, and over TLS the
//! record layer reads 64 KiB too; a connection that sends a burst and then goes quiet must give
//! those buffers back, or 10,000 clients that each burst once hold 1.3 GB until they speak again.
//!
//! The relay runs on a runtime of its own whose threads are marked, and a counting allocator adds
//! up what those threads hold (allocations minus frees on them), so the clients' own buffers in
//! this process do not count.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use common::*;
use ferry_relay::proto::{self, frame_type as ft};
use ferry_relay::server::TlsRecords;
use tokio::io::AsyncWriteExt;

struct Counting;

thread_local! {
    static RELAY_THREAD: Cell<bool> = const { Cell::new(false) };
}
static LIVE: AtomicIsize = AtomicIsize::new(0);

fn on_relay() -> bool {
    RELAY_THREAD.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: every call is passed on to `System` unchanged; only a counter is added to.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() && on_relay() {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() && on_relay() {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if on_relay() {
            LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() && on_relay() {
            LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const SENDERS: usize = 32;
/// Packets per sender's burst: 150 × 1,237 bytes on the wire, enough for reads to grow to 64 KiB
/// (512 B, 8, 16, 32 KiB, then 64 KiB).
const BURST: usize = 150;

/// Senders that each send one burst and then stay connected and silent give their large read
/// buffers back (plain HTTP and both TLS record layers).
#[test]
fn a_connection_that_bursts_and_goes_quiet_gives_its_read_buffers_back() {
    for (name, tls, records) in [
        ("plain", false, TlsRecords::default()),
        ("tls (ferry records)", true, TlsRecords::Ferry),
        ("tls (rustls records)", true, TlsRecords::Rustls),
    ] {
        let relay_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .on_thread_start(|| RELAY_THREAD.with(|c| c.set(true)))
            .enable_all()
            .build()
            .unwrap();
        let opts = if tls {
            Options::tls()
        } else {
            Options::plain()
        };
        // The relay's tasks run on `relay_rt`'s (counted) worker.
        let relay = relay_rt.block_on(async {
            tokio::spawn(
                opts.limits(test_limits())
                    .start_with(move |c| c.tls_records = records),
            )
            .await
            .unwrap()
        });
        let client_rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        client_rt.block_on(async {
            let mut rx = RawClient::connect(&relay).await;
            let mut senders = Vec::new();
            for _ in 0..SENDERS {
                senders.push(RawClient::connect(&relay).await);
            }
            // Every connection has done a read or two past its handshake.
            rx.send(senders[0].key(), b"hello").await;
            assert_eq!(senders[0].recv().await.1, b"hello");
            let before = live();
            for (s, tx) in senders.iter_mut().enumerate() {
                let mut burst = Vec::new();
                for i in 0..BURST {
                    let mut p = vec![0u8; 1200];
                    p[..8].copy_from_slice(&((s * BURST + i) as u64).to_be_bytes());
                    proto::put_frame(&mut burst, ft::SEND_PACKET, &[rx.key().as_bytes(), &p]);
                }
                tx.io.write_all(&burst).await.unwrap();
                tx.io.flush().await.unwrap();
                for i in 0..BURST {
                    let (src, p) = rx.recv().await;
                    assert_eq!(src, tx.key());
                    assert_eq!(p[..8], ((s * BURST + i) as u64).to_be_bytes(), "{name}");
                }
            }
            let held = live() - before;
            let per_sender = held / SENDERS as isize;
            eprintln!("{name}: {per_sender} bytes per sender right after its burst");
            // The test measures something: the bursts made reads grow.
            assert!(
                per_sender > 48 << 10,
                "{name}: {per_sender} bytes per sender after a burst; expected the 64 KiB reads"
            );
            // Quiet from here on: the buffers go back (the clients stay connected).
            let t0 = tokio::time::Instant::now();
            let deadline = t0 + Duration::from_secs(10);
            loop {
                let per_sender = (live() - before) / SENDERS as isize;
                if per_sender < 4 << 10 {
                    eprintln!(
                        "{name}: {per_sender} bytes per sender {:?} after the last burst",
                        t0.elapsed()
                    );
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{name}: quiet senders still hold {per_sender} bytes each 10 s after their \
                     burst"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            drop(senders);
            drop(rx);
        });
        drop(relay);
        relay_rt.shutdown_timeout(Duration::from_secs(5));
    }
}
