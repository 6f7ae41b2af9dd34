//! Builds `ebpf/programs` for `bpfel-unknown-none` with the stable toolchain
//! (`RUSTC_BOOTSTRAP=1 … -Z build-std=core`, linked by bpf-linker) and copies the object to
//! `OUT_DIR/clustermesh-datapath.o`, which `src/datapath.rs` embeds.
//!
//! The inner build uses its own target directory (`target/ebpf`): the outer cargo holds the
//! lock of the host profile directory while build scripts run, so sharing it would deadlock.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const OBJECT: &str = "clustermesh-datapath";

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .context("agent/ has a parent")?
        .to_path_buf();
    let programs = root.join("ebpf/programs");
    let abi = root.join("ebpf/abi");
    for path in [
        programs.join("src"),
        programs.join("Cargo.toml"),
        programs.join("Cargo.lock"),
        programs.join(".cargo/config.toml"),
        abi.join("src"),
        abi.join("Cargo.toml"),
    ] {
        println!("cargo::rerun-if-changed={}", path.display());
    }
    println!("cargo::rerun-if-env-changed=CLUSTERMESH_EBPF_OBJECT");

    let out = PathBuf::from(env::var("OUT_DIR")?).join(format!("{OBJECT}.o"));
    // Escape hatch for machines that build the object elsewhere.
    if let Ok(prebuilt) = env::var("CLUSTERMESH_EBPF_OBJECT") {
        std::fs::copy(&prebuilt, &out).with_context(|| format!("copy {prebuilt}"))?;
        return Ok(());
    }

    check_bpf_linker()?;

    let target_dir = root.join("target/ebpf");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&programs)
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", "-C\x1flink-arg=--btf");
    // The outer build's settings must not leak into the BPF build (clippy's wrapper, host
    // rustflags, a CARGO_BUILD_TARGET, profile overrides).
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key == "RUSTFLAGS"
            || key == "RUSTC_WRAPPER"
            || key == "RUSTC_WORKSPACE_WRAPPER"
            || key == "CARGO_TARGET_DIR"
            || key.starts_with("CARGO_BUILD_")
            || key.starts_with("CARGO_PROFILE_")
        {
            cmd.env_remove(key);
        }
    }
    let status = cmd.status().context("run cargo for ebpf/programs")?;
    if !status.success() {
        bail!("building ebpf/programs for bpfel-unknown-none failed ({status})");
    }
    let built = target_dir.join("bpfel-unknown-none/release").join(OBJECT);
    copy_if_changed(&built, &out)?;
    Ok(())
}

fn check_bpf_linker() -> Result<()> {
    match Command::new("bpf-linker").arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        _ => bail!(
            "bpf-linker is not installed (needed to build the eBPF programs): run \
             ./scripts/install-deps.sh, or `rustup component add rust-src && \
             cargo install bpf-linker@0.10.4 --locked`"
        ),
    }
}

fn copy_if_changed(from: &Path, to: &Path) -> Result<()> {
    let new = std::fs::read(from).with_context(|| format!("read {}", from.display()))?;
    if std::fs::read(to).ok().as_deref() != Some(new.as_slice()) {
        std::fs::write(to, new).with_context(|| format!("write {}", to.display()))?;
    }
    Ok(())
}
