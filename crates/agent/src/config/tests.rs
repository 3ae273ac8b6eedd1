use super::*;

const GOOD: &str = r#"
cluster = "ship"
name = "node1"
[etcd]
endpoints = ["http://127.0.0.1:2379"]
[postgresql]
data_dir = "/var/lib/mainstay/data"
port = 5432
superuser = { username = "postgres", password = "s3cret" }
replication = { username = "replicator", password = "r3pl" }
"#;

/// Validation refuses a `bin_dir` without `postgres`, so these tests need
/// PostgreSQL 15 where the default points; without it they fail, unless
/// `MAINSTAY_ALLOW_SKIP=1` (then they return).
fn postgres_installed() -> bool {
    let ok = default_bin_dir().join("postgres").exists();
    if !ok {
        mainstay_testkit::skip(&format!(
            "needs PostgreSQL 15 in {}: run scripts/setup.sh",
            default_bin_dir().display()
        ));
    }
    ok
}

fn check(extra: &str, key: Option<&str>, needle: &str) {
    check_text(&format!("{GOOD}{extra}"), key, needle);
}

fn check_text(text: &str, key: Option<&str>, needle: &str) {
    let extra = text;
    match Config::parse(Path::new("test.toml"), text) {
        Ok(_) => panic!("accepted: {extra}"),
        Err(err) => {
            assert_eq!(err.key.as_deref(), key, "{err}");
            assert!(err.to_string().contains(needle), "{err} lacks {needle}");
        }
    }
}

#[test]
fn a_good_file_parses_with_defaults() {
    if !postgres_installed() {
        return;
    }
    let config = Config::parse(Path::new("t"), GOOD).unwrap();
    assert_eq!(config.timing, Timing::DEFAULT);
    let root = mainstay_sys::process::geteuid() == 0;
    assert_eq!(
        config.postgresql.run_as.as_deref(),
        root.then_some("postgres")
    );
    assert_eq!(config.postgresql.rewind, config.postgresql.superuser);
    assert_eq!(config.postgresql.connect_host, "127.0.0.1");
    assert_eq!(config.api.url, "http://127.0.0.1:8008");
    assert_eq!(config.proxy.replica_max_lag, 16 << 20);
    assert_eq!(config.etcd.request_timeout, Duration::from_secs(1));
    assert!(!format!("{config:?}").contains("s3cret"));
}

#[test]
fn bad_files_name_the_key() {
    if !postgres_installed() {
        return;
    }
    check("[timing]\nttl = 1\n", Some("timing.ttl"), "etcd's minimum");
    check(
        "[timing]\nttl = 4\nrenew_interval = 2\n",
        Some("timing.renew_interval"),
        "ttl/3",
    );
    check(
        "[timing]\nrenew_interval = 1\ndcs_timeout = 2\n",
        Some("timing"),
        "fencing_margin",
    );
    check("[timing]\nttl = \"4s\"\n", None, "invalid type");
    check(
        "[timing]\nttl = 9223372036854775807\n",
        Some("timing.ttl"),
        "is over 3600 s",
    );
    check(
        "[timing]\nloop_wait = inf\n",
        Some("timing.loop_wait"),
        "not a duration",
    );
    check(
        "[timing]\ndcs_timeout = -0.5\n",
        Some("timing.dcs_timeout"),
        "not a duration",
    );
    check("bogus = 1\n", None, "unknown field");
    check(
        "[tags]\npriority = \"high\"\n",
        Some("tags.priority"),
        "whole number",
    );
    check(
        "[api]\nlisten = \"nowhere\"\n",
        Some("api.listen"),
        "IP:PORT",
    );
}

#[test]
fn bad_vip_and_proxy_settings_name_the_key() {
    if !postgres_installed() {
        return;
    }
    let top = |lines: &str| format!("{lines}\n{GOOD}");
    check_text(
        &top("vip = \"10.0.0.50/24\""),
        Some("vip_interface"),
        "eth0",
    );
    check_text(&top("vip_interface = \"eth0\""), Some("vip"), "no address");
    check_text(
        &top("vip = \"10.0.0.50\"\nvip_interface = \"eth0\""),
        Some("vip"),
        "prefix length",
    );
    check(
        "[proxy]\nread_only_listen = \"everywhere\"\n",
        Some("proxy.read_only_listen"),
        "IP:PORT",
    );
    let long = GOOD.replace(
        "/var/lib/mainstay/data",
        &format!("/{}/data", "x".repeat(90)),
    );
    check_text(&long, Some("postgresql.data_dir"), "limit is 107");
    check(
        "[proxy]\nreplica_max_lag = \"lots\"\n",
        Some("proxy.replica_max_lag"),
        "16MB",
    );
    check(
        "[proxy]\nlisten = \"0.0.0.0:5000\"\nread_only_listen = \"0.0.0.0:5000\"\n",
        Some("proxy.read_only_listen"),
        "own port",
    );
    let good = top("vip = \"10.0.0.50/24\"\nvip_interface = \"eth0\"");
    let config = Config::parse(Path::new("t"), &good).unwrap();
    assert_eq!(config.vip.unwrap().cidr(), "10.0.0.50/24");
}

#[test]
fn the_watchdog_section_is_typed_with_a_timeout_from_the_timing() {
    if !postgres_installed() {
        return;
    }
    let parse = |extra: &str| Config::parse(Path::new("t"), &format!("{GOOD}{extra}")).unwrap();
    let off = parse("").watchdog;
    assert_eq!(off.mode, WatchdogMode::Off);
    assert_eq!(off.device, Path::new("/dev/watchdog"));
    // Default profile: 4 - 1 - 1 = 2 s.
    assert_eq!(off.timeout, Duration::from_secs(2));
    let required = parse("[watchdog]\nmode = \"required\"\ndevice = \"/dev/watchdog1\"\n").watchdog;
    assert_eq!(required.mode, WatchdogMode::Required);
    assert_eq!(required.timeout, Duration::from_secs(2));
    let settings = required.settings();
    assert_eq!(settings.device, Path::new("/dev/watchdog1"));
    assert_eq!(settings.timeout, Duration::from_secs(2));
    // Fast profile: 2 - 0.5 - 0.4 = 1.1, rounded down to 1 s.
    let fast = parse("[timing]\nprofile = \"fast\"\n[watchdog]\nmode = \"automatic\"\n").watchdog;
    assert_eq!(fast.mode, WatchdogMode::Automatic);
    assert_eq!(fast.timeout, Duration::from_secs(1));
    // A safety margin comes off the timeout: 4 - 1 - 1 - 0.5 = 1.5 -> 1 s.
    let margin = parse("[watchdog]\nmode = \"required\"\nsafety_margin = 0.5\n").watchdog;
    assert_eq!(margin.timeout, Duration::from_secs(1));
    assert_eq!(margin.safety_margin, Duration::from_millis(500));
    // Timing too short for a watchdog is fine while it is off.
    let short = "[timing]\nprofile = \"fast\"\ndcs_timeout = 0.6\n";
    assert_eq!(parse(short).watchdog.timeout, Duration::ZERO);
}

#[test]
fn bad_watchdog_settings_name_the_key_and_the_fix() {
    if !postgres_installed() {
        return;
    }
    check(
        "[watchdog]\nmode = \"sometimes\"\n",
        Some("watchdog.mode"),
        "\"sometimes\" is not a mode: use \"off\"",
    );
    check(
        "[watchdog]\nmode = \"on\"\n",
        Some("watchdog.mode"),
        "\"required\"",
    );
    check(
        "[watchdog]\nmode = \"automatic\"\ndevice = \"\"\n",
        Some("watchdog.device"),
        "is empty: give the watchdog's character device, e.g. \"/dev/watchdog\"",
    );
    check(
        "[watchdog]\ndevice = \"watchdog0\"\n",
        Some("watchdog.device"),
        "absolute path",
    );
    check(
        "[watchdog]\nsafety_margin = -1\n",
        Some("watchdog.safety_margin"),
        "out of range",
    );
    check(
        "[watchdog]\nsafety_margin = inf\n",
        Some("watchdog.safety_margin"),
        "out of range",
    );
    check("[watchdog]\ntimeout = 5\n", None, "unknown field");
    // ttl 2 - fencing_margin 0.5 - dcs_timeout 0.6 = 0.9 s: no 1 s watchdog fits.
    for (timing, left) in [
        (
            "[timing]\nprofile = \"fast\"\ndcs_timeout = 0.6\n",
            "0.90 s",
        ),
        ("[watchdog]\nsafety_margin = 1.5\n", "0.50 s"),
    ] {
        for mode in ["required", "automatic"] {
            let extra = if timing.contains("[watchdog]") {
                format!("{timing}mode = \"{mode}\"\n")
            } else {
                format!("{timing}[watchdog]\nmode = \"{mode}\"\n")
            };
            let text = format!("{GOOD}{extra}");
            let err = Config::parse(Path::new("t"), &text).unwrap_err();
            assert_eq!(err.key.as_deref(), Some("watchdog.mode"), "{err}");
            let message = err.to_string();
            for needle in [
                "needs a device timeout of at least 1 s",
                "timing.ttl",
                "timing.fencing_margin",
                "timing.dcs_timeout",
                left,
                "set watchdog.mode = \"off\"",
            ] {
                assert!(message.contains(needle), "{message} lacks {needle}");
            }
        }
    }
}

/// These machines have no watchdog device: `config check` is tested on
/// what it refuses, never on a real watchdog.
#[test]
fn config_check_reports_an_unusable_watchdog_by_mode() {
    if !postgres_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("watchdog");
    let regular = dir.path().join("file");
    std::fs::write(&regular, "").unwrap();
    let config = |mode: &str, device: &Path| {
        let extra = format!(
            "[watchdog]\nmode = \"{mode}\"\ndevice = \"{}\"\n",
            device.display()
        );
        Config::parse(Path::new("node.toml"), &format!("{GOOD}{extra}")).unwrap()
    };
    let file = Path::new("node.toml");
    assert!(matches!(
        config("off", &missing).check_watchdog(file),
        WatchdogCheck::Off
    ));
    let WatchdogCheck::Error(err) = config("required", &missing).check_watchdog(file) else {
        panic!("a required, missing watchdog must be an error");
    };
    assert_eq!(err.key.as_deref(), Some("watchdog.device"));
    let line = err.to_string();
    assert!(!line.contains('\n'), "one line: {line}");
    for needle in [
        "node.toml: key `watchdog.device`",
        "mode \"required\", but this node could never lead",
        missing.to_str().unwrap(),
        "modprobe softdog",
    ] {
        assert!(line.contains(needle), "{line} lacks {needle}");
    }
    let WatchdogCheck::Warning(err) = config("automatic", &regular).check_watchdog(file) else {
        panic!("an automatic, unusable watchdog must be a warning");
    };
    let line = err.to_string();
    assert!(line.contains("would lead without a watchdog"), "{line}");
    assert!(line.contains("is not a watchdog device"), "{line}");
    assert_eq!(std::fs::read(&regular).unwrap(), b"", "nothing written");
}

#[test]
fn missing_and_malformed_keys_are_refused() {
    for text in [
        "cluster = \"a\"\n",
        "cluster = \"a\" name = \"b\"",
        "name = \"b\"\ncluster = \"a\"\n[etcd]\nendpoints = []\n",
    ] {
        assert!(Config::parse(Path::new("t"), text).is_err(), "{text}");
    }
    let bad_name = GOOD.replace("\"node1\"", "\"node 1\"");
    assert_eq!(
        Config::parse(Path::new("t"), &bad_name)
            .unwrap_err()
            .key
            .as_deref(),
        Some("name")
    );
}

#[test]
fn api_client_limits_are_bounded() {
    if !postgres_installed() {
        return;
    }
    let with = |extra: &str| GOOD.replace("[postgresql]", &format!("[api]\n{extra}\n[postgresql]"));
    let config = Config::parse(
        Path::new("t"),
        &with("header_timeout = 2.5\nmax_connections = 10"),
    )
    .unwrap();
    assert_eq!(config.api.header_timeout, Duration::from_millis(2500));
    assert_eq!(config.api.max_connections, 10);
    for (extra, key) in [
        ("header_timeout = 0", "api.header_timeout"),
        ("header_timeout = 301", "api.header_timeout"),
        ("header_timeout = nan", "api.header_timeout"),
        ("max_connections = 0", "api.max_connections"),
        ("agent_check_wait = 1", "api.agent_check_wait"),
        ("agent_check_listen = \"8009\"", "api.agent_check_listen"),
        (
            "listen = \"0.0.0.0:8008\"\nagent_check_listen = \"127.0.0.1:8008\"",
            "api.agent_check_listen",
        ),
        (
            "agent_check_listen = \"127.0.0.1:8009\"\nagent_check_wait = 11",
            "api.agent_check_wait",
        ),
        (
            "agent_check_listen = \"127.0.0.1:8009\"\nagent_check_wait = nan",
            "api.agent_check_wait",
        ),
    ] {
        let refused = Config::parse(Path::new("t"), &with(extra)).unwrap_err();
        assert_eq!(refused.key.as_deref(), Some(key), "{extra}");
    }
    let config = Config::parse(
        Path::new("t"),
        &with("agent_check_listen = \"0.0.0.0:8009\""),
    )
    .unwrap();
    let agent = config.api.agent_check.expect("the agent check");
    assert_eq!(agent.listen.port(), 8009);
    assert_eq!(agent.step_down_wait, Duration::from_secs(1));
}

/// A node file with `services` appended, its data directory in `dir`.
fn with_services(dir: &Path, services: &str) -> String {
    let data = dir.join("data");
    format!(
        "{}{services}",
        GOOD.replace("/var/lib/mainstay/data", data.to_str().unwrap())
    )
}

#[test]
fn services_are_typed_in_start_order_with_defaults() {
    if !postgres_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = with_services(
        dir.path(),
        r#"
[[service]]
name = "synapse"
command = ["sh", "-c", "exec sleep 1000"]
placement = "with-leader"
depends_on = ["redis"]
on_failure = "failover"
[[service.check]]
kind = "http"
url = "http://127.0.0.1:8008/health"
[[service]]
name = "redis"
command = ["/bin/sleep", "1000"]
placement = "everywhere"
user = "root"
stop_signal = "SIGINT"
[[service.check]]
kind = "tcp"
address = "127.0.0.1:6379"
interval = 1
timeout = 0.5
"#,
    );
    let config = Config::parse(Path::new("t"), &text).unwrap();
    let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["redis", "synapse"], "dependencies first");
    let synapse = &config.services[1];
    assert!(synapse.program.is_absolute(), "sh resolved through PATH");
    assert_eq!(synapse.args, ["-c", "exec sleep 1000"]);
    assert_eq!(synapse.placement, mainstay_services::Placement::WithLeader);
    assert_eq!(synapse.on_failure, mainstay_services::OnFailure::Failover);
    assert_eq!(synapse.log.path, dir.path().join("node1.synapse.log"));
    assert_eq!(synapse.stop_signal, libc::SIGTERM);
    assert_eq!(synapse.checks[0].interval, Duration::from_secs(5));
    assert_eq!(
        synapse.checks[0].probe,
        mainstay_services::CheckProbe::Http {
            url: "http://127.0.0.1:8008/health".into(),
            status: 200
        }
    );
    let redis = &config.services[0];
    assert_eq!(redis.account.as_ref().map(|a| (a.uid, a.gid)), Some((0, 0)));
    assert_eq!(redis.stop_signal, libc::SIGINT);
    assert_eq!(redis.checks[0].timeout, Duration::from_millis(500));
}

#[test]
fn bad_services_are_refused_with_the_service_the_key_and_the_fix() {
    if !postgres_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let service = |extra: &str| {
        format!(
            "[[service]]\nname = \"web\"\ncommand = [\"/bin/sleep\", \"9\"]\nplacement = \"everywhere\"\n{extra}"
        )
    };
    for (text, key, needle) in [
        (
            "[[service]]\nname = \"web\"\nplacement = \"everywhere\"\n".to_string(),
            "service.web.command",
            "is missing or empty",
        ),
        (
            "[[service]]\nname = \"web\"\ncommand = [\"/no/such/program\"]\nplacement = \"everywhere\"\n".into(),
            "service.web.command",
            "not an executable file",
        ),
        (
            "[[service]]\nname = \"web\"\ncommand = [\"no-such-program-mainstay\"]\nplacement = \"everywhere\"\n".into(),
            "service.web.command",
            "not an executable in PATH",
        ),
        (service("user = \"no-such-user-mainstay\"\n"), "service.web.user", "create it"),
        (service("group = \"wheel\"\n"), "service.web.group", "needs a user"),
        (
            service("user = \"root\"\ngroup = \"no-such-group-mainstay\"\n"),
            "service.web.group",
            "not a group of this host",
        ),
        (
            "[[service]]\nname = \"web\"\ncommand = [\"/bin/sleep\", \"9\"]\n".into(),
            "service.web.placement",
            "is missing",
        ),
        (service("").replace("everywhere", "primary"), "service.web.placement", "with-leader"),
        (service("depends_on = [\"db\"]\n"), "service.web.depends_on", "not a service of this node"),
        (
            format!(
                "{}{}",
                service("depends_on = [\"b\"]\n"),
                "[[service]]\nname = \"b\"\ncommand = [\"/bin/sleep\", \"9\"]\nplacement = \"everywhere\"\ndepends_on = [\"web\"]\n"
            ),
            "service.b.depends_on",
            "b -> web -> b",
        ),
        (
            format!(
                "{}{}",
                service("depends_on = [\"b\"]\n"),
                "[[service]]\nname = \"b\"\ncommand = [\"/bin/sleep\", \"9\"]\nplacement = \"with-leader\"\n"
            ),
            "service.web.depends_on",
            "could not start",
        ),
        (service("[[service.check]]\nkind = \"tcp\"\n"), "service.web.check[0].address", "needs the address"),
        (service("[[service.check]]\nkind = \"http\"\n"), "service.web.check[0].url", "needs the URL"),
        (
            service("[[service.check]]\nkind = \"http\"\nurl = \"https://x/\"\n"),
            "service.web.check[0].url",
            "plain http",
        ),
        (service("[[service.check]]\nkind = \"command\"\n"), "service.web.check[0].command", "is missing"),
        (service("[[service.check]]\nkind = \"ping\"\n"), "service.web.check[0].kind", "not a check"),
        (
            service("[[service.check]]\nkind = \"process\"\ninterval = 1\ntimeout = 2\n"),
            "service.web.check[0].timeout",
            "longer than interval",
        ),
        (service("on_failure = \"failover\"\n"), "service.web.on_failure", "only a with-leader"),
        (service("stop_signal = \"SIGKILL\"\n"), "service.web.stop_signal", "not a stop signal"),
        (service("stop_grace = 0\n"), "service.web.stop_grace", "out of range"),
        (service("stop_grace = inf\n"), "service.web.stop_grace", "out of range"),
        (service("working_directory = \"relative\"\n"), "service.web.working_directory", "absolute path"),
        (service("log_file = \"/no/such/dir/web.log\"\n"), "service.web.log_file", "existing directory"),
        (service("[service.restart]\nlimit = 0\n"), "service.web.restart.limit", "out of range"),
        (
            format!("{}{}", service(""), service("")),
            "service.web.name",
            "two [[service]] sections",
        ),
        (
            "[[service]]\nname = \"a b\"\ncommand = [\"/bin/sleep\"]\nplacement = \"everywhere\"\n".into(),
            "service[0].name",
            "not a valid service name",
        ),
    ] {
        let err = Config::parse(Path::new("node.toml"), &with_services(dir.path(), &text))
            .expect_err(&text);
        assert_eq!(err.key.as_deref(), Some(key), "{text}\n{err}");
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
    }
}

#[test]
fn callbacks_are_resolved_and_checked() {
    if !postgres_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(
        Path::new("t"),
        &with_services(
            dir.path(),
            "[callbacks]\non_role_change = [\"sh\", \"-c\", \"true\"]\n",
        ),
    )
    .unwrap();
    let hooks = &config.hooks;
    let argv = hooks.on_role_change.as_ref().unwrap();
    assert!(
        argv[0].starts_with('/') && argv[0].ends_with("/sh"),
        "{argv:?}"
    );
    assert_eq!(hooks.on_start, None);
    assert_eq!(hooks.timeout, Duration::from_secs(30));
    for (text, key, needle) in [
        (
            "[callbacks]\non_start = []\n",
            "callbacks.on_start",
            "is missing or empty",
        ),
        (
            "[callbacks]\non_stop = [\"/no/such/hook\"]\n",
            "callbacks.on_stop",
            "not an executable",
        ),
        (
            "[callbacks]\ntimeout = 0\n",
            "callbacks.timeout",
            "out of range",
        ),
    ] {
        let err = Config::parse(Path::new("t"), &with_services(dir.path(), text)).unwrap_err();
        assert_eq!(err.key.as_deref(), Some(key), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
}

#[test]
fn alert_thresholds_have_defaults_and_bounds() {
    if !postgres_installed() {
        return;
    }
    let config = Config::parse(Path::new("t"), GOOD).unwrap();
    assert_eq!(config.alerts.replication_lag, Duration::from_secs(10));
    assert_eq!(config.alerts.replication_lag_bytes, 64 << 20);
    assert_eq!(config.alerts.data_disk_free_bytes, 1 << 30);
    assert_eq!(config.alerts.replicated_files_lag, Duration::from_secs(60));
    let set = Config::parse(
        Path::new("t"),
        &format!("{GOOD}[alerts]\nreplication_lag = 2.5\ndata_disk_free = \"10GB\"\n"),
    )
    .unwrap();
    assert_eq!(set.alerts.replication_lag, Duration::from_millis(2500));
    assert_eq!(set.alerts.data_disk_free_bytes, 10 << 30);
    check(
        "[alerts]\nreplication_lag = 0\n",
        Some("alerts.replication_lag"),
        "out of range",
    );
    check(
        "[alerts]\ndata_disk_free_percent = 100\n",
        Some("alerts.data_disk_free_percent"),
        "out of range",
    );
    check(
        "[alerts]\ndata_disk_free = \"lots\"\n",
        Some("alerts.data_disk_free"),
        "not a size",
    );
    check(
        "[alerts]\nreplicated_files_lag = -1\n",
        Some("alerts.replicated_files_lag"),
        "out of range",
    );
    check("[alerts]\ncpu = 90\n", None, "unknown field");
}

/// docs/platform.md's node configuration is a file `config check` takes:
/// only what differs from machine to machine (programs, accounts,
/// directories) is replaced by what every machine has.
#[test]
fn the_platform_example_in_the_docs_is_a_valid_configuration() {
    let doc = include_str!("../../../../docs/platform.md");
    let start = doc
        .find("```toml\n")
        .expect("a TOML block in docs/platform.md")
        + 8;
    let end = start + doc[start..].find("```").expect("the block's end");
    let text = doc[start..end]
        .replace("/opt/synapse/bin/python", "/bin/sh")
        .replace("/usr/bin/turnserver", "/bin/sh")
        .replace("/usr/local/bin/notify-bridge", "/bin/true")
        .replace("\"matrix-synapse\"", "\"root\"")
        .replace("\"turnserver\"", "\"root\"")
        .replace("/var/lib/matrix-synapse", "/");
    let config = Config::parse(Path::new("docs/platform.md"), &text)
        .unwrap_or_else(|e| panic!("docs/platform.md's example: {e}"));
    let services: Vec<String> = config
        .services
        .iter()
        .map(|s| format!("{} {:?}", s.name, s.placement))
        .collect();
    // In start order (no dependency between them: by name).
    assert_eq!(services, ["coturn Everywhere", "synapse WithLeader"]);
    assert!(config.vip.is_some());
}

#[test]
fn replicated_directories_are_typed_with_defaults() {
    if !postgres_installed() {
        return;
    }
    let text = format!(
        "{GOOD}\n[[replicate]]\npath = \"/var/lib/matrix-synapse/./media/\"\n\
         exclude = [\"*.tmp\", \"url_cache/**\"]\nthrottle = \"20MB\"\n\
         [[replicate]]\npath = \"/etc/matrix-synapse\"\nsettle = 0.5\nscan_interval = 10\n"
    );
    let config = Config::parse(Path::new("test.toml"), &text).unwrap();
    let [media, conf] = &config.replicate[..] else {
        panic!("{:?}", config.replicate);
    };
    assert_eq!(media.path, Path::new("/var/lib/matrix-synapse/media"));
    assert!(media.exclude.excludes("url_cache/a/b") && media.exclude.excludes("x/y.tmp"));
    assert_eq!(media.throttle, Some(20 << 20));
    assert_eq!(media.settle, Duration::from_secs(1));
    assert_eq!(media.scan_interval, Duration::from_secs(60));
    assert_eq!(conf.settle, Duration::from_millis(500));
    assert_eq!(conf.scan_interval, Duration::from_secs(10));
    assert_eq!(conf.throttle, None);
    assert!(
        Config::parse(Path::new("test.toml"), GOOD)
            .unwrap()
            .replicate
            .is_empty()
    );
}

#[test]
fn bad_replicated_directories_are_refused_with_the_key_and_the_fix() {
    if !postgres_installed() {
        return;
    }
    let a_file = tempfile::NamedTempFile::new().unwrap();
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "path = \"media\"".into(),
            "replicate[0].path",
            "not an absolute path",
        ),
        (
            "path = \"/srv/../etc\"".into(),
            "replicate[0].path",
            "not an absolute path",
        ),
        ("path = \"/\"".into(), "replicate[0].path", "whole machine"),
        (
            "path = \"/var/lib/mainstay/data/pg_wal\"".into(),
            "replicate[0].path",
            "overlaps PostgreSQL's data directory",
        ),
        (
            "path = \"/var/lib/mainstay\"".into(),
            "replicate[0].path",
            "overlaps PostgreSQL's data directory",
        ),
        (
            format!("path = \"{}\"", a_file.path().display()),
            "replicate[0].path",
            "not a directory",
        ),
        (
            "path = \"/srv/media\"\nexclude = [\"thumbs/[ab\"]".into(),
            "replicate[0].exclude",
            "\"thumbs/[ab\" is not a glob",
        ),
        (
            "path = \"/srv/media\"\nsettle = 0".into(),
            "replicate[0].settle",
            "out of range",
        ),
        (
            "path = \"/srv/media\"\nscan_interval = -1".into(),
            "replicate[0].scan_interval",
            "out of range",
        ),
        (
            "path = \"/srv/media\"\nscan_interval = inf".into(),
            "replicate[0].scan_interval",
            "out of range",
        ),
        (
            "path = \"/srv/media\"\nthrottle = \"fast\"".into(),
            "replicate[0].throttle",
            "not a rate",
        ),
        (
            "path = \"/srv/media\"\nthrottle = 0".into(),
            "replicate[0].throttle",
            "leave it out",
        ),
    ];
    for (section, key, needle) in &cases {
        check(&format!("\n[[replicate]]\n{section}\n"), Some(key), needle);
    }
    // Nested or the same directory twice.
    for (first, second) in [
        ("/srv/media", "/srv/media/thumbs"),
        ("/srv/media/a", "/srv/media"),
        ("/srv/x", "/srv/x/"),
    ] {
        check(
            &format!("\n[[replicate]]\npath = \"{first}\"\n[[replicate]]\npath = \"{second}\"\n"),
            Some("replicate[1].path"),
            "replicated already",
        );
    }
    check(
        "\n[[replicate]]\nexclude = []\n",
        None,
        "missing field `path`",
    );
    check(
        "\n[[replicate]]\npath = \"/srv/m\"\ndirection = \"both\"\n",
        None,
        "unknown field `direction`",
    );
}

/// `GOOD` with these lines added to its `[etcd]` section.
fn with_etcd(lines: &str) -> String {
    GOOD.replace(
        "endpoints = [\"http://127.0.0.1:2379\"]\n",
        &format!("endpoints = [\"http://127.0.0.1:2379\"]\n{lines}\n"),
    )
}

const MEMBER: &str = r#"member = true
data_dir = "/var/lib/mainstay/etcd"
client_url = "http://10.0.0.1:2379"
peer_url = "http://10.0.0.1:2380"
initial_cluster = { node1 = "http://10.0.0.1:2380", node2 = "http://10.0.0.2:2380", witness = "http://10.0.0.3:2380" }"#;

#[test]
fn a_managed_etcd_member_parses_with_timing_from_the_ttl() {
    if !postgres_installed() {
        return;
    }
    let binary = mainstay_etcd_member::spec::DEFAULT_BINARY;
    if !Path::new(binary).exists() {
        mainstay_testkit::skip(&format!("needs etcd in {binary}: run scripts/setup.sh"));
        return;
    }
    let config = Config::parse(Path::new("t"), &with_etcd(MEMBER)).unwrap();
    let member = config.etcd_member.unwrap();
    assert_eq!(member.name, "node1");
    assert_eq!(member.token, "ship");
    assert_eq!(member.initial_cluster.len(), 3);
    assert_eq!(member.state, mainstay_etcd_member::ClusterState::New);
    assert_eq!(member.timing.election_timeout, Duration::from_millis(500));
    assert!(member.tls.is_none());
    let plain = Config::parse(Path::new("t"), GOOD).unwrap();
    assert!(plain.etcd_member.is_none());
}

#[test]
fn a_bad_managed_etcd_member_is_refused_with_its_key() {
    let member = |from: &str, to: &str| with_etcd(&MEMBER.replace(from, to));
    for (text, key, needle) in [
        (
            with_etcd("data_dir = \"/x\""),
            "etcd.data_dir",
            "etcd.member is not true",
        ),
        (
            member("data_dir = \"/var/lib/mainstay/etcd\"\n", ""),
            "etcd.data_dir",
            "is missing",
        ),
        (
            member("/var/lib/mainstay/etcd", "etcd"),
            "etcd.data_dir",
            "absolute",
        ),
        (
            member("/var/lib/mainstay/etcd", "/var/lib/mainstay/data/etcd"),
            "etcd.data_dir",
            "overlaps",
        ),
        (
            member("http://10.0.0.1:2379", "http://node1:2379"),
            "etcd.client_url",
            "only on addresses",
        ),
        (
            member(
                "client_url = \"http://10.0.0.1:2379\"",
                "client_url = \"http://10.0.0.1:2380\"",
            ),
            "etcd.peer_url",
            "same as etcd.client_url",
        ),
        (
            member("node1 = ", "node9 = "),
            "etcd.initial_cluster",
            "does not list this node",
        ),
        (
            member(
                "node1 = \"http://10.0.0.1:2380\"",
                "node1 = \"http://10.0.0.1:2381\"",
            ),
            "etcd.initial_cluster",
            "make them the same",
        ),
        (
            member(
                "witness = \"http://10.0.0.3:2380\"",
                "witness = \"https://10.0.0.3:2380\"",
            ),
            "etcd.initial_cluster",
            "same to its peers",
        ),
        (
            member(
                "witness = \"http://10.0.0.3:2380\"",
                "witness = \"http://10.0.0.2:2380\"",
            ),
            "etcd.initial_cluster",
            "two members",
        ),
        (
            member("witness =", "\"a b\" ="),
            "etcd.initial_cluster",
            "not a valid name",
        ),
        (
            with_etcd(&format!("{MEMBER}\ninitial_cluster_state = \"joined\"")),
            "etcd.initial_cluster_state",
            "\"existing\"",
        ),
        (
            with_etcd(&format!("{MEMBER}\nelection_timeout = 3.0")),
            "etcd.election_timeout",
            "lengthen",
        ),
        (
            with_etcd(&format!("{MEMBER}\nheartbeat_interval = 0.2")),
            "etcd.election_timeout",
            "5 heartbeats",
        ),
        (
            with_etcd(&format!("{MEMBER}\nheartbeat_interval = -1")),
            "etcd.heartbeat_interval",
            "out of range",
        ),
        (
            member(
                "http://10.0.0.1:2380\"\ninitial",
                "https://10.0.0.1:2380\"\ninitial",
            )
            .replace("node1 = \"http://", "node1 = \"https://")
            .replace("http://10.0.0.2", "https://10.0.0.2")
            .replace("http://10.0.0.3", "https://10.0.0.3"),
            "etcd.cert_file",
            "etcd.ca_file",
        ),
        (
            with_etcd(&format!("{MEMBER}\nbin = \"/nowhere/etcd\"")),
            "etcd.bin",
            "etcd-server",
        ),
    ] {
        check_text(&text, Some(key), needle);
    }
}
