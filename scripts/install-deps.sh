#!/usr/bin/env bash
# Installs what clustermesh needs on a fresh Debian 12 machine, only if missing.
# Idempotent; safe to run on every invocation of lab.sh / test.sh.
set -euo pipefail

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need_apt+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v ping >/dev/null 2>&1 || need_apt+=(iputils-ping)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v tcpdump >/dev/null 2>&1 || need_apt+=(tcpdump)  # datapath test: VNI on the wire
command -v ethtool >/dev/null 2>&1 || need_apt+=(ethtool)  # lab: GRO on the underlay, like a NIC
command -v iptables-restore >/dev/null 2>&1 || need_apt+=(iptables)  # bench-lb: kube-proxy-style baseline
command -v dig >/dev/null 2>&1 || need_apt+=(dnsutils)  # lab: dig the clusterset.local names from a pod
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)  # fault suite: the serial etcd presents
command -v setpriv >/dev/null 2>&1 || need_apt+=(util-linux)  # apiserver: its etcd dies with it
# lab --cni ptp|bridge: the CNI reference plugins (/usr/lib/cni/{ptp,bridge,host-local}).
[ -x /usr/lib/cni/ptp ] || need_apt+=(containernetworking-plugins)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)  # ui test: the page in a real headless browser
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)  # ui test: WebDriver

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing ${need_apt[*]} (apt)"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# deploy/kubernetes and every object the CLI sends are validated strictly against the
# Kubernetes schemas (tests/tests/deploy.rs); the validator works offline from bundled schemas.
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "==> pip install kubernetes-validate"
  if command -v pip3 >/dev/null 2>&1; then PIP=pip3; elif command -v pip >/dev/null 2>&1; then PIP=pip; else
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-pip >/dev/null
    PIP=pip3
  fi
  # Debian's own python refuses system-wide installs without this (PEP 668).
  $PIP install --quiet kubernetes-validate 2>/dev/null || $PIP install --quiet --break-system-packages kubernetes-validate
  hash -r
  command -v kubernetes-validate >/dev/null 2>&1 || export PATH="$HOME/.local/bin:$PATH"
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "error: cargo not found; install Rust (rustup) first" >&2
    exit 1
  fi
fi
for c in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
    echo "==> rustup component add $c"
    rustup component add "$c" >/dev/null
  fi
done

# eBPF toolchain: agent/build.rs builds ebpf/programs for bpfel-unknown-none with the stable
# toolchain (RUSTC_BOOTSTRAP=1, -Z build-std=core), which needs rust-src and bpf-linker.
# bpf-linker 0.10.4 loads rustc's own libLLVM; newer releases want a system LLVM 23.
if ! rustup component list --installed 2>/dev/null | grep -q "^rust-src"; then
  echo "==> rustup component add rust-src"
  rustup component add rust-src >/dev/null
fi
if ! bpf-linker --version 2>/dev/null | grep -q "0\.10\.4"; then
  echo "==> cargo install bpf-linker@0.10.4 --locked (about a minute)"
  cargo install bpf-linker@0.10.4 --locked --quiet
fi
