use super::*;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    init: InitArgs,
}

fn args(dir: &Path, extra: &[&str]) -> InitArgs {
    let dir = dir.display().to_string();
    let mut all = vec![
        "init".to_string(),
        "--config-dir".into(),
        format!("{dir}/etc"),
        "--data-root".into(),
        format!("{dir}/var"),
        "--unit-dir".into(),
        format!("{dir}/units"),
        // Whatever this machine has installed: init writes its own unit.
        "--packaged-unit-dir".into(),
        format!("{dir}/no-package"),
    ];
    all.extend(extra.iter().map(|s| s.to_string()));
    Cli::parse_from(all).init
}

const NOW: u64 = 1_800_000_000;

fn first(dir: &Path) -> Result<String, String> {
    init(
        &args(
            dir,
            &[
                "--cluster",
                "ship",
                "--name",
                "node1",
                "--address",
                "127.0.0.1",
                "--peer",
                "node2=10.9.9.2",
                "--witness",
                "bridge=10.9.9.3",
            ],
        ),
        NOW,
    )
}

fn token_of(report: &str) -> String {
    let line = report.lines().find(|l| l.starts_with("TOKEN='")).unwrap();
    line.trim_start_matches("TOKEN='")
        .trim_end_matches('\'')
        .to_string()
}

#[test]
fn the_first_node_writes_a_configuration_the_agent_loads_and_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let report = first(dir.path()).unwrap();
    let config = dir.path().join("etc/mainstay.toml");
    // Loaded by init itself already; the secrets are not in the report
    // except inside the token.
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("member = true") && text.contains("https://127.0.0.1:2380"));
    assert!(
        text.contains("\"bridge\" = \"https://10.9.9.3:2380\""),
        "{text}"
    );
    assert!(dir.path().join("units/mainstay.service").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("etc/tls/node-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let token = Token::decode(&token_of(&report), NOW).unwrap();
    assert_eq!(token.members.len(), 3);
    assert!(token.member("bridge").unwrap().witness);
    assert!(
        report.contains("on node2: mainstay init --name node2 --join \"$TOKEN\""),
        "{report}"
    );
    // Another token from the node's files, later.
    let again = new_token_from(&dir.path().join("etc"), NOW + 100_000).unwrap();
    assert_eq!(
        Token::decode(&again, NOW + 100_000).unwrap().cluster,
        "ship"
    );
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let untouched = |dir: &Path| assert!(!dir.join("etc").exists(), "something was written");
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--cluster",
                "ship",
                "--name",
                "node1",
                "--address",
                "127.0.0.1",
                "--peer",
                "node2=10.9.9.2",
            ],
            "even number",
        ),
        (
            &[
                "--cluster",
                "ship",
                "--name",
                "node1",
                "--address",
                "10.9.9.1",
                "--witness",
                "w=10.9.9.3",
                "--peer",
                "n2=10.9.9.2",
            ],
            "not an address of this host",
        ),
        (
            &[
                "--cluster",
                "ship",
                "--name",
                "node1",
                "--address",
                "127.0.0.1",
                "--peer",
                "node2",
            ],
            "NAME=ADDRESS",
        ),
        (
            &[
                "--cluster",
                "ship",
                "--name",
                "node1",
                "--address",
                "127.0.0.1",
                "--peer",
                "node1=10.9.9.2",
                "--witness",
                "w=10.9.9.3",
            ],
            "share a name",
        ),
        (
            &[
                "--cluster",
                "a b",
                "--name",
                "node1",
                "--address",
                "127.0.0.1",
            ],
            "not a valid name",
        ),
        (&["--cluster", "ship", "--name", "node1"], "--address"),
        (&["--name", "node1"], "say which"),
        (
            &["--join", "nonsense", "--name", "node2"],
            "not a mainstay join token",
        ),
        (
            &[
                "--cluster",
                "ship",
                "--name",
                "node1",
                "--address",
                "127.0.0.1",
                "--vip",
                "10.0.0.50",
                "--vip-interface",
                "eth0",
            ],
            "--vip",
        ),
    ];
    for (extra, needle) in cases {
        let err = init(&args(dir.path(), extra), NOW).unwrap_err();
        assert!(err.contains(needle), "{extra:?}: {err}");
        untouched(dir.path());
    }
}

#[test]
fn a_joining_node_checks_the_token_and_an_existing_configuration_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_of(&first(dir.path()).unwrap());
    let other = tempfile::tempdir().unwrap();
    let join = |extra: &[&str], now| {
        let mut all = vec!["--join", token.as_str()];
        all.extend_from_slice(extra);
        init(&args(other.path(), &all), now)
    };
    // node2's address is not this host's; the token expires; another
    // cluster's token; a name the token does not know; flags of the first.
    assert!(
        join(&["--name", "node2"], NOW)
            .unwrap_err()
            .contains("not an address of this host")
    );
    assert!(
        join(&["--name", "node2"], NOW + token::LIFETIME_SECS + 60)
            .unwrap_err()
            .contains("expired")
    );
    assert!(
        join(&["--name", "node2", "--cluster", "other"], NOW)
            .unwrap_err()
            .contains("for cluster ship, not other")
    );
    assert!(
        join(&["--name", "node9"], NOW)
            .unwrap_err()
            .contains("has no node \"node9\"")
    );
    assert!(
        join(&["--name", "node2", "--peer", "x=1.2.3.4"], NOW)
            .unwrap_err()
            .contains("first node's")
    );
    assert!(!other.path().join("etc").exists());

    // Init again on the first node: refused, then replaced with a kept copy.
    let again = first(dir.path()).unwrap_err();
    assert!(
        again.contains("exists") && again.contains("--force"),
        "{again}"
    );
    let before = std::fs::read_to_string(dir.path().join("etc/mainstay.toml")).unwrap();
    let mut forced = args(
        dir.path(),
        &[
            "--cluster",
            "ship",
            "--name",
            "node1",
            "--address",
            "127.0.0.1",
            "--peer",
            "node2=10.9.9.2",
            "--witness",
            "bridge=10.9.9.3",
            "--force",
        ],
    );
    forced.force = true;
    let report = init(&forced, NOW + 5).unwrap();
    assert!(
        report.contains("kept the previous configuration"),
        "{report}"
    );
    let kept = dir.path().join(format!("etc/mainstay.toml.{}", NOW + 5));
    assert_eq!(std::fs::read_to_string(kept).unwrap(), before);
}

/// The units the Debian package installs are init's, for the package's
/// account: one source of truth. `MAINSTAY_BLESS=1` rewrites them.
#[test]
fn the_packaged_units_are_the_ones_init_renders_for_the_package_account() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/systemd");
    for (file, witness) in [
        ("mainstay.service", false),
        ("mainstay-witness.service", true),
    ] {
        let rendered = crate::render::unit(
            Path::new("/usr/bin/mainstay"),
            Path::new("/etc/mainstay/mainstay.toml"),
            witness,
            Some(crate::PACKAGE_ACCOUNT),
        );
        let path = root.join(file);
        if std::env::var_os("MAINSTAY_BLESS").is_some() {
            std::fs::write(&path, &rendered).unwrap();
        }
        let packaged = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            packaged,
            rendered,
            "{} differs from init's unit: MAINSTAY_BLESS=1 cargo test -p mainstay-init rewrites it",
            path.display()
        );
    }
}
