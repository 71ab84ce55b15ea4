//! The birthday sockets (I/O): the hard side's extra UDP sockets, each with a reader task that
//! delivers into the actor's datagram channel tagged with the socket's id
//! ([`crate::udp::Datagram::via`]). Opened when [`super::birthday::Birthday`] starts a
//! session, closed when it is over unless a direct path uses them. Dropping the set stops the
//! readers.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::birthday::BIRTHDAY_SOCKETS;
use crate::udp::{self, Datagram, StunWaiters};

/// Birthday sockets by id, with their readers.
#[derive(Debug)]
pub(super) struct BirthdaySockets {
    extra: HashMap<u32, (Arc<UdpSocket>, tokio::task::JoinHandle<()>)>,
    next_via: u32,
    /// Where the readers deliver.
    udp_tx: mpsc::Sender<Datagram>,
}

impl BirthdaySockets {
    /// None open yet; readers will deliver to `udp_tx`.
    pub(super) fn new(udp_tx: mpsc::Sender<Datagram>) -> BirthdaySockets {
        BirthdaySockets {
            extra: HashMap::new(),
            next_via: udp::MAIN + 1,
            udp_tx,
        }
    }

    /// Opens one socket on `ip` (any port) with a reader (STUN answers to `stun`): its id and
    /// the socket.
    pub(super) fn open(
        &mut self,
        ip: std::net::IpAddr,
        stun: &Arc<StunWaiters>,
    ) -> std::io::Result<(u32, Arc<UdpSocket>)> {
        // The socket that is hit carries the path: the data sockets' buffers.
        let sock = Arc::new(udp::bind_udp(SocketAddr::new(ip, 0))?);
        let via = self.next_via;
        self.next_via = self.next_via.wrapping_add(1).max(udp::MAIN + 1);
        let reader = udp::spawn_reader(
            Arc::clone(&sock),
            Arc::clone(stun),
            Some(self.udp_tx.clone()),
            via,
        );
        self.extra.insert(via, (Arc::clone(&sock), reader));
        Ok((via, sock))
    }

    /// The socket with id `via`, if it is open.
    pub(super) fn get(&self, via: u32) -> Option<&Arc<UdpSocket>> {
        self.extra.get(&via).map(|(s, _)| s)
    }

    /// Whether the socket with id `via` is open.
    pub(super) fn contains(&self, via: u32) -> bool {
        self.extra.contains_key(&via)
    }

    /// Closes every socket not in `in_use`.
    pub(super) fn retain(&mut self, in_use: &HashSet<u32>) {
        self.extra.retain(|via, (_, reader)| {
            let keep = in_use.contains(via);
            if !keep {
                reader.abort();
            }
            keep
        });
    }
}

impl Drop for BirthdaySockets {
    fn drop(&mut self) {
        for (_, reader) in self.extra.values() {
            reader.abort();
        }
    }
}

/// How many birthday sockets to open: [`BIRTHDAY_SOCKETS`], or half of the file descriptors
/// still free under the soft `RLIMIT_NOFILE` if that is less (the relay connections, netcheck
/// and the application need the rest).
pub(super) fn birthday_socket_budget() -> usize {
    #[cfg(target_os = "linux")]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
        } else {
            1024
        };
        let open = std::fs::read_dir("/proc/self/fd").map_or(soft / 2, |d| d.count());
        BIRTHDAY_SOCKETS.min(soft.saturating_sub(open) / 2)
    }
    #[cfg(not(target_os = "linux"))]
    {
        BIRTHDAY_SOCKETS
    }
}
