//! Moving running agents to a new binary without stopping PostgreSQL:
//! SIGHUP (`systemctl reload mainstay`, which the Debian package's
//! upgrade sends) re-executes the agent in place, handing its postmaster's
//! fencing guard and its lease to the new image. Against real etcd and
//! PostgreSQL: the leader keeps its key, its lease and its timeline, every
//! postmaster keeps its pid, and writes straight to the primary go on.

#![forbid(unsafe_code)]

mod common;

use common::*;
use std::time::{Duration, Instant};

/// Waits until `node`'s log, past `from`, has `line`.
async fn logged(h: &Harness, node: &str, from: usize, line: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let log = h.agent_log(node);
        if log.get(from..).is_some_and(|tail| tail.contains(line)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node} did not log {line:?} within {timeout:?}: {}",
            log.get(from..).unwrap_or("")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops the writer: every acknowledged write is on the leader, and
/// writes since `since` never paused for a second. Their number and the
/// longest pause.
async fn writes_went_on(
    h: &Harness,
    writer: AckWriter,
    leader: &str,
    since: Instant,
) -> (usize, Duration) {
    let log = writer.finish().await;
    let during: Vec<&Ack> = log.acked.iter().filter(|a| a.at >= since).collect();
    let longest = during
        .windows(2)
        .map(|w| w[1].at - w[0].at)
        .max()
        .unwrap_or_default();
    assert!(during.len() > 10, "too few writes: {}", during.len());
    assert!(
        longest < Duration::from_secs(1),
        "writes stopped for {longest:?}"
    );
    let ids: Vec<i64> = log.acked.iter().map(|a| a.id).collect();
    assert!(missing_acked(h, leader, "acked", &ids).await.is_empty());
    (during.len(), longest)
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

#[test]
fn sighup_re_executes_the_agent_with_postgresql_running_and_no_failover() {
    cluster_test(async {
        let mut h = Harness::start("reexec", 3);
        let leader = h.healthy(Duration::from_secs(60)).await;
        let replica = h.names().into_iter().find(|n| *n != leader).unwrap();
        let writer = AckWriter::start(&h, "acked", Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = h.view().await;
        let started = Instant::now();

        for node in [&leader, &replica] {
            let i = h.cluster.node_index(node).unwrap();
            let agent = h.cluster.agent_pid(i).unwrap();
            let postmaster = h.cluster.nodes[i].postmaster_pid().unwrap();
            let from = h.agent_log(node).len();
            mainstay_sys::process::kill(agent as i32, libc::SIGHUP).unwrap();
            logged(
                &h,
                node,
                from,
                "postgres taken over from the agent this one re-executed",
                Duration::from_secs(30),
            )
            .await;
            assert!(
                cmdline(agent).contains("--handover-fd"),
                "{node}'s agent (pid {agent}) was not re-executed: {}",
                cmdline(agent)
            );
            assert_eq!(
                h.cluster.nodes[i].postmaster_pid(),
                Some(postmaster),
                "{node}'s PostgreSQL was restarted"
            );
            // Serving again, in the same role.
            let deadline = Instant::now() + Duration::from_secs(30);
            let want = if *node == leader {
                "/primary"
            } else {
                "/replica"
            };
            while h.cluster.nodes[i]
                .api()
                .get(want)
                .await
                .map(|a| a.status.as_u16())
                .ok()
                != Some(200)
            {
                assert!(
                    Instant::now() < deadline,
                    "{node} does not answer {want} 200"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        let after = h.view().await;
        assert_eq!(after.leader, before.leader, "the leader key moved");
        assert_eq!(after.history, before.history, "a new timeline");
        assert_eq!(h.healthy(Duration::from_secs(30)).await, leader);
        let (writes, longest) = writes_went_on(&h, writer, &leader, started).await;
        eprintln!("re-exec of the leader and a replica: {writes} writes, longest gap {longest:?}");

        // Two reloads in a row (two upgrades, an impatient operator): a
        // SIGHUP arriving while the agent re-executes must not find the
        // default action, which would kill it.
        let i = h.cluster.node_index(&replica).unwrap();
        let agent = h.cluster.agent_pid(i).unwrap();
        let postmaster = h.cluster.nodes[i].postmaster_pid();
        for delay in [0, 50, 150, 300] {
            mainstay_sys::process::kill(agent as i32, libc::SIGHUP).unwrap();
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            h.cluster.agent_running(i),
            "{replica}'s agent died of a SIGHUP during its re-exec"
        );
        assert_eq!(h.cluster.nodes[i].postmaster_pid(), postmaster);
        assert_eq!(h.healthy(Duration::from_secs(30)).await, leader);

        // A successor that would not start is refused: the agent goes on.
        let i = h.cluster.node_index(&replica).unwrap();
        let config = h.cluster.nodes[i].config.clone();
        let good = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, format!("{good}\nnot toml at all [[[")).unwrap();
        let agent = h.cluster.agent_pid(i).unwrap();
        let before_refusal = cmdline(agent);
        let from = h.agent_log(&replica).len();
        mainstay_sys::process::kill(agent as i32, libc::SIGHUP).unwrap();
        logged(
            &h,
            &replica,
            from,
            "re-exec refused, still running this binary",
            Duration::from_secs(30),
        )
        .await;
        std::fs::write(&config, good).unwrap();
        assert_eq!(cmdline(agent), before_refusal, "re-executed anyway");
        assert_eq!(h.healthy(Duration::from_secs(30)).await, leader);
        h.passed = true;
    });
}

/// Builds the Debian package around this test build's binary (stripped,
/// fast compression: the package's layout and scripts are under test, not
/// the release build).
fn build_deb(out: &std::path::Path, version: &str) -> std::path::PathBuf {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = std::process::Command::new(cargo)
        .args([
            "deb",
            "-p",
            "mainstay",
            "--no-build",
            "--profile",
            "dev",
            "--fast",
        ])
        .args(["--deb-version", version, "-o"])
        .arg(out)
        .current_dir(&workspace)
        .output()
        .expect("running cargo deb (scripts/setup.sh installs cargo-deb)");
    assert!(
        built.status.success(),
        "cargo deb failed (scripts/setup.sh installs cargo-deb): {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let path = out.join(format!("mainstay_{version}_amd64.deb"));
    assert!(path.exists(), "{} was not made", path.display());
    path
}

fn dpkg(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("dpkg")
        .args(args)
        .output()
        .expect("running dpkg");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Purges the package when the test ends, passed or not (its account and
/// /var/lib/mainstay stay, as on any machine).
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = dpkg(&["--purge", "mainstay"]);
    }
}

/// A line of `/proc/PID/status` (e.g. "Uid:").
fn status_line(pid: i32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .map(|l| l[key.len()..].trim().to_string())
        .unwrap_or_default()
}

fn capabilities(pid: i32, key: &str) -> u64 {
    u64::from_str_radix(&status_line(pid, key), 16).unwrap_or(u64::MAX)
}

/// One agent run as the packaged unit runs it: the `mainstay` account
/// with CAP_NET_ADMIN, CAP_NET_RAW and CAP_SYS_NICE (ambient and
/// bounding), nothing else. It bootstraps and leads; PostgreSQL runs as
/// the account without any capability; the fencing guard got its
/// real-time priority.
async fn runs_as_the_package_account() {
    const NET_ADMIN: u64 = 1 << 12;
    const NET_RAW: u64 = 1 << 13;
    const SYS_NICE: u64 = 1 << 23;
    let Ok(Some(account)) = mainstay_sys::user::by_name(c"mainstay") else {
        panic!("the package made no mainstay account");
    };
    let dir = test_dir("package-account");
    std::fs::create_dir_all(&dir).unwrap();
    let wrapper = dir.join("as-mainstay");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\n# The packaged unit's User=, AmbientCapabilities= and CapabilityBoundingSet=.\n\
         exec setpriv --reuid=mainstay --regid=mainstay --init-groups \\\n\
         --inh-caps=-all,+net_admin,+net_raw,+sys_nice --ambient-caps=+net_admin,+net_raw,+sys_nice \\\n\
         --bounding-set=-all,+net_admin,+net_raw,+sys_nice /usr/bin/mainstay \"$@\"\n",
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut cluster =
        mainstay_lab::demo::LocalCluster::prepare(&dir.join("cluster"), 1, &wrapper, "default")
            .expect("preparing the cluster");
    // The node's directory is the account's, as init makes /var/lib/mainstay.
    let node_dir = cluster.nodes[0].dir.clone();
    for path in [&node_dir, &cluster.nodes[0].config] {
        std::os::unix::fs::chown(path, Some(account.uid), Some(account.gid)).unwrap();
    }
    cluster.start_agent(0).expect("starting the agent");
    let mut h = Harness::adopt(cluster);
    let leader = h.healthy(Duration::from_secs(60)).await;
    let agent = h.cluster.agent_pid(0).unwrap() as i32;
    let uid = account.uid.to_string();
    assert!(
        status_line(agent, "Uid:").starts_with(&uid),
        "the agent runs as {}",
        status_line(agent, "Uid:")
    );
    let wanted = NET_ADMIN | NET_RAW | SYS_NICE;
    assert_eq!(
        capabilities(agent, "CapEff:"),
        wanted,
        "the agent's capabilities"
    );
    let postmaster = h.cluster.nodes[0].postmaster_pid().unwrap();
    assert!(
        status_line(postmaster, "Uid:").starts_with(&uid),
        "PostgreSQL runs as {}",
        status_line(postmaster, "Uid:")
    );
    for key in ["CapEff:", "CapPrm:", "CapAmb:"] {
        assert_eq!(
            capabilities(postmaster, key),
            0,
            "PostgreSQL kept capabilities ({key})"
        );
    }
    let guard = mainstay_testkit::crash::parent_of(postmaster).unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{guard}/stat")).unwrap();
    let policy = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(38))
        .and_then(|p| p.parse::<u32>().ok());
    assert_eq!(policy, Some(1), "the guard is not SCHED_FIFO: {stat}");
    let client = h.client(&leader).await;
    client
        .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    h.passed = true;
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

fn inode(path: &str) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (m.dev(), m.ino())
}

#[test]
fn the_package_installs_and_an_upgrade_moves_running_agents_without_a_failover() {
    if mainstay_sys::process::geteuid() != 0 {
        mainstay_testkit::skip("installing a Debian package needs root");
        return;
    }
    let debs = tempfile::tempdir().unwrap();
    let first = build_deb(debs.path(), "0.1.0-1~test1");
    let second = build_deb(debs.path(), "0.1.0-1~test2");
    let (listed, contents) = {
        let out = std::process::Command::new("dpkg-deb")
            .args(["--info"])
            .arg(&first)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert!(listed, "{contents}");
    for needed in ["postgresql-15", "etcd-server", "adduser"] {
        assert!(
            contents.contains(needed),
            "Depends lacks {needed}: {contents}"
        );
    }

    // A machine that had the package before keeps its data root as it
    // was; a new one gets it from the package.
    let fresh = !std::path::Path::new("/var/lib/mainstay").exists();
    let (ok, said) = dpkg(&["-i", first.to_str().unwrap()]);
    let installed = Installed;
    assert!(ok, "dpkg -i failed: {said}");
    assert!(said.contains("mainstay init"), "{said}");
    let account = std::process::Command::new("getent")
        .args(["passwd", "mainstay"])
        .output()
        .unwrap();
    assert!(account.status.success(), "no mainstay account");
    if fresh {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let data = std::fs::metadata("/var/lib/mainstay").unwrap();
        let uid = String::from_utf8_lossy(&account.stdout)
            .split(':')
            .nth(2)
            .and_then(|u| u.parse::<u32>().ok())
            .unwrap();
        assert_eq!(data.uid(), uid, "/var/lib/mainstay is not mainstay's");
        assert_eq!(data.permissions().mode() & 0o777, 0o750);
        assert!(std::path::Path::new("/etc/mainstay").is_dir());
    }
    for unit in ["mainstay.service", "mainstay-witness.service"] {
        let path = format!("/lib/systemd/system/{unit}");
        let verified = std::process::Command::new("systemd-analyze")
            .args(["verify", &path])
            .output()
            .expect("systemd-analyze (scripts/setup.sh installs systemd)");
        assert!(
            verified.status.success(),
            "systemd-analyze verify {path}: {}",
            String::from_utf8_lossy(&verified.stderr)
        );
    }

    // The packaged unit's account and capabilities, as systemd would give
    // them, then three agents of the installed binary and the upgrade.
    cluster_test(async {
        runs_as_the_package_account().await;
        let dir = test_dir("package");
        let cluster = mainstay_lab::demo::LocalCluster::start(
            &dir,
            3,
            std::path::Path::new("/usr/bin/mainstay"),
            "default",
        )
        .expect("starting the cluster");
        let mut h = Harness::adopt(cluster);
        let leader = h.healthy(Duration::from_secs(60)).await;
        let writer = AckWriter::start(&h, "acked", Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = h.view().await;
        let agents: Vec<u32> = (0..3).map(|i| h.cluster.agent_pid(i).unwrap()).collect();
        let postmasters: Vec<Option<i32>> =
            h.cluster.nodes.iter().map(|n| n.postmaster_pid()).collect();
        let old_binary = inode("/usr/bin/mainstay");
        let started = Instant::now();

        let (ok, said) = dpkg(&["-i", second.to_str().unwrap()]);
        let upgrade_took = started.elapsed();
        assert!(ok, "the upgrade failed: {said}");
        let new_binary = inode("/usr/bin/mainstay");
        assert_ne!(old_binary, new_binary, "dpkg did not replace the binary");
        for (i, agent) in agents.iter().enumerate() {
            assert!(
                said.contains(&format!("pid {agent} (agent")),
                "postinst did not move agent {agent}: {said}"
            );
            assert_eq!(
                inode(&format!("/proc/{agent}/exe")),
                new_binary,
                "agent {agent} still runs the old binary"
            );
            assert_eq!(
                h.cluster.nodes[i].postmaster_pid(),
                postmasters[i],
                "{}'s PostgreSQL was restarted",
                h.cluster.nodes[i].name
            );
        }
        assert_eq!(h.healthy(Duration::from_secs(30)).await, leader);
        let after = h.view().await;
        assert_eq!(
            after.leader, before.leader,
            "the upgrade moved the leader key"
        );
        assert_eq!(after.history, before.history, "the upgrade made a timeline");
        let (writes, longest) = writes_went_on(&h, writer, &leader, started).await;
        eprintln!(
            "package upgrade with 3 agents running: dpkg -i took {upgrade_took:?}, {writes} \
             writes meanwhile, longest gap {longest:?}, no failover"
        );
        h.passed = true;
    });
    drop(installed);
    assert!(
        !std::path::Path::new("/usr/bin/mainstay").exists(),
        "purge left the binary"
    );
    assert!(
        std::path::Path::new("/var/lib/mainstay").is_dir(),
        "purge deleted the data root"
    );
}
