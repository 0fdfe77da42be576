#!/usr/bin/env bash
# Every test: formatting, lints, unit and integration tests (each integration test starts
# its own private PostgreSQL from the installed server binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir-target}"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
