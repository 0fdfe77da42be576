#!/usr/bin/env bash
# Every test: formatting, lints (host and plugins), unit and integration tests. Building the
# host also builds the plugins in plugins/ for wasm32-wasip2 (host/build.rs); integration
# tests each start their own private PostgreSQL from the installed server binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir-target}"
cargo fmt --all -- --check
cargo fmt --all --manifest-path plugins/Cargo.toml -- --check
cargo clippy --workspace --all-targets -- -D warnings
CARGO_TARGET_DIR="$CARGO_TARGET_DIR/plugins" \
  cargo clippy --manifest-path plugins/Cargo.toml --workspace --release --target wasm32-wasip2 -- -D warnings
cargo test --workspace
