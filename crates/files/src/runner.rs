//! The replication of a node's `[[replicate]]` directories, following the
//! agent's published view: while the node leads, each directory is a
//! source (rescanned when its change events say something changed, and
//! every `scan_interval` anyway; its offer served to the others by the
//! agent's API); otherwise it follows the leader, pulling what differs.
//!
//! Each directory runs on a thread of its own: scanning, hashing and
//! fsyncing are blocking work that must never hold up the HA loop, and a
//! receiver waiting for its leader's next offer (a long poll) must not
//! hold up another directory. A source scans as soon as its change
//! events say something happened; a receiver's question returns as soon
//! as the offer moves. The transport (the agent's authenticated, possibly
//! TLS, REST API) is given by the agent.

use crate::follower::{Follower, FollowerStatus};
use crate::manifest::{Entry, Kind};
use crate::source::{Offer, Source};
use crate::spec::ReplicateSpec;
use crate::watch::{Changes, Watch};
use mainstay_core::Published;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use tracing::{info, warn};

/// How a receiver reaches the leader's agent.
pub trait Transport: Send + 'static {
    /// The leader's offer for directory `index`, telling it what this
    /// receiver (`receiver`) has `applied`; `Ok(None)` when that is still
    /// the offer after waiting up to `wait` for it to move, and a `full`
    /// one was not asked for.
    fn offer(
        &mut self,
        leader_url: &str,
        index: usize,
        receiver: &str,
        applied: Option<(&str, u64)>,
        full: bool,
        wait: Duration,
    ) -> Result<Option<Offer>, String>;
    /// A file's bytes from `offset` on, streamed.
    fn open(
        &mut self,
        leader_url: &str,
        index: usize,
        path: &str,
        offset: u64,
    ) -> io::Result<Box<dyn Read + Send>>;
}

/// A source without change events scans this often; a source with them
/// scans at the latest this long after one arrives (settling files are
/// looked at again at this pace too); after a failed round, the next one
/// waits this long.
const TICK: Duration = Duration::from_millis(200);

/// How long the leader holds a receiver's question while its offer does
/// not move. Short enough that a receiver whose leader vanished without
/// closing the connection (a power cut) asks the new one soon.
pub const LONG_POLL: Duration = Duration::from_secs(2);

/// Each directory's side on this node.
enum Side {
    Source(Box<Sourcing>),
    Follower(Box<Follower>),
    /// A follower at work off the shared list (so that a long poll or a
    /// long transfer holds up no API request): its status as the round
    /// began, for the API to show meanwhile.
    Receiving(Box<FollowerStatus>),
    Idle,
}

/// A source (its change events live on its directory's thread).
struct Sourcing {
    source: Source,
    /// Whether change events could be had (not: inotify's limits); the
    /// source then scans at every tick.
    change_events: bool,
    /// Files closed after writing, seen in the events, and when.
    closed: HashMap<String, SystemTime>,
    last_scan: Option<Instant>,
    /// The same, as a date for people.
    last_scan_at: Option<SystemTime>,
}

struct Dir {
    spec: ReplicateSpec,
    side: Side,
    /// A receiver's last full look at its own tree (local writes).
    last_full: Option<Instant>,
    last_full_at: Option<SystemTime>,
    error: Option<String>,
}

/// The handle the agent keeps: what the API serves and shows.
pub struct Replication {
    dirs: Arc<Mutex<Vec<Dir>>>,
    /// Where each directory stands, in a word, by path: updated after
    /// every round, read by the HA loop for the member key (never behind
    /// the lock a scan holds).
    summary: Arc<Mutex<BTreeMap<String, String>>>,
    /// Bumped whenever a directory's offer moves or this node stops being
    /// its source: what a long-polling receiver's request waits on.
    offers: watch::Sender<u64>,
    stop: Arc<AtomicBool>,
}

impl Replication {
    /// Starts one thread per directory; each makes its own transport
    /// with `transport`.
    pub fn start<T: Transport>(
        specs: Vec<ReplicateSpec>,
        published: watch::Receiver<Published>,
        node: String,
        transport: impl Fn() -> io::Result<T> + Send + Sync + 'static,
    ) -> io::Result<Replication> {
        let count = specs.len();
        let dirs: Vec<Dir> = specs
            .into_iter()
            .map(|spec| Dir {
                spec,
                side: Side::Idle,
                last_full: None,
                last_full_at: None,
                error: None,
            })
            .collect();
        let dirs = Arc::new(Mutex::new(dirs));
        let stop = Arc::new(AtomicBool::new(false));
        let summary = Arc::new(Mutex::new(BTreeMap::new()));
        let (offers, _) = watch::channel(0u64);
        for index in 0..count {
            let thread = Thread {
                dirs: dirs.clone(),
                index,
                summary: summary.clone(),
                published: published.clone(),
                node: node.clone(),
                transport: transport()?,
                stop: stop.clone(),
                offers: offers.clone(),
            };
            let span = tracing::Span::current();
            std::thread::Builder::new()
                .name(format!("replicate-{index}"))
                .spawn(move || {
                    let _entered = span.enter();
                    thread.run()
                })?;
        }
        Ok(Replication {
            dirs,
            summary,
            offers,
            stop,
        })
    }

    /// Changes when any directory's offer moves (see `offer`).
    pub fn offers_moved(&self) -> watch::Receiver<u64> {
        self.offers.subscribe()
    }

    /// Where each directory stands on this node, in a word, by path.
    pub fn summary(&self) -> BTreeMap<String, String> {
        mainstay_core::poison::lock(&self.summary).clone()
    }

    /// Directory `index`'s offer while this node is its source (`None`
    /// when it is not: a receiver asked the wrong node), after noting what
    /// `receiver` says it `applied`. `Some(None)`: it has applied this
    /// very offer, and `full` was not asked for.
    pub fn offer(
        &self,
        index: usize,
        receiver: Option<&str>,
        applied: Option<(&str, u64)>,
        full: bool,
    ) -> Option<Option<Arc<Offer>>> {
        let mut dirs = mainstay_core::poison::lock(&self.dirs);
        let Side::Source(sourcing) = &mut dirs.get_mut(index)?.side else {
            return None;
        };
        let source = &mut sourcing.source;
        let current = applied.is_some_and(|(instance, _)| instance == source.offer().instance);
        if let (Some(receiver), Some((_, version)), true) = (receiver, applied, current) {
            source.heard_from(receiver, version, SystemTime::now());
        }
        let unchanged = current && applied.is_some_and(|(_, v)| v == source.offer().version);
        Some((full || !unchanged).then(|| source.offer().clone()))
    }

    /// The root of directory `index` and the entry of `relative` in its
    /// current offer, to serve it; `None` unless this node is the source
    /// and offers that file.
    pub fn file(&self, index: usize, relative: &str) -> Option<(std::path::PathBuf, Entry)> {
        let dirs = mainstay_core::poison::lock(&self.dirs);
        let dir = dirs.get(index)?;
        let Side::Source(sourcing) = &dir.side else {
            return None;
        };
        let entry = sourcing.source.offer().entries.get(relative)?;
        matches!(entry.kind, Kind::File { .. }).then(|| (dir.spec.path.clone(), entry.clone()))
    }

    /// What operators should hear about now (see `trouble`): receivers
    /// behind by more than `limit`, files failing for longer.
    pub fn troubles(&self, node: &str, limit: Duration) -> Vec<crate::trouble::Trouble> {
        let now = SystemTime::now();
        let unix = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let dirs = mainstay_core::poison::lock(&self.dirs);
        let mut troubles = Vec::new();
        for dir in dirs.iter() {
            let path = dir.spec.path.display().to_string();
            match &dir.side {
                Side::Source(sourcing) => troubles.extend(crate::trouble::lagging(
                    &path,
                    &sourcing.source.lag(now),
                    limit,
                )),
                Side::Follower(follower) => troubles.extend(crate::trouble::failing(
                    node,
                    follower.status(),
                    limit,
                    unix,
                )),
                Side::Receiving(status) => {
                    troubles.extend(crate::trouble::failing(node, status, limit, unix))
                }
                Side::Idle => {}
            }
        }
        troubles
    }

    /// Every directory's state, for `GET /replication/files`.
    pub fn status(&self) -> Value {
        let dirs = mainstay_core::poison::lock(&self.dirs);
        let list: Vec<Value> = dirs
            .iter()
            .map(|dir| {
                let mut value = match &dir.side {
                    Side::Source(sourcing) => json!({
                        "role": "source",
                        "instance": sourcing.source.offer().instance,
                        "version": sourcing.source.offer().version,
                        "entries": sourcing.source.offer().entries.len(),
                        "unsettled": sourcing.source.unsettled(),
                        "skipped": sourcing.source.skipped(),
                        "change_events": sourcing.change_events,
                        "receivers": sourcing.source.lag(SystemTime::now()),
                    }),
                    Side::Follower(_) | Side::Receiving(_) => {
                        let status = match &dir.side {
                            Side::Follower(follower) => follower.status(),
                            Side::Receiving(status) => status,
                            _ => unreachable!("matched above"),
                        };
                        let mut value = serde_json::to_value(status).unwrap_or(Value::Null);
                        value["role"] = json!("receiver");
                        value
                    }
                    Side::Idle => json!({ "role": "idle" }),
                };
                value["path"] = json!(dir.spec.path.display().to_string());
                value["error"] = json!(dir.error);
                // The source's every scan reads the whole tree; a receiver
                // compares its whole tree with a full offer this often.
                let full_scan = match &dir.side {
                    Side::Source(sourcing) => sourcing.last_scan_at,
                    _ => dir.last_full_at,
                };
                value["last_full_scan"] = json!(full_scan.and_then(|at| {
                    at.duration_since(SystemTime::UNIX_EPOCH)
                        .ok()
                        .map(|d| (d.as_millis() as f64) / 1000.0)
                }));
                value
            })
            .collect();
        json!({ "directories": list })
    }
}

impl Drop for Replication {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One directory's thread.
struct Thread<T> {
    dirs: Arc<Mutex<Vec<Dir>>>,
    index: usize,
    summary: Arc<Mutex<BTreeMap<String, String>>>,
    published: watch::Receiver<Published>,
    node: String,
    transport: T,
    stop: Arc<AtomicBool>,
    offers: watch::Sender<u64>,
}

/// What a thread does before its next round.
enum Pause {
    /// Wait for change events (a source), at most a tick.
    Events,
    /// Go on at once: the round itself waited (a long poll) or applied
    /// something.
    None,
    Tick,
}

impl<T: Transport> Thread<T> {
    fn run(mut self) {
        let mut watch: Option<Watch> = None;
        let mut pending = Changes::default();
        let mut offered = None;
        while !self.stop.load(Ordering::Relaxed) {
            let now = self.published.borrow().clone();
            let view = now.view.as_deref();
            let leader = view.and_then(|v| v.leader_name()).map(str::to_string);
            let leader_url = leader
                .as_ref()
                .and_then(|l| view?.members.get(l))
                .map(|m| m.status.api_url.clone())
                .filter(|url| !url.is_empty());
            // A bug in one round must not end replication for good (nor
            // the agent): it is logged and the next round starts afresh.
            let round = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if now.local.leading {
                    be_source(
                        &self.dirs,
                        self.index,
                        &self.node,
                        &mut watch,
                        std::mem::take(&mut pending),
                    );
                    Pause::Events
                } else {
                    watch = None;
                    match (&leader, &leader_url) {
                        (Some(leader), Some(url)) if *leader != self.node => {
                            follow(&self.dirs, self.index, url, &self.node, &mut self.transport)
                        }
                        _ => {
                            mainstay_core::poison::lock(&self.dirs)[self.index].side = Side::Idle;
                            Pause::Tick
                        }
                    }
                }
            }));
            let pause = round.unwrap_or_else(|_| {
                tracing::error!("a replication round panicked; the next one starts afresh");
                mainstay_core::poison::lock(&self.dirs)[self.index].side = Side::Idle;
                watch = None;
                Pause::Tick
            });
            let (path, word, offer) = {
                let dirs = mainstay_core::poison::lock(&self.dirs);
                let dir = &dirs[self.index];
                let offer = match &dir.side {
                    Side::Source(s) => {
                        Some((s.source.offer().instance.clone(), s.source.offer().version))
                    }
                    _ => None,
                };
                (dir.spec.path.display().to_string(), word(dir), offer)
            };
            mainstay_core::poison::lock(&self.summary).insert(path, word);
            if offer != offered {
                offered = offer;
                self.offers.send_modify(|n| *n = n.wrapping_add(1));
            }
            match (pause, &watch) {
                (Pause::Events, Some(events)) => pending = events.wait(TICK),
                (Pause::None, _) => {}
                _ => std::thread::sleep(TICK),
            }
        }
    }
}

fn receiving(status: &FollowerStatus) -> String {
    let word = if status.failed.is_empty() {
        "in sync".to_string()
    } else {
        format!("{} failed", status.failed.len())
    };
    // Kept aside since the agent started: for someone to look at.
    if status.moved_aside_files == 0 {
        word
    } else {
        format!(
            "{word}, {} moved aside ({:.1} MB)",
            status.moved_aside_files,
            status.moved_aside_bytes as f64 / 1e6
        )
    }
}

/// Where a directory stands, in a word.
fn word(dir: &Dir) -> String {
    match (&dir.error, &dir.side) {
        (Some(_), _) => "error".to_string(),
        (None, Side::Source(_)) => "source".into(),
        (None, Side::Follower(f)) => receiving(f.status()),
        (None, Side::Receiving(status)) => receiving(status),
        (None, Side::Idle) => "idle".into(),
    }
}

fn be_source(
    dirs: &Mutex<Vec<Dir>>,
    index: usize,
    node: &str,
    watch: &mut Option<Watch>,
    pending: Changes,
) {
    let mut all = mainstay_core::poison::lock(dirs);
    let dir = &mut all[index];
    if !matches!(dir.side, Side::Source(_)) {
        // What the receiver learnt goes to disk for the source to load.
        if let Side::Follower(follower) = &mut dir.side {
            follower.flush_hashes();
        }
        let instance = format!(
            "{node}-{}",
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        info!(path = %dir.spec.path.display(), %instance, "replicated directory: this node is the source");
        let _ = std::fs::create_dir_all(&dir.spec.path);
        *watch = match Watch::new(&dir.spec.path) {
            Ok(events) => Some(events),
            Err(e) => {
                warn!(
                    path = %dir.spec.path.display(),
                    "no change events ({e}): scanning at every tick instead; raise \
                     fs.inotify.max_user_watches if the tree is large"
                );
                None
            }
        };
        dir.side = Side::Source(Box::new(Sourcing {
            source: Source::new(dir.spec.clone(), instance),
            change_events: watch.is_some(),
            closed: HashMap::new(),
            last_scan: None,
            last_scan_at: None,
        }));
    }
    let Side::Source(sourcing) = &mut dir.side else {
        return;
    };
    sourcing.source.persist_hashes();
    let changes = watch.as_ref().map(|events| {
        let mut changes = pending;
        changes.merge(events.drain());
        changes
    });
    let due = sourcing
        .last_scan
        .is_none_or(|at| at.elapsed() >= dir.spec.scan_interval);
    let scan = match &changes {
        None => true,
        Some(changes) => changes.changed || due || sourcing.source.restless(),
    };
    if let Some(changes) = changes {
        sourcing.closed.extend(changes.closed);
    }
    if !scan {
        return;
    }
    // The scan (every file's stat, the changed ones' bytes) runs without
    // the lock: the API keeps serving the current offer and its files.
    let spec = dir.spec.clone();
    let mut cache = sourcing.source.take_cache();
    drop(all);
    let now = SystemTime::now();
    let scanned = crate::source::scan_tree(&spec, &mut cache);
    let mut all = mainstay_core::poison::lock(dirs);
    let dir = &mut all[index];
    let Side::Source(sourcing) = &mut dir.side else {
        return;
    };
    match sourcing
        .source
        .absorb(cache, scanned, now, &sourcing.closed)
    {
        Ok(_) => dir.error = None,
        Err(e) => {
            let why = format!("cannot read {}: {e}", dir.spec.path.display());
            if dir.error.as_ref() != Some(&why) {
                warn!("{why}");
            }
            dir.error = Some(why);
        }
    }
    sourcing.last_scan = Some(Instant::now());
    sourcing.last_scan_at = Some(now);
    // A close older than the settle time says nothing the mtime does not.
    let settle = dir.spec.settle;
    sourcing
        .closed
        .retain(|_, at| now.duration_since(*at).is_ok_and(|age| age < settle));
}

fn follow(
    dirs: &Mutex<Vec<Dir>>,
    index: usize,
    leader_url: &str,
    node: &str,
    transport: &mut impl Transport,
) -> Pause {
    // The follower leaves the shared list while it works, so that the
    // API is not held up by a long poll or a long transfer.
    let (mut follower, spec, full) = {
        let mut all = mainstay_core::poison::lock(dirs);
        let dir = &mut all[index];
        let follower = match std::mem::replace(&mut dir.side, Side::Idle) {
            Side::Follower(follower) => follower,
            other => {
                if let Side::Source(mut sourcing) = other {
                    sourcing.source.flush_hashes();
                }
                info!(path = %dir.spec.path.display(), "replicated directory: following the leader");
                Box::new(Follower::new(dir.spec.clone()))
            }
        };
        dir.side = Side::Receiving(Box::new(follower.status().clone()));
        let full = dir
            .last_full
            .is_none_or(|at| at.elapsed() >= dir.spec.scan_interval);
        (follower, dir.spec.clone(), full)
    };
    let started = Instant::now();
    let asked = transport.offer(leader_url, index, node, follower.applied(), full, LONG_POLL);
    // A leader that answers "unchanged" at once (one that does not hold
    // questions) is asked again a tick later, not in a busy loop.
    let mut pause = if started.elapsed() < TICK {
        Pause::Tick
    } else {
        Pause::None
    };
    let outcome = match asked {
        Ok(None) => Ok(()),
        Ok(Some(offer)) => {
            let throttle = spec.throttle;
            follower
                .round(&offer, SystemTime::now(), |path, _, offset| {
                    let body = transport.open(leader_url, index, path, offset)?;
                    Ok(Throttled::new(body, throttle))
                })
                .map(|report| {
                    // A failed file is asked for again after a tick.
                    pause = if report.failed.is_empty() {
                        Pause::None
                    } else {
                        Pause::Tick
                    };
                    if report.sent_files + report.moved_aside_files + report.deleted > 0 {
                        follower.round_took(started.elapsed());
                        info!(
                            path = %spec.path.display(),
                            received = report.sent_files,
                            bytes = report.sent_bytes,
                            moved_aside = report.moved_aside_files,
                            deleted = report.deleted,
                            failed = report.failed.len(),
                            "replicated directory: round applied"
                        );
                    }
                    for (path, why) in &report.failed {
                        warn!(path = %spec.path.display(), file = %path, "not received: {why}");
                    }
                })
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e),
    };
    follower.persist_hashes();
    let mut all = mainstay_core::poison::lock(dirs);
    let dir = &mut all[index];
    if full && outcome.is_ok() {
        dir.last_full = Some(Instant::now());
        dir.last_full_at = Some(SystemTime::now());
    }
    match outcome {
        Ok(()) => dir.error = None,
        Err(why) => {
            if dir.error.as_ref() != Some(&why) {
                warn!(path = %spec.path.display(), "replicated directory: {why}");
            }
            dir.error = Some(why);
            pause = Pause::Tick;
        }
    }
    dir.side = Side::Follower(follower);
    pause
}

/// A reader that keeps to `rate` bytes per second (none: as fast as it
/// comes).
struct Throttled<R> {
    inner: R,
    rate: Option<u64>,
    started: Instant,
    read: u64,
}

impl<R: Read> Throttled<R> {
    fn new(inner: R, rate: Option<u64>) -> Throttled<R> {
        Throttled {
            inner,
            rate,
            started: Instant::now(),
            read: 0,
        }
    }
}

impl<R: Read> Read for Throttled<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buffer)?;
        self.read += n as u64;
        if let Some(rate) = self.rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(self.read as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_reader_keeps_to_its_rate() {
        let data = vec![0u8; 50_000];
        let started = Instant::now();
        let mut reader = Throttled::new(&data[..], Some(250_000));
        let mut sink = Vec::new();
        reader.read_to_end(&mut sink).unwrap();
        assert_eq!(sink.len(), 50_000);
        // 50 kB at 250 kB/s: at least 200 ms.
        assert!(started.elapsed() >= Duration::from_millis(190));
    }
}
