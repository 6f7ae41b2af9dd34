#!/usr/bin/env bash
# Brings up the lab: a 2-cluster mesh on this machine, and shows it working.
# `./scripts/lab.sh down` removes it again.
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
echo "Reading cluster c1's exported state the way a remote cluster does (etcdctl, user 'remote'):"
d=.lab/c1/certs
ETCDCTL_API=3 etcdctl --endpoints https://127.0.0.1:32379 --cacert $d/ca.crt \
  --cert $d/remote.crt --key $d/remote.key get --prefix cilium/state/ --keys-only | sed '/^$/d'
echo
echo "The lab keeps running: 'target/debug/clustermesh lab status' shows it, './scripts/lab.sh down' removes it."
