#!/usr/bin/env bash
# Installs what mainstay needs on Debian 12 and nothing else, idempotently:
# PostgreSQL 15 (without Debian's default cluster: mainstay manages its own),
# etcd, protoc (the etcd-client crate compiles etcd's protobufs), HAProxy
# (the integration tests check mainstay's REST API behind a real one),
# iproute2 (the virtual IP tests build hosts as network namespaces; tc
# squeezes a link in the fault suite), nftables (the fault suite drops
# packets and cuts hosts off etcd), keepalived (`mainstay bench
# endpoints` compares the VIP with it), and Python's venv, in which
# schemathesis (from PyPI) fuzzes the REST API against its OpenAPI document
# (tests/api_fuzz.rs) from a virtualenv of its own, /opt/mainstay-venv,
# and check_patroni (PyPI), Patroni's monitoring plugin, checks the
# Patroni-compatible API (tests/check_patroni.rs) from another,
# /opt/mainstay-check-patroni.
# The platform test and `mainstay bench platform` run the real programs a
# ship runs: coturn (Debian's) and Synapse (PyPI's matrix-synapse, with
# psycopg2 built against libpq, hence gcc, libpq-dev and python3-dev) in a
# virtualenv shared by every test, /opt/mainstay-synapse.
# systemd brings systemd-analyze, which checks the units `mainstay init`
# writes (tests/init.rs) and the package installs. The Debian package is
# built with cargo-deb (crates.io, pinned), which reads library dependencies
# with dpkg-dev's dpkg-shlibdeps; the package itself needs adduser.
# Safe to run again and again; it only calls apt-get when something is
# missing, and pip only when a Python tool is not there in its pinned
# version.
set -euo pipefail

packages=(postgresql-15 postgresql-client-15 etcd-server protobuf-compiler haproxy openssl iproute2 keepalived nftables python3 python3-venv python3-dev libpq-dev gcc coturn rsync systemd procps dpkg-dev adduser)
missing=()
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if [ "${#missing[@]}" -gt 0 ]; then
    # Debian would create and start a cluster on port 5432; mainstay runs its
    # own PostgreSQL, so tell postgresql-common not to.
    $sudo mkdir -p /etc/postgresql-common
    if ! grep -qs '^create_main_cluster *= *false' /etc/postgresql-common/createcluster.conf; then
        echo "create_main_cluster = false" | $sudo tee -a /etc/postgresql-common/createcluster.conf >/dev/null
    fi
    echo "setup: installing ${missing[*]}"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The haproxy package starts its service where an init system runs it;
    # the tests start their own haproxy processes, so stop the one we just
    # installed (a service that was already there is left alone).
    for service in haproxy keepalived coturn; do
        if [[ " ${missing[*]} " == *" $service "* ]]; then
            if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
                $sudo systemctl stop "$service" >/dev/null 2>&1 || true
            else
                $sudo service "$service" stop >/dev/null 2>&1 || true
            fi
        fi
    done
fi

# The packages may start their own services where an init system runs them;
# mainstay starts etcd and PostgreSQL itself.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    for unit in etcd postgresql; do
        if systemctl is-enabled --quiet "$unit" 2>/dev/null; then
            echo "setup: note: the distribution's $unit service is enabled; disable it on mainstay nodes (systemctl disable --now $unit)"
        fi
    done
fi

# A Python tool pinned in a virtualenv of its own, made with Debian's own
# python3 whatever else is on PATH (its dependencies must not move
# another tool's): installed when CHECK, run with the venv's python, fails.
pinned_venv() {
    local what="$1" venv="$2" check="$3" spec="$4"
    if ! "$venv/bin/python" -c "$check" 2>/dev/null; then
        echo "setup: installing $what into $venv"
        [ -x "$venv/bin/pip" ] || $sudo /usr/bin/python3 -m venv "$venv"
        $sudo env PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/pip" install --quiet --no-input "$spec"
    fi
}

# schemathesis: tests/api_fuzz.rs runs it from here (or from
# MAINSTAY_SCHEMATHESIS).
venv=/opt/mainstay-venv
schemathesis_version=4.32.5
pinned_venv "schemathesis $schemathesis_version" "$venv" \
    "import importlib.metadata as m, sys; sys.exit(m.version('schemathesis') != '$schemathesis_version')" \
    "schemathesis==$schemathesis_version"

# Synapse, for the platform test and benchmark (or from
# MAINSTAY_SYNAPSE_VENV).
synapse_venv=/opt/mainstay-synapse
synapse_version=1.163.2
pinned_venv "Synapse $synapse_version" "$synapse_venv" \
    "import synapse, psycopg2, sys; sys.exit(synapse.__version__ != '$synapse_version')" \
    "matrix-synapse[postgres]==$synapse_version"

# check_patroni, Patroni's Nagios/Icinga plugin, which
# tests/check_patroni.rs points at a mainstay cluster (or
# MAINSTAY_CHECK_PATRONI).
check_venv=/opt/mainstay-check-patroni
check_patroni_version=2.2.0
pinned_venv "check_patroni $check_patroni_version" "$check_venv" \
    "import importlib.metadata as m, sys; sys.exit(m.version('check_patroni') != '$check_patroni_version')" \
    "check_patroni==$check_patroni_version"

# Patroni itself, for tests/takeover.rs (a running Patroni cluster taken
# over) and `mainstay bench compare`: bench/patroni/install.sh pins it.
patroni_venv=/var/tmp/mainstay-bench/patroni-venv
if ! "$patroni_venv/bin/patroni" --version 2>/dev/null | grep -qx "patroni 4.1.5"; then
    echo "setup: installing Patroni 4.1.5 into $patroni_venv"
fi
"$(dirname "$0")/../bench/patroni/install.sh" "$patroni_venv" >/dev/null

# cargo-deb, pinned: `scripts/package.sh` and tests/upgrade.rs build the
# Debian package with it.
cargo_deb_version=3.8.0
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $cargo_deb_version" ]; then
    echo "setup: installing cargo-deb $cargo_deb_version"
    cargo install --quiet --locked cargo-deb --version "$cargo_deb_version"
fi

for tool in /usr/lib/postgresql/15/bin/postgres /usr/bin/etcd /usr/bin/protoc /usr/sbin/haproxy /usr/sbin/keepalived /usr/sbin/nft /usr/sbin/tc /usr/bin/setpriv "$venv/bin/schemathesis" "$check_venv/bin/check_patroni" "$patroni_venv/bin/patroni" /usr/bin/turnserver "$synapse_venv/bin/synapse_homeserver"; do
    [ -x "$tool" ] || { echo "setup: $tool is still missing after the install" >&2; exit 1; }
done
id postgres >/dev/null 2>&1 || { echo "setup: the postgres OS user is missing" >&2; exit 1; }
echo "setup: PostgreSQL 15, etcd $(/usr/bin/etcd --version | head -1 | awk '{print $3}'), protoc, HAProxy $(/usr/sbin/haproxy -v | head -1 | awk '{print $3}'), schemathesis $schemathesis_version, check_patroni $check_patroni_version, Patroni 4.1.5, coturn and Synapse $synapse_version are in place"
