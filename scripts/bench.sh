#!/usr/bin/env bash
# Benchmarks, release build. Each prints its figure beside a baseline measured in the same run.
#   ./scripts/bench.sh            all
#   ./scripts/bench.sh export     one (export, export-kubernetes, remote, datapath-throughput)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --workspace --bins
for b in ${1:-export export-kubernetes remote maps datapath-throughput policy lb cni}; do
  if [ "$b" = export-kubernetes ]; then
    echo "=== bench-export --source kubernetes"
    target/release/bench-export --source kubernetes
  elif [ -x "target/release/bench-$b" ]; then
    echo "=== bench-$b"
    "target/release/bench-$b"
  else
    echo "=== bench-$b: not built yet" >&2
  fi
done
