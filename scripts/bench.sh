#!/usr/bin/env bash
# Benchmarks, release build. Each prints its figure beside a baseline measured in the same run.
#   ./scripts/bench.sh            all
#   ./scripts/bench.sh export     one (export, export-kubernetes, remote, remote-511, maps, maps-1m, datapath-throughput, datapath-throughput-v6, churn)
# remote-511 (510 remotes × 2k endpoints under max-connected-clusters 511, ~1M endpoints,
# several GB of RAM, minutes) is not in the default list: run it by name.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --workspace --bins
for b in ${1:-export export-kubernetes remote maps maps-1m datapath-throughput datapath-throughput-v6 policy lb cni churn}; do
  if [ "$b" = export-kubernetes ]; then
    echo "=== bench-export --source kubernetes"
    target/release/bench-export --source kubernetes
  elif [ "$b" = maps-1m ]; then
    echo "=== bench-maps --profile 1m"
    target/release/bench-maps --profile 1m
  elif [ "$b" = datapath-throughput-v6 ]; then
    # IPv6 pods: ours beside plain kernel VXLAN over the IPv6 underlay (issue 16, ≥ 0.9×).
    echo "=== bench-datapath-throughput --ip-family ipv6"
    target/release/bench-datapath-throughput --ip-family ipv6
  elif [ "$b" = remote-511 ]; then
    echo "=== bench-remote --only b --profile 511"
    target/release/bench-remote --only b --profile 511
  elif [ -x "target/release/bench-$b" ]; then
    echo "=== bench-$b"
    "target/release/bench-$b"
  else
    echo "=== bench-$b: not built yet" >&2
  fi
done
