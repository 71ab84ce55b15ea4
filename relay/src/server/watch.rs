//! Noticing that files changed, by polling.
//!
//! Kubernetes updates a mounted ConfigMap or Secret by writing a new timestamped directory and
//! swapping the `..data` symlink to it; inotify on the visible path sees nothing useful. So each
//! poll re-resolves the path (reading through every symlink) and compares the contents' SHA-256
//! with the last poll's. Polling a few small files every few seconds costs nothing measurable.

use std::path::PathBuf;
use std::time::Duration;

use sha2::Digest;
use tokio_util::sync::CancellationToken;

/// What a set of files looked like at one poll: per path, the SHA-256 of its contents, or the
/// read error's kind (a missing file is a state too, so its return is noticed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fingerprint(Vec<Result<[u8; 32], std::io::ErrorKind>>);

impl Fingerprint {
    /// Reads every path now (following symlinks, so a swapped `..data` link counts).
    pub(crate) fn of(paths: &[PathBuf]) -> Fingerprint {
        Fingerprint(
            paths
                .iter()
                .map(|p| {
                    std::fs::read(p)
                        .map(|b| sha2::Sha256::digest(&b).into())
                        .map_err(|e| e.kind())
                })
                .collect(),
        )
    }
}

/// Polls `paths` every `interval` until `cancel`, calling `on_change` (on a blocking thread,
/// since it reads files) whenever their contents differ from the previous poll. `initial` is
/// the fingerprint taken when the caller last read the files (take it *before* reading them,
/// so a change in between is reported, not lost).
pub(crate) async fn poll_files<F>(
    paths: Vec<PathBuf>,
    initial: Fingerprint,
    interval: Duration,
    cancel: CancellationToken,
    on_change: F,
) where
    F: Fn() + Send + Sync + 'static,
{
    let on_change = std::sync::Arc::new(on_change);
    let mut last = initial;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let p = paths.clone();
        let f = std::sync::Arc::clone(&on_change);
        let changed = tokio::task::spawn_blocking(move || {
            let now = Fingerprint::of(&p);
            (now != last)
                .then(|| {
                    f();
                    now
                })
                .ok_or(last)
        })
        .await;
        last = match changed {
            Ok(Ok(now)) | Ok(Err(now)) => now,
            Err(_) => return, // the callback panicked or the runtime is shutting down
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_follows_a_swapped_symlink_and_sees_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "one").unwrap();
        std::fs::write(&b, "two").unwrap();
        let link = dir.path().join("link");
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&a, &link).unwrap();
            let first = Fingerprint::of(std::slice::from_ref(&link));
            let tmp = dir.path().join("link.tmp");
            std::os::unix::fs::symlink(&b, &tmp).unwrap();
            std::fs::rename(&tmp, &link).unwrap();
            assert_ne!(Fingerprint::of(std::slice::from_ref(&link)), first);
        }
        let gone = dir.path().join("gone");
        let f = Fingerprint::of(std::slice::from_ref(&gone));
        std::fs::write(&gone, "").unwrap();
        assert_ne!(Fingerprint::of(std::slice::from_ref(&gone)), f);
    }

    #[tokio::test]
    async fn poll_reports_a_change_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "one").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(poll_files(
            vec![p.clone()],
            Fingerprint::of(std::slice::from_ref(&p)),
            Duration::from_millis(10),
            cancel.clone(),
            move || {
                let _ = tx.send(());
            },
        ));
        std::fs::write(&p, "two").unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("change reported")
            .unwrap();
        // A window of several polls: an unchanged file is not reported again.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_err(), "reported once, not every poll");
        cancel.cancel();
        task.await.unwrap();
    }
}
