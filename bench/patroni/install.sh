#!/usr/bin/env bash
# Installs what `mainstay bench compare` runs beside mainstay: Patroni from
# PyPI into its own virtualenv (never into the system's Python) and HAProxy
# from Debian when missing. Safe to run again; prints the venv's patroni.
#
#   bench/patroni/install.sh [VENV]     (default /var/tmp/mainstay-bench/patroni-venv)
#
# The venv lives outside the project and outside /root so that the
# `postgres` user, which runs Patroni, can read it.
set -euo pipefail

venv="${1:-/var/tmp/mainstay-bench/patroni-venv}"
# Pinned: the comparison names the version it measured.
patroni_version="4.1.5"

if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null
    # Debian starts a default HAProxy: the benchmark runs its own.
    $sudo systemctl disable --now haproxy >/dev/null 2>&1 || true
fi

# Debian's interpreter, not one under /root (pyenv): Patroni runs as
# `postgres`, which must be able to exec and read it.
if ! /usr/bin/python3 -m venv --help >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
if [ ! -x "$venv/bin/patroni" ] || ! "$venv/bin/patroni" --version 2>/dev/null | grep -qx "patroni $patroni_version"; then
    mkdir -p "$(dirname "$venv")"
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "patroni[etcd3,psycopg3]==$patroni_version" "psycopg[binary]"
fi
chmod -R a+rX "$(dirname "$venv")"
echo "$venv/bin/patroni"
