//! Tests that cannot run on this machine (not root, a tool missing) must not
//! pass in silence: a green run would then claim what nobody checked. A test
//! that cannot run calls [`skip`] and returns; `skip` says why, records it
//! for `scripts/test.sh`, and fails the test unless skipping was allowed with
//! `MAINSTAY_ALLOW_SKIP=1`.

use std::io::Write;
use std::path::Path;

/// Set to `1` to let tests that cannot run here pass after saying why.
pub const ALLOW_SKIP_ENV: &str = "MAINSTAY_ALLOW_SKIP";

/// A file each skip appends one line to (`<test>: <why>`), when set.
pub const SKIP_LOG_ENV: &str = "MAINSTAY_SKIP_LOG";

/// Whether `MAINSTAY_ALLOW_SKIP=1` is set.
pub fn skipping_allowed() -> bool {
    std::env::var(ALLOW_SKIP_ENV).is_ok_and(|v| v == "1")
}

/// Called by a test that cannot run here, which returns right after: prints
/// `SKIPPED: {why}` to standard error, appends `<test>: {why}` to the file
/// named by `MAINSTAY_SKIP_LOG` if set, and panics (failing the test) unless
/// `MAINSTAY_ALLOW_SKIP=1`.
pub fn skip(why: &str) {
    let log = std::env::var_os(SKIP_LOG_ENV).filter(|path| !path.is_empty());
    record(
        &test_name(),
        why,
        log.as_deref().map(Path::new),
        skipping_allowed(),
    );
}

/// [`skip`] with its environment passed in.
fn record(test: &str, why: &str, log: Option<&Path>, allowed: bool) {
    // One line per skip, whatever the reason contains.
    let why = why.replace(['\n', '\r'], " ");
    eprintln!("SKIPPED: {why}");
    if let Some(path) = log {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            // One write per line: O_APPEND keeps concurrent lines whole.
            .and_then(|mut file| file.write_all(format!("{test}: {why}\n").as_bytes()));
        if let Err(err) = appended {
            eprintln!(
                "cannot record the skip in {SKIP_LOG_ENV}={}: {err}",
                path.display()
            );
        }
    }
    if !allowed {
        panic!("{test} cannot run here: {why}; set {ALLOW_SKIP_ENV}=1 to allow skipping");
    }
}

/// The test binary (without cargo's hash suffix) and, when the test runs on
/// a thread of its own as libtest's do, the thread's name: the test's name.
fn test_name() -> String {
    let binary = std::env::args_os()
        .next()
        .and_then(|arg0| {
            Path::new(&arg0)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .map(|name| strip_hash(&name).to_string())
        .unwrap_or_else(|| "test".into());
    match std::thread::current().name() {
        Some(thread) if thread != "main" => format!("{binary}::{thread}"),
        _ => binary,
    }
}

/// `vip-0123456789abcdef` -> `vip`.
fn strip_hash(binary: &str) -> &str {
    match binary.rsplit_once('-') {
        Some((stem, hash))
            if !stem.is_empty()
                && hash.len() == 16
                && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            stem
        }
        _ => binary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_allowed_skip_is_logged_one_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("skips");
        record("vip::a", "needs root", Some(&log), true);
        record("faults", "no `ip`\ncommand", Some(&log), true);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "vip::a: needs root\nfaults: no `ip` command\n"
        );
    }

    #[test]
    fn a_skip_fails_the_test_unless_allowed_and_is_still_logged() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("skips");
        let panic =
            std::panic::catch_unwind(|| record("pg::t", "no PostgreSQL", Some(&log), false))
                .expect_err("a skip that is not allowed fails");
        let message = panic.downcast_ref::<String>().unwrap();
        assert_eq!(
            message,
            "pg::t cannot run here: no PostgreSQL; set MAINSTAY_ALLOW_SKIP=1 to allow skipping"
        );
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "pg::t: no PostgreSQL\n"
        );
        // Without a log it still fails.
        assert!(std::panic::catch_unwind(|| record("pg::t", "x", None, false)).is_err());
    }

    #[test]
    fn the_test_name_drops_cargos_hash() {
        assert_eq!(strip_hash("vip-0123456789abcdef"), "vip");
        assert_eq!(
            strip_hash("mainstay_testkit-c0ffee00c0ffee00"),
            "mainstay_testkit"
        );
        assert_eq!(strip_hash("faults"), "faults");
        assert_eq!(strip_hash("my-test"), "my-test");
        // libtest runs each test on a thread named after it.
        assert!(test_name().ends_with("::tests::the_test_name_drops_cargos_hash"));
    }
}
