#!/usr/bin/env bash
# Every test: formatting, lints (host and plugins), unit and integration tests. Building the
# host also builds the plugins in plugins/ for wasm32-wasip2 (host/build.rs); integration
# tests each start their own private PostgreSQL from the installed server binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir-target}"
# The object-store tests start a private S3-compatible server: moto's, from PyPI.
venv="${WEIR_VENV:-$HOME/.cache/weir-venv}"
if [ ! -x "$venv/bin/moto_server" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet 'moto[server]'
fi
export WEIR_MOTO_SERVER="$venv/bin/moto_server"
cargo fmt --all -- --check
cargo fmt --all --manifest-path plugins/Cargo.toml -- --check
cargo clippy --workspace --all-targets -- -D warnings
CARGO_TARGET_DIR="$CARGO_TARGET_DIR/plugins" \
  cargo clippy --manifest-path plugins/Cargo.toml --workspace --release --target wasm32-wasip2 -- -D warnings
cargo test --workspace
