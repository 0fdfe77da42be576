#!/usr/bin/env bash
# Every test: formatting, lints (host and plugins), unit and integration tests. Building the
# host also builds the plugins in plugins/ for wasm32-wasip2 (host/build.rs); integration
# tests each start their own private PostgreSQL from the installed server binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir-target}"
# From PyPI, into a venv: the object-store tests' private S3-compatible server (moto), and
# DuckDB with its Delta extension, an independent reader of the tables weir writes.
venv="${WEIR_VENV:-$HOME/.cache/weir-venv}"
if [ ! -x "$venv/bin/moto_server" ] || ! "$venv/bin/python" -c 'import duckdb, duckdb_extension_delta' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet 'moto[server]' duckdb duckdb-extension-delta
fi
export WEIR_MOTO_SERVER="$venv/bin/moto_server"
export WEIR_PYTHON="$venv/bin/python"
cargo fmt --all -- --check
cargo fmt --all --manifest-path plugins/Cargo.toml -- --check
cargo clippy --workspace --all-targets -- -D warnings
CARGO_TARGET_DIR="$CARGO_TARGET_DIR/plugins" \
  cargo clippy --manifest-path plugins/Cargo.toml --workspace --release --target wasm32-wasip2 -- -D warnings
cargo test --workspace
# The plugin SDK's and the fraud rule's own unit tests (natively: they need no host).
CARGO_TARGET_DIR="$CARGO_TARGET_DIR/plugins" cargo test --manifest-path plugins/Cargo.toml -p weir-plugin-sdk -p fraud-rule
