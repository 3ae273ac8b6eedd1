//! Whether PostgreSQL's account can reach and own its data directory,
//! from the permission bits alone (pure; ACLs are not read). PostgreSQL
//! runs with the account's user and the groups it gets: its primary group
//! only when a root agent switches to it (supplementary groups are
//! dropped), the agent's own groups otherwise. A root agent creates the
//! data directory and what goes beside it itself and gives them to the
//! account, so only the way through the parents matters then.
//! A data directory under a 0700 parent made every bootstrap fail with
//! "Permission denied" deep in a log; this says so before anything starts.

use super::{Finding, Severity};
use std::path::{Path, PathBuf};

/// Owner, group and mode of a path (`None`: it does not exist).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub is_dir: bool,
}

/// The account PostgreSQL runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    /// Every group it runs with (the primary one first).
    pub groups: Vec<u32>,
    /// The agent runs as root and switches to the account: it makes the
    /// data directory, the socket directory and the log itself.
    pub agent_is_root: bool,
}

const WRITE: u32 = 2;
const SEARCH: u32 = 1;

fn allows(meta: &Meta, account: &Account, bits: u32) -> bool {
    if account.uid == 0 {
        return true;
    }
    let class = if meta.uid == account.uid {
        meta.mode >> 6
    } else if account.groups.contains(&meta.gid) {
        meta.mode >> 3
    } else {
        meta.mode
    } & 7;
    class & bits == bits
}

fn describe(path: &Path, meta: &Meta) -> String {
    format!(
        "{} (mode {:04o}, owner uid {}, group gid {})",
        path.display(),
        meta.mode & 0o7777,
        meta.uid,
        meta.gid
    )
}

/// What stands between `account` and `data_dir`; one `Ok` finding when
/// nothing does. `stat` looks a path up.
pub fn data_dir(
    account: &Account,
    data_dir: &Path,
    stat: impl Fn(&Path) -> Option<Meta>,
) -> Vec<Finding> {
    let blocking = |what: String, why: &str, fix: String| {
        vec![Finding::new(Severity::Blocking, "data_dir", what, why, fix)]
    };
    let mut ancestors: Vec<PathBuf> = data_dir
        .ancestors()
        .skip(1)
        .map(Path::to_path_buf)
        .collect();
    ancestors.reverse();
    for dir in &ancestors {
        let Some(meta) = stat(dir) else {
            break;
        };
        if !allows(&meta, account, SEARCH) {
            return blocking(
                format!(
                    "{} does not let {} (uid {}) through to {}",
                    describe(dir, &meta),
                    account.name,
                    account.uid,
                    data_dir.display()
                ),
                "PostgreSQL runs as that account and must reach its data directory: every \
                 initdb, start and clone would fail with \"Permission denied\"",
                format!(
                    "chmod o+x {} (or a+x), or put the data directory elsewhere, e.g. \
                     /var/lib/mainstay/data",
                    dir.display()
                ),
            );
        }
    }
    let parent = data_dir.parent().unwrap_or(Path::new("/"));
    match stat(parent) {
        None if account.agent_is_root => {
            return vec![Finding::ok(
                "data_dir",
                format!(
                    "{} and {} will be created",
                    parent.display(),
                    data_dir.display()
                ),
            )];
        }
        None => {
            return blocking(
                format!("{} does not exist", parent.display()),
                "the data directory's parent holds it and, beside it, PostgreSQL's socket, \
                 log and password file, which the agent (running as the account) writes",
                format!(
                    "mkdir -p {p} && chown {a}: {p}",
                    p = parent.display(),
                    a = account.name
                ),
            );
        }
        Some(meta) if !account.agent_is_root && !allows(&meta, account, WRITE | SEARCH) => {
            return blocking(
                format!(
                    "{} is not writable by {}",
                    describe(parent, &meta),
                    account.name
                ),
                "the agent runs as that account: it writes PostgreSQL's socket, log and \
                 password file beside the data directory, and initdb and clones create the \
                 directory there",
                format!("chown {}: {}", account.name, parent.display()),
            );
        }
        Some(_) => {}
    }
    let initialized = stat(&data_dir.join("PG_VERSION")).is_some();
    match stat(data_dir) {
        None => vec![Finding::ok(
            "data_dir",
            format!(
                "{} will be created; {} can reach it",
                data_dir.display(),
                account.name
            ),
        )],
        Some(meta) if !meta.is_dir => blocking(
            format!("{} exists and is not a directory", data_dir.display()),
            "PostgreSQL's data directory must be a directory",
            "move the file aside, or set postgresql.data_dir to another path".into(),
        ),
        // An empty (or half-made) directory a root agent fixes itself.
        Some(_) if !initialized && account.agent_is_root => vec![Finding::ok(
            "data_dir",
            format!(
                "{} is not initialized yet; the agent gives it to {}",
                data_dir.display(),
                account.name
            ),
        )],
        Some(meta) if meta.uid != account.uid => blocking(
            format!(
                "{} is not owned by {} (uid {})",
                describe(data_dir, &meta),
                account.name,
                account.uid
            ),
            "PostgreSQL refuses to start on a data directory it does not own",
            format!("chown -R {}: {}", account.name, data_dir.display()),
        ),
        // PostgreSQL's own rule: no write for the group, nothing for others.
        Some(meta) if initialized && meta.mode & 0o027 != 0 => blocking(
            format!("{} is open to others", describe(data_dir, &meta)),
            "PostgreSQL refuses to start on a data directory its group may write or others \
             may enter (it wants 0700 or 0750)",
            format!("chmod 0700 {}", data_dir.display()),
        ),
        Some(_) => vec![Finding::ok(
            "data_dir",
            format!(
                "{} is owned by {} and reachable",
                data_dir.display(),
                account.name
            ),
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn postgres() -> Account {
        Account {
            name: "postgres".into(),
            uid: 106,
            groups: vec![112],
            agent_is_root: true,
        }
    }

    fn dir(uid: u32, gid: u32, mode: u32) -> Meta {
        Meta {
            uid,
            gid,
            mode,
            is_dir: true,
        }
    }

    fn check(tree: &[(&str, Meta)], data_dir: &str) -> Vec<Finding> {
        check_as(&postgres(), tree, data_dir)
    }

    fn check_as(account: &Account, tree: &[(&str, Meta)], data_dir: &str) -> Vec<Finding> {
        let tree: HashMap<PathBuf, Meta> =
            tree.iter().map(|(p, m)| (PathBuf::from(p), *m)).collect();
        super::data_dir(account, Path::new(data_dir), |p| tree.get(p).copied())
    }

    /// The agent itself runs as postgres (no switch).
    fn agent_as_postgres() -> Account {
        Account {
            agent_is_root: false,
            groups: vec![112, 200],
            ..postgres()
        }
    }

    #[test]
    fn a_0700_parent_owned_by_root_blocks_with_the_fix() {
        let found = check(
            &[
                ("/", dir(0, 0, 0o755)),
                ("/root", dir(0, 0, 0o700)),
                ("/root/demo", dir(106, 112, 0o755)),
            ],
            "/root/demo/data",
        );
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].severity, Severity::Blocking);
        assert!(found[0].what.contains("/root (mode 0700"), "{:?}", found[0]);
        assert!(found[0].fix.contains("chmod o+x /root"), "{:?}", found[0]);
    }

    #[test]
    fn the_group_counts_and_the_owner_class_wins() {
        // Through the group: allowed.
        let found = check(
            &[
                ("/", dir(0, 0, 0o755)),
                ("/srv", dir(0, 112, 0o710)),
                ("/srv/pg", dir(106, 112, 0o700)),
            ],
            "/srv/pg/data",
        );
        assert_eq!(found[0].severity, Severity::Ok, "{found:?}");
        // The owner's own bits deny even when others' allow.
        let found = check(
            &[
                ("/", dir(0, 0, 0o755)),
                ("/srv", dir(106, 0, 0o077)),
                ("/srv/pg", dir(106, 112, 0o700)),
            ],
            "/srv/pg/data",
        );
        assert_eq!(found[0].severity, Severity::Blocking, "{found:?}");
    }

    #[test]
    fn a_root_agent_makes_what_is_missing_and_fixes_an_empty_directory() {
        let base = [("/", dir(0, 0, 0o755)), ("/var", dir(0, 0, 0o755))];
        let mut tree = base.to_vec();
        tree.push(("/var/lib", dir(0, 0, 0o755)));
        // A root-owned parent: the agent makes the directory and gives it.
        assert_eq!(check(&tree, "/var/lib/data")[0].severity, Severity::Ok);
        assert_eq!(check(&base, "/var/missing/data")[0].severity, Severity::Ok);
        // An empty mount point owned by root: fixed by the agent.
        tree.push(("/var/lib/data", dir(0, 0, 0o755)));
        assert_eq!(check(&tree, "/var/lib/data")[0].severity, Severity::Ok);
        // Initialized, it must be PostgreSQL's and closed to others.
        tree.push(("/var/lib/data/PG_VERSION", dir(0, 0, 0o600)));
        let found = check(&tree, "/var/lib/data");
        assert!(found[0].fix.starts_with("chown -R postgres:"), "{found:?}");
        let mut tree = base.to_vec();
        tree.push(("/var/pg", dir(0, 0, 0o755)));
        tree.push(("/var/pg/data", dir(106, 112, 0o755)));
        tree.push(("/var/pg/data/PG_VERSION", dir(106, 112, 0o600)));
        let found = check(&tree, "/var/pg/data");
        assert_eq!(found[0].fix, "chmod 0700 /var/pg/data");
        for accepted in [0o700, 0o710, 0o740, 0o750] {
            tree[3] = ("/var/pg/data", dir(106, 112, accepted));
            assert_eq!(
                check(&tree, "/var/pg/data")[0].severity,
                Severity::Ok,
                "{accepted:o}"
            );
        }
    }

    #[test]
    fn an_agent_running_as_postgres_needs_the_parent_and_counts_its_groups() {
        let me = agent_as_postgres();
        let base = [("/", dir(0, 0, 0o755)), ("/var", dir(0, 0, 0o755))];
        let mut tree = base.to_vec();
        tree.push(("/var/lib", dir(0, 0, 0o755)));
        let found = check_as(&me, &tree, "/var/lib/data");
        assert!(
            found[0].what.contains("not writable by postgres"),
            "{found:?}"
        );
        assert_eq!(found[0].fix, "chown postgres: /var/lib");
        // Through a supplementary group the agent has: writable.
        tree[2] = ("/var/lib", dir(0, 200, 0o775));
        assert_eq!(
            check_as(&me, &tree, "/var/lib/data")[0].severity,
            Severity::Ok
        );
        let found = check_as(&me, &base, "/var/missing/data");
        assert!(
            found[0].what.contains("/var/missing does not exist"),
            "{found:?}"
        );
        // Not initialized but not its own: it cannot fix that itself.
        tree.push(("/var/lib/data", dir(0, 0, 0o700)));
        assert_eq!(
            check_as(&me, &tree, "/var/lib/data")[0].severity,
            Severity::Blocking
        );
    }
}
