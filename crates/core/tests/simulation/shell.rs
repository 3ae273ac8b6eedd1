//! Each node's HA loop, the simulated shell around the real `decide`: read
//! the DCS (slowly, sometimes: the view is then stale when acted on), probe
//! PostgreSQL, decide, carry the actions out in order (`actions`: each may
//! take time and fail), publish the member key, and go again at once if
//! anything changed.

use mainstay_core::decide::Action;
use mainstay_core::{ClusterView, Lsn, MemberStatus, Millis, Observation, PgRole, decide};
use std::collections::VecDeque;
use std::rc::Rc;

use crate::Plant;
use crate::actions::Effect;
use crate::driver::Sim;
use crate::faults::Fault;

#[derive(Default)]
pub(crate) struct Ha {
    /// True time of the next turn when nothing wakes the loop.
    pub(crate) next_turn: u64,
    /// A wake-up (watch event, keeper) arrives then.
    pub(crate) woken_at: Option<u64>,
    /// A slow read of the DCS answers then.
    reading: Option<(u64, Option<Rc<ClusterView>>)>,
    pub(crate) acting: Option<Turn>,
    burst: u32,
}

impl Ha {
    pub(crate) fn busy(&self) -> bool {
        self.reading.is_some() || self.acting.is_some()
    }
}

pub(crate) struct Turn {
    pub(crate) view: Option<Rc<ClusterView>>,
    pub(crate) lease: Option<i64>,
    queue: VecDeque<Action>,
    pub(crate) current: Option<(u64, Effect)>,
    changed: bool,
}

impl Sim {
    /// One step of every HA loop.
    pub(crate) fn run_loops(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].agent_runs(self.now) {
                self.loop_step(i);
            }
        }
    }

    fn loop_step(&mut self, i: usize) {
        for _ in 0..40 {
            let now = self.now;
            let ha = &mut self.nodes[i].ha;
            if let Some((until, _)) = &ha.reading {
                if now < *until {
                    return;
                }
                let (_, view) = ha.reading.take().expect("reading");
                self.decide_turn(i, view);
                continue;
            }
            if let Some(turn) = &mut ha.acting {
                if let Some((until, _)) = &turn.current {
                    if now < *until {
                        return;
                    }
                    let (_, effect) = turn.current.take().expect("current");
                    match self.complete(i, effect) {
                        Ok(()) => {}
                        Err(why) => self.turn_failed(i, why),
                    }
                    continue;
                }
                match turn.queue.pop_front() {
                    Some(action) => self.begin_action(i, action),
                    None => self.end_turn(i),
                }
                continue;
            }
            let woken = ha.woken_at.is_some_and(|at| at <= now);
            if !woken && now < ha.next_turn {
                ha.burst = 0;
                return;
            }
            if ha.burst >= 6 {
                // The agent calls again at once, but the simulator moves on.
                ha.burst = 0;
                return;
            }
            ha.burst += 1;
            ha.woken_at = None;
            self.start_turn(i);
        }
    }

    fn start_turn(&mut self, i: usize) {
        let now = self.now;
        let reachable = self.nodes[i].dcs_link(now) && self.dcs.up(now);
        let slow = self.faults_on && self.plan.stale_views;
        if !reachable {
            let wait = if slow {
                self.rng.below(self.timing.dcs_timeout)
            } else {
                0
            };
            self.nodes[i].ha.reading = Some((now + wait, None));
            return;
        }
        // Reads are linearizable: the view is etcd's state when the read
        // was served; a slow answer makes it stale by the time it is used.
        let view = self.dcs.view();
        let latency = if slow && self.rng.chance(300_000) {
            self.count(Fault::StaleView);
            self.rng.below(self.timing.dcs_timeout * 3 / 2)
        } else {
            0
        };
        let view = (latency < self.timing.dcs_timeout).then_some(view);
        self.nodes[i].ha.reading = Some((now + latency.min(self.timing.dcs_timeout), view));
    }

    fn decide_turn(&mut self, i: usize, view: Option<Rc<ClusterView>>) {
        let now = self.now;
        let local = self.nodes[i].local(now);
        let mut pg = self.nodes[i].local_pg();
        if pg.role == PgRole::Primary {
            pg.standbys = self.standbys_of(i);
        }
        // The probe tells the fencer whether the server may write.
        self.nodes[i].fencer.writable = pg.role == PgRole::Primary;
        let seen = self.doctored(i, view.as_ref());
        self.update_failsafe_peers(i, seen.as_deref(), &pg);
        let node = &self.nodes[i];
        let lease = node.lease;
        let contact = node.failsafe_contact.clone();
        let obs = Observation {
            now: Millis(local),
            name: &node.name,
            tags: &node.tags,
            settings: &self.settings,
            pg: &pg,
            cluster: seen.as_deref(),
            lease,
            config: &self.config,
            wall_secs: now / 1000,
            failsafe_contact: contact.as_ref().map(|(l, at)| (l.as_str(), Millis(*at))),
        };
        let mut core = node.core.clone();
        let decision = decide(&mut core, &obs);
        let node = &mut self.nodes[i];
        node.core = core;
        if let Some(leader) = view.as_ref().and_then(|v| v.leader.as_ref()) {
            node.saw_leader_revision = node.saw_leader_revision.max(leader.mod_revision);
        }
        node.last_view = view.clone();
        node.dcs_reachable = view.is_some();
        let next = local + self.timing.loop_wait;
        let wake = decision
            .wake_at
            .map_or(next, |at| at.0.clamp(local + 1, next));
        node.ha.next_turn = node.clock.true_at(wake);
        self.log(|| {
            format!(
                "{}: {} -> {:?}",
                self.nodes[i].name, decision.note, decision.actions
            )
        });
        self.nodes[i].ha.acting = Some(Turn {
            view,
            lease: lease.id,
            queue: decision.actions.into(),
            current: None,
            changed: false,
        });
    }

    /// The planted bug: one node is shown a `sync` key that names it.
    fn doctored(&self, i: usize, view: Option<&Rc<ClusterView>>) -> Option<Rc<ClusterView>> {
        let view = view?;
        if self.plant != Plant::DoctoredSync || i != self.nodes.len() - 1 {
            return Some(view.clone());
        }
        let me = &self.nodes[i].name;
        let mut doctored = (**view).clone();
        if let Some(Ok(state)) = doctored.sync.as_mut().map(|r| r.state.as_mut())
            && state.leader != *me
            && !state.members.contains(me)
        {
            state.members.push(me.clone());
        }
        Some(Rc::new(doctored))
    }

    /// Exactly the members recorded in the failsafe key, while this node
    /// leads with a running primary (agent.rs `update_failsafe_peers`).
    fn update_failsafe_peers(
        &mut self,
        i: usize,
        view: Option<&ClusterView>,
        pg: &mainstay_core::decide::LocalPg,
    ) {
        let Some(view) = view else { return };
        let node = &self.nodes[i];
        let lease = node.lease.id;
        let leading = view
            .leader
            .as_ref()
            .is_some_and(|l| l.name == node.name && Some(l.lease_id) == lease);
        let recorded = view
            .failsafe
            .as_ref()
            .and_then(|r| r.state.as_ref().ok())
            .filter(|f| f.leader == node.name);
        let peers = (self.config.failsafe_mode && leading && pg.accepts_writes())
            .then_some(recorded)
            .flatten()
            .map(|recorded| {
                (
                    lease.unwrap_or_default(),
                    recorded
                        .members
                        .keys()
                        .filter(|n| **n != node.name)
                        .cloned()
                        .collect(),
                )
            });
        self.nodes[i].failsafe_peers = peers;
    }

    fn turn_failed(&mut self, i: usize, why: String) {
        self.log(|| format!("{}: action failed: {why}", self.nodes[i].name));
        if let Some(turn) = &mut self.nodes[i].ha.acting {
            turn.queue.clear();
            turn.changed = false;
        }
    }

    fn begin_action(&mut self, i: usize, action: Action) {
        let changes = action.changes_state();
        match self.begin(i, &action) {
            Ok(None) => {
                if let Some(turn) = &mut self.nodes[i].ha.acting {
                    turn.changed |= changes;
                }
            }
            Ok(Some((until, effect))) => {
                if let Some(turn) = &mut self.nodes[i].ha.acting {
                    turn.changed |= changes;
                    turn.current = Some((until, effect));
                }
            }
            Err(why) => self.turn_failed(i, why),
        }
    }

    fn end_turn(&mut self, i: usize) {
        let turn = self.nodes[i].ha.acting.take().expect("a turn");
        if let Some(view) = &turn.view {
            self.publish(i, view, turn.lease);
        }
        if turn.changed {
            self.nodes[i].ha.woken_at = Some(self.now);
        }
    }

    /// The member key, written when the status changed (or the key is
    /// missing or on another lease), or once a loop without a leader.
    pub(crate) fn publish(&mut self, i: usize, view: &ClusterView, lease: Option<i64>) {
        let now = self.now;
        let node = &self.nodes[i];
        if !node.dcs_link(now) || !self.dcs.up(now) {
            return;
        }
        let Some(lease) = lease.filter(|id| self.dcs.lease_exists(*id)) else {
            return;
        };
        let lsn = Lsn(node.data.as_ref().map_or(0, |w| w.end));
        let role = node.local_pg().role;
        let status = MemberStatus {
            name: node.name.clone(),
            role,
            state: "running".into(),
            api_url: format!("http://{}:8008", node.name),
            pg_host: String::new(),
            pg_port: 0,
            timeline: node.data.as_ref().map_or(0, |w| w.timeline),
            received_lsn: lsn,
            replayed_lsn: lsn,
            flush_lsn: lsn,
            following: (role == PgRole::Replica)
                .then(|| node.following.clone())
                .flatten(),
            streaming: node.streaming,
            tags: node.tags.clone(),
            version: String::new(),
            view_revision: view.revision,
            view_had_leader: view.leader.is_some(),
            vip: None,
            warning: None,
            services: Default::default(),
            files: Default::default(),
            alerts: Vec::new(),
            witness: false,
            pending_restart: Vec::new(),
            data_timeline: node
                .data
                .as_ref()
                .map_or(0, |w| w.timeline.max(w.newest_history)),
            custom_tags: Default::default(),
        };
        let published = view.members.get(&node.name).is_some_and(|record| {
            record.lease_id == lease
                && MemberStatus {
                    view_revision: status.view_revision,
                    ..record.status.clone()
                } == status
        });
        let wrote_lately = node
            .published
            .as_ref()
            .is_some_and(|(_, at)| now < at + self.timing.loop_wait);
        if published && (view.leader.is_some() || wrote_lately) {
            return;
        }
        let revision = self.dcs.bump();
        self.dcs
            .members
            .insert(node.name.clone(), (status.clone(), lease, revision));
        self.nodes[i].published = Some((status, now));
        self.wake_for_members();
    }
}
