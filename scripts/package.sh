#!/usr/bin/env bash
# Builds the Debian package (target/debian/mainstay_<version>_<arch>.deb)
# from a release build, with cargo-deb (scripts/setup.sh installs it).
# Install or upgrade with `apt-get install ./target/debian/mainstay_*.deb`:
# an upgrade moves running agents to the new binary in place.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo deb -p mainstay "$@"
