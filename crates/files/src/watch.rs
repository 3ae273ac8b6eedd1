//! Change events (inotify, through the `notify` crate) on a source
//! directory: they tell the source when to scan again, and which files
//! were closed after writing, which need not wait out the settle time.
//! Events only hurry things along: a lost or overflowed queue costs a
//! delay until the next periodic scan, never a file, because the offer
//! always comes from a full scan.

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

pub struct Watch {
    root: PathBuf,
    _watcher: notify::RecommendedWatcher,
    events: mpsc::Receiver<notify::Result<notify::Event>>,
}

/// What the events since the last look say.
#[derive(Default, Debug)]
pub struct Changes {
    /// Something changed (or the queue overflowed): scan again.
    pub changed: bool,
    /// Events were lost (the kernel's queue overflowed): only a scan
    /// knows what changed.
    pub overflowed: bool,
    /// Files closed after writing, by path relative to the root, and when
    /// the close was seen.
    pub closed: HashMap<String, SystemTime>,
}

impl Changes {
    pub fn merge(&mut self, later: Changes) {
        self.changed |= later.changed;
        self.overflowed |= later.overflowed;
        self.closed.extend(later.closed);
    }
}

impl Watch {
    /// Watches `root` and everything under it.
    pub fn new(root: &Path) -> notify::Result<Watch> {
        let (tx, events) = mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            let _ = tx.send(event);
        })?;
        watcher.watch(root, RecursiveMode::Recursive)?;
        Ok(Watch {
            root: root.to_path_buf(),
            _watcher: watcher,
            events,
        })
    }

    /// Everything that arrived since the last call, without waiting.
    pub fn drain(&self) -> Changes {
        let mut changes = Changes::default();
        while let Ok(event) = self.events.try_recv() {
            self.absorb(&mut changes, event);
        }
        changes
    }

    /// Waits up to `timeout` for the first event, then takes everything
    /// that arrived: a source scans as soon as something happens instead
    /// of at its next tick.
    pub fn wait(&self, timeout: Duration) -> Changes {
        let mut changes = Changes::default();
        if let Ok(event) = self.events.recv_timeout(timeout) {
            self.absorb(&mut changes, event);
            changes.merge(self.drain());
        }
        changes
    }

    fn absorb(&self, changes: &mut Changes, event: notify::Result<notify::Event>) {
        // An error (an overflowed queue among them) means events were
        // lost: scan.
        let Ok(event) = event else {
            changes.changed = true;
            changes.overflowed = true;
            return;
        };
        if event.need_rescan() {
            changes.changed = true;
            changes.overflowed = true;
        }
        match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                changes.changed = true;
                for path in &event.paths {
                    if let Some(relative) = self.relative(path) {
                        changes.closed.insert(relative, SystemTime::now());
                    }
                }
            }
            EventKind::Access(_) => {}
            _ => changes.changed = true,
        }
    }

    fn relative(&self, path: &Path) -> Option<String> {
        Some(path.strip_prefix(&self.root).ok()?.to_str()?.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An overflowed event queue (a queue of 16 events, files written in
    /// batches until the kernel drops events: bounded, 40,000 at most)
    /// still says "scan", and the scan finds every file.
    #[test]
    fn an_overflowed_queue_loses_nothing() {
        if mainstay_sys::process::geteuid() != 0 {
            mainstay_testkit::skip("setting fs.inotify.max_queued_events needs root");
            return;
        }
        let limit = "/proc/sys/fs/inotify/max_queued_events";
        let before = std::fs::read_to_string(limit).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // The limit is taken when the watch is made: restored at once.
        std::fs::write(limit, "16").unwrap();
        let watch = Watch::new(dir.path());
        std::fs::write(limit, before.trim()).unwrap();
        let watch = watch.unwrap();
        let mut written = 0;
        let mut seen = Changes::default();
        while !seen.overflowed && written < 40_000 {
            for _ in 0..2_000 {
                std::fs::write(dir.path().join(format!("f{written}")), b"x").unwrap();
                written += 1;
            }
            let more = watch.drain();
            seen.changed |= more.changed;
            seen.overflowed |= more.overflowed;
        }
        std::thread::sleep(Duration::from_millis(200));
        let more = watch.drain();
        seen.overflowed |= more.overflowed;
        assert!(seen.changed);
        assert!(seen.overflowed, "no overflow after {written} files");
        // The scan that follows finds every file.
        let spec = crate::spec::ReplicateSpec {
            path: dir.path().to_path_buf(),
            exclude: crate::spec::Excludes::none(),
            settle: Duration::from_millis(1),
            scan_interval: Duration::from_secs(60),
            throttle: None,
        };
        let mut source = crate::source::Source::new(spec, "i".into());
        source
            .rescan(SystemTime::now() + Duration::from_secs(1), &HashMap::new())
            .unwrap();
        assert_eq!(source.offer().entries.len(), written);
    }

    #[test]
    fn a_closed_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let watch = Watch::new(dir.path()).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        // Bounded wait for the new directory's watch to be in place.
        std::thread::sleep(Duration::from_millis(100));
        std::fs::write(dir.path().join("sub/upload"), b"bytes").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = Changes::default();
        while !seen.closed.contains_key("sub/upload") && Instant::now() < deadline {
            let more = watch.drain();
            seen.changed |= more.changed;
            seen.closed.extend(more.closed);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(seen.changed);
        assert!(seen.closed.contains_key("sub/upload"), "{seen:?}");
        let quiet = watch.drain();
        assert!(!quiet.changed && quiet.closed.is_empty());
    }
}
