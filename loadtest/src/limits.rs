//! Process limits: many clients from one machine need many file descriptors.

/// The current soft limit on open files.
pub fn nofile_soft() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 0;
    }
    r.rlim_cur
}

/// Raises the soft open-files limit to the hard limit. Returns (soft, hard) afterwards.
pub fn raise_nofile() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return (0, 0);
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
    }
    (r.rlim_cur, r.rlim_max)
}

/// A warning when `needed` descriptors will not fit under the soft limit.
pub fn check_nofile(needed: u64) -> Option<String> {
    let soft = nofile_soft();
    (soft != 0 && needed + 64 > soft).then(|| {
        format!(
            "{needed} connections need about {} file descriptors but the open-files limit is {soft} \
             (hard limit too): expect `too many open files`; raise it (ulimit -Hn, limits.conf) or use fewer",
            needed + 64
        )
    })
}
