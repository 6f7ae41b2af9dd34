//! Scenario runner: executes Cilium's clustermesh-apiserver `.txtar` scenario scripts (and
//! our own in the same format) against the real `clustermesh-apiserver` binary and a real
//! etcd over mTLS.
//!
//! A scenario is a script of commands (`hive/start`, `k8s/add`, `kvstore/list`, `* cmp`,
//! `sed`, `env`, `health`, ...; [`runner::COMMANDS`] lists them) followed by embedded files;
//! see `tests/cilium-testdata/README.md` for the format. Flags may follow
//! positional arguments ([`flags`]), as in Cilium's script engine. [`Scenario::parse`] reads one, [`run`] executes it against a [`Backend`], and
//! [`apiserver::Apiserver`] is the real backend. This module does not start etcd: the caller
//! provides an etcd client config (see `tests/tests/scenarios.rs`).

pub mod apiserver;
pub mod flags;
pub mod health;
pub mod k8s;
pub mod listing;
pub mod runner;
pub mod script;
pub mod source;
pub mod txtar;

use std::path::{Path, PathBuf};

use anyhow::Context as _;

pub use runner::{run, run_with, Backend, Options};

/// A parsed scenario file.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// File stem, used as the prefix of progress lines.
    pub name: String,
    /// Flags from the `#!` line, passed to the apiserver verbatim.
    pub flags: Vec<String>,
    pub commands: Vec<script::Command>,
    /// Embedded files, written into the scratch directory before the script runs.
    pub files: Vec<txtar::File>,
}

impl Scenario {
    /// Parses scenario text.
    pub fn parse(name: &str, text: &str) -> anyhow::Result<Self> {
        let archive = txtar::parse(text);
        let script = script::parse(&archive.comment).with_context(|| format!("scenario {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            flags: script.flags,
            commands: script.commands,
            files: archive.files,
        })
    }

    /// Reads and parses a scenario file; its name is the file stem.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Self::parse(&name, &text)
    }

    /// The value of a `#!` flag given as `--name=value` or `--name value`.
    pub fn flag(&self, name: &str) -> Option<&str> {
        let mut iter = self.flags.iter();
        while let Some(flag) = iter.next() {
            if let Some(value) = flag.strip_prefix(name) {
                if let Some(value) = value.strip_prefix('=') {
                    return Some(value);
                }
                if value.is_empty() {
                    return iter.next().map(String::as_str);
                }
            }
        }
        None
    }

    /// The cluster name from `--cluster-name` (Cilium's default is `default`).
    pub fn cluster_name(&self) -> &str {
        self.flag("--cluster-name").unwrap_or("default")
    }

    /// Mutable access to an embedded file, e.g. to break an expectation in a test.
    pub fn file_mut(&mut self, name: &str) -> Option<&mut String> {
        self.files
            .iter_mut()
            .find(|f| f.name == name)
            .map(|f| &mut f.data)
    }
}

/// Cilium's scenario files: `$CILIUM_TESTDATA`, else the copy in `tests/cilium-testdata` (taken
/// from Cilium's clustermesh-apiserver test suite, Apache-2.0), so a plain clone runs them.
pub fn reference_dir() -> PathBuf {
    match std::env::var_os("CILIUM_TESTDATA") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("cilium-testdata"),
    }
}

/// Our own scenario files: `tests/scenarios/`.
pub fn own_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

/// All `*.txtar` files directly in `dir`, sorted by name. A missing directory yields none.
pub fn discover(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txtar") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_cluster_name() {
        let s = Scenario::parse(
            "x",
            "#! --cluster-id=1 --cluster-name cluster1 --clustermesh-enable-mcs-api\nhive/start\n",
        )
        .unwrap();
        assert_eq!(s.flag("--cluster-id"), Some("1"));
        assert_eq!(s.cluster_name(), "cluster1");
        assert_eq!(s.flag("--clustermesh-enable-mcs-api"), None);
        assert_eq!(s.flag("--cluster"), None);
        assert_eq!(
            Scenario::parse("y", "hive/start\n").unwrap().cluster_name(),
            "default"
        );
    }

    /// Every upstream scenario parses, and its `cmp`/`empty`/`k8s` files exist.
    #[test]
    fn reference_scenarios_parse() {
        let dir = reference_dir();
        let mut files = discover(&dir).unwrap();
        files.extend(discover(&own_dir()).unwrap());
        if files.is_empty() {
            eprintln!("no reference scenarios in {}", dir.display());
            return;
        }
        for path in files {
            let s = Scenario::load(&path).unwrap();
            assert!(s.flag("--cluster-name").is_some(), "{}", s.name);
            assert!(
                s.commands.iter().any(|c| c.name() == "hive/start"),
                "{}",
                s.name
            );
            let mut produced: Vec<String> = Vec::new();
            for cmd in &s.commands {
                let args: Vec<String> = cmd.args.iter().map(script::Word::literal).collect();
                let inputs: &[String] = match args[0].as_str() {
                    "k8s/add" | "k8s/update" | "k8s/delete" => &args[1..],
                    "cmp" => &args[2..],
                    "cp" => &args[1..2],
                    _ => &[],
                };
                for input in inputs {
                    assert!(
                        s.files.iter().any(|f| &f.name == input) || produced.contains(input),
                        "{}: line {} uses missing file {input}",
                        s.name,
                        cmd.line
                    );
                }
                if args[0] == "cp" {
                    produced.push(args[2].clone());
                }
            }
            for file in s.files.iter().filter(|f| f.name.ends_with(".yaml")) {
                k8s::objects(&file.data)
                    .unwrap_or_else(|e| panic!("{}: {}: {e:#}", s.name, file.name));
            }
        }
    }
}
