#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script):
# install what is missing, check formatting and lints, run every test against
# real etcd and PostgreSQL. Run it as root: PostgreSQL runs as `postgres`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TERM_COLOR=never
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Simulation seeds per run (each seed is a whole cluster under random faults).
export MAINSTAY_SIM_SEEDS="${MAINSTAY_SIM_SEEDS:-10000}"
cargo test --workspace --no-fail-fast -- --test-threads=2
