#!/usr/bin/env bash
# Brings up the lab — 2 clusters × 2 nodes × 2 pods in network namespaces, meshed, with the
# eBPF datapath — and runs the connectivity test. Needs root.
#   ./scripts/lab.sh          up + connectivity test (the lab keeps running)
#   ./scripts/lab.sh down     removes it
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --workspace --bins
bin=target/debug/clustermesh
if [ "${1:-up}" = "down" ]; then
  exec "$bin" lab down
fi
"$bin" lab down >/dev/null 2>&1 || true
"$bin" lab up --clusters 2 --nodes 2 --pods 2
echo
"$bin" connectivity test
echo
echo "The lab keeps running: '$bin lab status' shows it, './scripts/lab.sh down' removes it."
