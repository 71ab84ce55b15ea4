//! Reading a server's CPU time and memory from /proc, and our own CPU time.

use std::io;

/// CPU time (user + system) of process `pid`, in seconds, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    cpu_split(pid).map(|(u, s)| u + s)
}

/// CPU time of process `pid` in user and in system (kernel) mode, in seconds.
pub fn cpu_split(pid: u32) -> io::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the ")" closing the command name: state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("unexpected /proc/PID/stat format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> io::Result<f64> {
        fields
            .get(i)
            .ok_or_else(|| io::Error::other("short /proc/PID/stat"))?
            .parse()
            .map_err(io::Error::other)
    };
    let (utime, stime) = (field(11)?, field(12)?);
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((utime / ticks, stime / ticks))
}

/// A `kB` field of /proc/PID/status (`VmRSS`, `VmHWM`), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb * 1024)
        })
        .ok_or_else(|| io::Error::other(format!("no {field} in /proc/{pid}/status")))
}

/// This process's CPU time (user + system), in seconds.
pub fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Checks that `pid` is a process we can read, with a clear error otherwise.
pub fn check_pid(pid: u32) -> anyhow::Result<()> {
    cpu_seconds(pid).map_err(|e| {
        anyhow::anyhow!("--server-pid {pid}: cannot read /proc/{pid}/stat ({e}); is the server running on this host?")
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_process() {
        let me = std::process::id();
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        let rss = status_bytes(me, "VmRSS").unwrap();
        assert!(rss > 0);
        // The peak, read after the current value, is at least that value.
        assert!(status_bytes(me, "VmHWM").unwrap() >= rss);
        assert!(status_bytes(me, "NoSuchField").is_err());
        assert!(check_pid(u32::MAX).is_err());
    }
}
