//! Scenarios that stop processes with SIGSTOP instead of killing them: the
//! primary's agent alone, the agent's whole process group (Ctrl-Z), and the
//! whole node (agent, guard and PostgreSQL at one instant, as a host
//! suspended and resumed). Nothing that an agent does while it runs can
//! help here: only the fencing guard, a process of its own in a session of
//! its own, stands between a frozen leader and two writers. The direct
//! writers (straight to each node's PostgreSQL port) are the evidence.

use crate::common::Harness;
use crate::evidence::{Ack, Evidence, check, first_write_elsewhere, now_us};
use crate::scenarios::{Running, enable_sync, ttl, under_load};
use mainstay_dcs::Dcs;
use mainstay_sys::process;
use mainstay_testkit::crash::{children_of, parent_of, process_group_of};
use std::time::{Duration, Instant};

/// Processes stopped by a scenario: a pid, or a process group as `-pgid`.
/// They are resumed back to back, those stopped with `resume_first` first
/// (in the order stopped), then the others (in the order stopped); and on
/// drop if the scenario failed before resuming them, so that no stopped
/// process outlives a scenario (the lab's teardown kills them anyway).
struct Stopped {
    first: Vec<(i32, String)>,
    then: Vec<(i32, String)>,
    resumed: bool,
}

impl Stopped {
    fn new() -> Stopped {
        Stopped {
            first: Vec::new(),
            then: Vec::new(),
            resumed: false,
        }
    }

    /// SIGSTOPs `target` at once.
    fn stop(&mut self, target: i32, what: impl Into<String>, resume_first: bool) {
        let what = what.into();
        assert_safe(target, &what);
        // The target was checked.
        if let Err(e) = process::kill(target, libc::SIGSTOP) {
            panic!("SIGSTOP to {what} ({target}): {e}");
        }
        if resume_first {
            self.first.push((target, what));
        } else {
            self.then.push((target, what));
        }
    }

    /// SIGCONTs every target, back to back.
    fn resume(&mut self) {
        for (target, _) in self.first.iter().chain(&self.then) {
            // Checked when stopped.
            let _ = process::kill(*target, libc::SIGCONT);
        }
        self.resumed = true;
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.resumed {
            self.resume();
        }
    }
}

/// Runs `f` with the calling thread under the real-time SCHED_FIFO policy,
/// so that the processes it stops or resumes cannot preempt it half-way: a
/// dozen kill(2) calls then take microseconds instead of the milliseconds a
/// busy two-core machine takes to come back to an ordinary thread, and the
/// node stops or thaws as a whole, nearly as one suspended host would.
/// Returns whether the policy could be set (root can).
fn urgently<T>(f: impl FnOnce() -> T) -> (T, bool) {
    let raised = process::set_scheduler(libc::SCHED_FIFO, 50).is_ok();
    let result = f();
    if raised {
        let _ = process::set_scheduler(libc::SCHED_OTHER, 0);
    }
    (result, raised)
}

/// Never the test itself, its process group, init, or "every process"
/// (0 and -1 mean that to kill(2)).
fn assert_safe(target: i32, what: &str) {
    let (me, my_group) = (process::getpid(), process::getpgrp());
    if target > 0 {
        assert!(
            target > 1 && target != me,
            "refusing to stop {what}: pid {target}"
        );
    } else {
        let group = -target;
        assert!(
            group > 1 && group != my_group,
            "refusing to stop {what}: process group {group} (the test's own is {my_group})"
        );
    }
}

/// What happened while the primary was frozen.
#[derive(Default)]
struct Watched {
    /// When its postmaster was seen gone.
    fenced: Option<Instant>,
    /// When etcd first showed another leader.
    other_leader: Option<Instant>,
}

/// Watches node `l` (once every 50 ms) until `until`: whether its
/// postmaster exits (the guard fenced it) and when etcd names another
/// leader.
async fn watch(h: &Harness, l: usize, old: &str, until: Instant) -> Watched {
    let dcs = h.cluster.dcs().await.expect("etcd client");
    let mut watched = Watched::default();
    let mut next_view = Instant::now();
    // Bounded by `until`, and by a count.
    for _ in 0..10_000 {
        let now = Instant::now();
        if now >= until {
            break;
        }
        if watched.fenced.is_none() && h.cluster.nodes[l].postmaster_pid().is_none() {
            watched.fenced = Some(now);
        }
        if watched.other_leader.is_none() && now >= next_view {
            next_view = now + Duration::from_millis(100);
            if let Ok(Ok(view)) =
                tokio::time::timeout(Duration::from_millis(500), dcs.read_cluster()).await
                && view
                    .leader
                    .as_ref()
                    .is_some_and(|leader| leader.name != old)
            {
                watched.other_leader = Some(Instant::now());
            }
        }
        let left = until.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(Duration::from_millis(50))).await;
    }
    watched
}

/// When, from PostgreSQL's log file on node `l` (`<node>.postgres.log`
/// beside the data directory), the fence happened: µs since the epoch, at
/// millisecond precision, the first time at or after `after_us`.
#[derive(Clone, Copy, Default)]
struct FenceTimes {
    /// The guard's line "fencing postgres (SIGQUIT ...)".
    guard: Option<i64>,
    /// The guard's "postgres exited": every PostgreSQL process is gone (the
    /// guard kills the children itself, then the postmaster).
    postmaster: Option<i64>,
}

impl FenceTimes {
    fn read(h: &Harness, l: usize, after_us: i64) -> FenceTimes {
        let node = &h.cluster.nodes[l];
        let Some(dir) = node.data_dir().parent().map(|d| d.to_path_buf()) else {
            return FenceTimes::default();
        };
        let text = std::fs::read_to_string(dir.join(format!("{}.postgres.log", node.name)))
            .unwrap_or_default();
        let since = |at: &i64| *at >= after_us - 1000;
        let guard_line = |what: &str| {
            text.lines()
                .filter(|l| l.starts_with("mainstay-guard[") && l.contains(what))
                .filter_map(|l| {
                    let at = l.split(" at unix time ").nth(1)?.split(':').next()?;
                    let (secs, millis) = at.split_once('.')?;
                    Some(secs.parse::<i64>().ok()? * 1_000_000 + millis.parse::<i64>().ok()? * 1000)
                })
                .find(since)
        };
        FenceTimes {
            guard: guard_line("fenced postgres"),
            postmaster: guard_line("postgres exited"),
        }
    }

    /// "guard fenced 0 ms and postgres was gone 1 ms after the resume".
    fn describe(&self, since_us: i64, since: &str) -> String {
        let rel = |t: Option<i64>| {
            t.map_or("? ms (not in its log)".to_string(), |t| {
                format!("{} ms", (t - since_us) / 1000)
            })
        };
        format!(
            "guard fenced {} and postgres was gone {} after {since}",
            rel(self.guard),
            rel(self.postmaster)
        )
    }
}

/// Writes acknowledged by `node` with a server commit time after `after_us`.
fn acked_by_after<'a>(evidence: &'a Evidence, node: &str, after_us: i64) -> Vec<&'a Ack> {
    evidence
        .acked
        .iter()
        .filter(|a| a.node == node && a.committed_us > after_us)
        .collect()
}

/// The server time from the last write `old` acknowledged to the first
/// another node did after it (µs; negative: they overlap).
fn handover_gap_us(evidence: &Evidence, old: &str) -> Option<i64> {
    let last_old = evidence
        .acked
        .iter()
        .filter(|a| a.node == old)
        .map(|a| a.committed_us)
        .max()?;
    let first_new = evidence
        .acked
        .iter()
        .filter(|a| a.node != old)
        .map(|a| a.committed_us)
        .filter(|at| {
            // The new leader's, not writes from before `old` led.
            evidence
                .acked
                .iter()
                .any(|o| o.node == old && o.committed_us < *at)
        })
        .min()?;
    Some(first_new - last_old)
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// Waits (bounded) for the cluster to be whole again under a leader other
/// than `old`, with `old` a streaming replica, while the writers go on, so
/// that the direct writer on `old` watches it through its rejoin.
async fn rejoined(h: &Harness, old: &str) -> String {
    let leader = h.healthy(Duration::from_secs(90)).await;
    assert_ne!(
        leader, old,
        "{old} leads again after being frozen: expected another node to have taken over"
    );
    // A little more of the direct writers against the rejoined node.
    tokio::time::sleep(Duration::from_secs(1)).await;
    leader
}

/// The primary's agent is frozen for 3 × ttl: alone (`group` false, a
/// debugger or `kill -STOP`), or its whole process group (`group` true,
/// as Ctrl-Z in a terminal does). Its PostgreSQL must stop at the fencing
/// deadline all the same: another node leads, the old primary acknowledged
/// nothing after the new leader's first write, and once resumed the old
/// agent rejoins as a replica.
fn freeze_agent(group: bool) -> impl Fn(&mut Harness) -> Running<'_> + Sync {
    move |h| {
        Box::pin(async move {
            let (old, writers) = under_load(h).await;
            let l = h.cluster.node_index(&old).unwrap();
            let frozen_for = 3 * ttl(h);
            let agent = h.cluster.agent_pid(l).expect("the primary's agent") as i32;
            let guard = h.cluster.guard_pid(l).expect("the primary's fencing guard") as i32;
            let mut stopped = Stopped::new();
            let at = Instant::now();
            let at_us = now_us();
            if group {
                let pgid = process_group_of(agent).expect("the agent's process group");
                assert_eq!(pgid, agent, "the agent leads a process group of its own");
                assert_ne!(
                    process_group_of(guard),
                    Some(pgid),
                    "the guard is in the agent's process group"
                );
                // Never the test's own group (assert_safe checks it too).
                let own = process::getpgrp();
                assert_ne!(pgid, own, "the agent is in the test's own process group");
                stopped.stop(-pgid, "the agent's process group", false);
            } else {
                stopped.stop(agent, "the agent", false);
            }
            let what = if group {
                "the agent's process group"
            } else {
                "the agent"
            };
            let watched = watch(h, l, &old, at + frozen_for).await;
            let resume_us = now_us();
            let resumed = Instant::now();
            stopped.resume();
            let takeover =
                at + Duration::from_millis(first_write_elsewhere(&writers, at, &old).await);
            let fenced = watched.fenced.unwrap_or_else(|| {
                h.dump_logs();
                panic!(
                    "{old}'s PostgreSQL still ran after its agent was frozen for {}",
                    ms(frozen_for)
                )
            });
            assert!(
                fenced <= takeover,
                "{old}'s PostgreSQL was seen running {} after another node acknowledged a write",
                ms(fenced - takeover)
            );
            let leader = rejoined(h, &old).await;
            let rejoined_after = resumed.elapsed();
            let evidence = writers.finish().await;
            let after_resume = acked_by_after(&evidence, &old, resume_us);
            let gap = handover_gap_us(&evidence, &old);
            let mut outcome = check(
                h,
                &evidence,
                false,
                takeover.duration_since(at).as_millis() as u64,
            )
            .await;
            let fence = FenceTimes::read(h, l, at_us).describe(at_us, "the freeze");
            outcome.note = Some(format!(
                "{what} stopped for {}: PostgreSQL gone after {} ({fence}), \
                 {leader}'s lead seen in etcd after {}, first write elsewhere after {}, \
                 {old}'s last write {} before the new leader's first (server time); \
                 {} writes by {old} after the resume; {old} rejoined as a replica {} after the resume",
                ms(frozen_for),
                ms(fenced - at),
                watched.other_leader.map_or("never".into(), |t| ms(t - at)),
                ms(takeover - at),
                gap.map_or("?".into(), |g| format!("{:.1} ms", g as f64 / 1000.0)),
                after_resume.len(),
                ms(rejoined_after),
            ));
            outcome
        })
    }
}

pub(crate) fn primary_agent_frozen(h: &mut Harness) -> Running<'_> {
    freeze_agent(false)(h)
}

pub(crate) fn primary_agent_group_stopped(h: &mut Harness) -> Running<'_> {
    freeze_agent(true)(h)
}

/// The primary's whole node stops at one instant for 2 × ttl, as a host
/// suspended (a laptop's lid, a paused VM) would, then resumes: its agent,
/// its fencing guard, its postmaster and every child of the postmaster
/// (each PostgreSQL child leads a session of its own, so the postmaster's
/// process group holds the postmaster alone). The host's etcd member keeps
/// running: it is one member of three, and freezing it too would only add
/// an etcd election to what is measured.
///
/// Meanwhile another node takes over. At the resume the guard's deadline
/// has long passed and it fences at once; what is measured is whether the
/// old primary acknowledged anything in the instant between the resume and
/// the fence. In asynchronous mode the scenario passes as long as no write
/// of the old primary comes after the new leader's first (the checker);
/// in synchronous mode the old primary must acknowledge nothing at all
/// after the resume (a commit waits for a standby that now follows the new
/// leader).
pub(crate) fn primary_host_suspended(sync: bool) -> impl Fn(&mut Harness) -> Running<'_> + Sync {
    move |h| {
        Box::pin(async move {
            let leader = h.healthy(Duration::from_secs(120)).await;
            if sync {
                enable_sync(h, &leader).await;
            }
            let (old, writers) = under_load(h).await;
            let l = h.cluster.node_index(&old).unwrap();
            let suspended_for = 2 * ttl(h);
            let agent = h.cluster.agent_pid(l).expect("the primary's agent") as i32;
            let postmaster = h.cluster.nodes[l]
                .postmaster_pid()
                .expect("the primary's postmaster");
            let guard = h.cluster.guard_pid(l).expect("the primary's fencing guard") as i32;
            assert_eq!(parent_of(postmaster), Some(guard));
            let pm_group = process_group_of(postmaster).expect("the postmaster's group");
            assert_eq!(pm_group, postmaster, "the postmaster leads its own group");
            let mut stopped = Stopped::new();
            let at = Instant::now();
            let at_us = now_us();
            // Stopped: the agent, the guard, the postmaster's group; then,
            // the postmaster forking no more, each of its children; all
            // from a real-time thread, back to back.
            let ((children, stop_took), realtime) = urgently(|| {
                stopped.stop(agent, "the agent", false);
                stopped.stop(guard, "the guard", false);
                stopped.stop(-pm_group, "postgres: the postmaster's group", true);
                let children = children_of(postmaster);
                for child in &children {
                    stopped.stop(*child, format!("postgres: child {child}"), true);
                }
                (children, at.elapsed())
            });
            let watched = watch(h, l, &old, at + suspended_for).await;
            let other_leader = watched.other_leader.unwrap_or_else(|| {
                h.dump_logs();
                panic!(
                    "no other node led while {old}'s host was suspended for {}",
                    ms(suspended_for)
                )
            });
            assert!(
                watched.fenced.is_none(),
                "{old}'s postmaster exited while stopped"
            );
            // Resumed all at once, as fast as possible (from a real-time
            // thread: microseconds for all), in this order: PostgreSQL (the
            // postmaster's group, then its children), then the guard, then
            // the agent. PostgreSQL gets the head start of those few
            // microseconds: the order least favourable to the fence.
            let resume_us = now_us();
            let resumed = Instant::now();
            let (resume_took, _) = urgently(|| {
                stopped.resume();
                resumed.elapsed()
            });
            let takeover =
                at + Duration::from_millis(first_write_elsewhere(&writers, at, &old).await);
            let leader = rejoined(h, &old).await;
            let rejoined_after = resumed.elapsed();
            let evidence = writers.finish().await;
            let late = acked_by_after(&evidence, &old, resume_us);
            let window = late.iter().map(|a| a.committed_us).max();
            // The new leader's first write (server time).
            let first_new = evidence
                .acked
                .iter()
                .filter(|a| a.node != old && a.committed_us > at_us)
                .map(|a| a.committed_us)
                .min();
            let fence = FenceTimes::read(h, l, resume_us).describe(resume_us, "the resume");
            // Whether the race was run: a direct write to the old primary
            // sent before the resume and still waiting at it.
            let old_host = &h.cluster.nodes[l].host;
            let in_flight_acked = late.iter().filter(|a| a.direct).count();
            let in_flight_unknown = evidence
                .unknown_direct
                .iter()
                .filter(|(host, sent, ended)| {
                    host == old_host && *sent < resumed && *ended >= resumed
                })
                .count();
            let described = match window {
                None => "the old primary acknowledged no write after the resume".to_string(),
                Some(last) => format!(
                    "the old primary acknowledged {} writes after the resume ({} on direct \
                     sessions, ids {:?}), the last {:.1} ms after it",
                    late.len(),
                    late.iter().filter(|a| a.direct).count(),
                    late.iter().map(|a| a.id).collect::<Vec<_>>(),
                    (last - resume_us) as f64 / 1000.0
                ),
            };
            if sync {
                assert!(
                    late.is_empty(),
                    "synchronous mode: {described} (server commit times; {fence})"
                );
            }
            if let Some(first_new) = first_new
                && late.iter().any(|a| a.committed_us > first_new)
            {
                panic!(
                    "host suspended: {described} (server commit times), while {leader} had been \
                     acknowledging writes since {} ms before the resume: two writers ({fence})",
                    (resume_us - first_new) / 1000,
                );
            }
            let gap = handover_gap_us(&evidence, &old);
            let in_flight = format!(
                "{} direct writes to {old} waiting across the resume ({in_flight_unknown} broken \
                 by the fence, {in_flight_acked} acknowledged)",
                in_flight_unknown + in_flight_acked
            );
            let mut outcome = check(
                h,
                &evidence,
                sync,
                takeover.duration_since(at).as_millis() as u64,
            )
            .await;
            outcome.note = Some(format!(
                "host suspended {} ({} processes stopped in {} µs, resumed in {} µs{}): \
                 {leader} led in etcd after {}; {described}; {in_flight}; {fence}; {old}'s last write \
                 {} before the new leader's first (server time); rejoined {} after the resume",
                ms(suspended_for),
                3 + children.len(),
                stop_took.as_micros(),
                resume_took.as_micros(),
                if realtime { "" } else { ", not real-time" },
                ms(other_leader - at),
                gap.map_or("?".into(), |g| format!("{:.1} ms", g as f64 / 1000.0)),
                ms(rejoined_after),
            ));
            outcome
        })
    }
}
