#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit tests, and the integration suites
# against a real etcd over mTLS (and Cilium's own scenario files). Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export CARGO_TERM_COLOR=never
# pip may put kubernetes-validate (tests/tests/deploy.rs) into ~/.local/bin.
export PATH="$PATH:$HOME/.local/bin"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
# ebpf/programs is its own workspace (BPF target), so --all does not reach it.
cargo fmt --manifest-path ebpf/programs/Cargo.toml -- --check
echo "==> cargo build (binaries used by the integration tests)"
cargo build --workspace --bins
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
(cd ebpf/programs && RUSTC_BOOTSTRAP=1 cargo clippy --release -Z build-std=core -- -D warnings)
echo "==> cargo test"
cargo test --workspace --no-fail-fast -- --test-threads=2
