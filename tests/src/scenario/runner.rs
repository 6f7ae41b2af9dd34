//! Executes a parsed scenario against a [`Backend`] (an apiserver and its etcd).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

use super::flags::{self, Flag};
use super::script::{self, Command};
use super::source::{ManifestDir, Source};
use super::{health, k8s, listing, Scenario};

/// What the runner drives: the system under test.
///
/// `async fn` in this trait is fine: the runner awaits it on the caller's task and never
/// needs the futures to be `Send`.
#[allow(async_fn_in_trait)]
pub trait Backend {
    /// `hive/start`: start the apiserver with the scenario's `#!` flags, the script
    /// environment and the flags that point it at its source (see [`Source::flags`]).
    async fn start(
        &mut self,
        flags: &[String],
        env: &BTreeMap<String, String>,
        source: &[String],
    ) -> anyhow::Result<()>;
    /// `hive/stop`: stop the apiserver (graceful, then forced).
    async fn stop(&mut self) -> anyhow::Result<()>;
    /// Whether the apiserver is running (started and not stopped).
    fn running(&self) -> bool;
    /// Every key/value under `prefix` in etcd.
    async fn list(&mut self, prefix: &str) -> anyhow::Result<Vec<(String, Vec<u8>)>>;
    /// `health`, `health/ok`: the running process's health reporters.
    async fn health(&mut self) -> anyhow::Result<Vec<health::Report>> {
        bail!("this backend has no health reporters")
    }
    /// Extra context for a failure report, e.g. the apiserver's exit status and log tail.
    fn diagnostics(&mut self) -> Option<String> {
        None
    }
}

/// Runner settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long a `*` command keeps retrying its section.
    pub retry_timeout: Duration,
    /// Print each step to stdout.
    pub verbose: bool,
}

impl Options {
    /// Defaults: 20 s retry timeout (env `SCENARIO_TIMEOUT`: seconds, or a Go-style
    /// duration such as `1m`), verbose.
    pub fn from_env() -> anyhow::Result<Self> {
        let retry_timeout = match std::env::var("SCENARIO_TIMEOUT") {
            Ok(v) => match v.trim().parse::<u64>() {
                Ok(secs) => Duration::from_secs(secs),
                Err(_) => script::parse_duration(&v).context("SCENARIO_TIMEOUT")?,
            },
            Err(_) => Duration::from_secs(20),
        };
        Ok(Self {
            retry_timeout,
            verbose: true,
        })
    }
}

/// Every command the runner knows (for the error on an unknown one).
pub const COMMANDS: &[&str] = &[
    "hive/start",
    "hive/stop",
    "k8s/add",
    "k8s/update",
    "k8s/delete",
    "kvstore/list",
    "cmp",
    "empty",
    "grep",
    "cp",
    "replace",
    "sed",
    "env",
    "sleep",
    "health",
    "health/ok",
];

const LIST_FLAGS: &[Flag] = &[Flag {
    names: &["o", "output"],
    takes_value: true,
}];
const GREP_FLAGS: &[Flag] = &[Flag {
    names: &["q"],
    takes_value: false,
}];

/// First and maximum pause between retries of a section.
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Runs `scenario` in `root` (a fresh, empty directory: the scratch files go to
/// `root/work`, the Kubernetes objects to `root/manifests`). The backend is stopped at the
/// end if the script left it running.
pub async fn run<B: Backend>(
    scenario: &Scenario,
    backend: &mut B,
    root: &Path,
    options: &Options,
) -> anyhow::Result<()> {
    let mut source = ManifestDir::new(&root.join("manifests"))?;
    run_with(scenario, backend, &mut source, root, options).await
}

/// [`run`] with the Kubernetes objects going to `source` instead of a manifest directory.
pub async fn run_with<B: Backend>(
    scenario: &Scenario,
    backend: &mut B,
    source: &mut dyn Source,
    root: &Path,
    options: &Options,
) -> anyhow::Result<()> {
    let work = root.join("work");
    std::fs::create_dir_all(&work)?;
    for file in &scenario.files {
        let path = work.join(&file.name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, &file.data).with_context(|| format!("writing {}", file.name))?;
    }
    let mut state = State {
        name: &scenario.name,
        vars: BTreeMap::from([("WORK".to_owned(), work.display().to_string())]),
        work,
        source,
        flags: &scenario.flags,
        backend,
        verbose: options.verbose,
    };
    let result = state
        .run_all(&scenario.commands, options.retry_timeout)
        .await;
    if state.backend.running() {
        if let Err(e) = state.backend.stop().await {
            if result.is_ok() {
                return Err(e.context("stopping the apiserver at the end of the scenario"));
            }
        }
    }
    result
}

fn retries_text(n: u32) -> String {
    if n == 1 {
        "1 retry".to_owned()
    } else {
        format!("{n} retries")
    }
}

struct State<'a, B> {
    name: &'a str,
    vars: BTreeMap<String, String>,
    work: PathBuf,
    source: &'a mut dyn Source,
    flags: &'a [String],
    backend: &'a mut B,
    verbose: bool,
}

impl<B: Backend> State<'_, B> {
    async fn run_all(&mut self, commands: &[Command], timeout: Duration) -> anyhow::Result<()> {
        for (idx, cmd) in commands.iter().enumerate() {
            let started = Instant::now();
            let mut result = self.exec(cmd).await;
            let mut retries = 0u32;
            if result.is_err() && cmd.retry {
                let deadline = started + timeout;
                let mut backoff = BACKOFF_START;
                while result.is_err() && Instant::now() < deadline {
                    let left = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(backoff.min(left)).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    retries += 1;
                    result = self.exec_range(&commands[cmd.section_start..=idx]).await;
                }
            }
            let elapsed = started.elapsed().as_secs_f64();
            let verdict = match (&result, retries) {
                (Ok(()), 0) => format!("ok ({elapsed:.1}s)"),
                (Ok(()), n) => format!("ok after {} ({elapsed:.1}s)", retries_text(n)),
                (Err(_), 0) => format!("FAILED ({elapsed:.1}s)"),
                (Err(_), n) => format!("FAILED after {} ({elapsed:.1}s)", retries_text(n)),
            };
            self.say(format!("{}: {} ... {verdict}", cmd.line, cmd.text));
            if let Err(error) = result {
                let mut msg = format!(
                    "[{}] line {}: `{}` failed{}:\n{error:#}",
                    self.name,
                    cmd.line,
                    cmd.text,
                    if cmd.retry {
                        format!(" (retried for {:.1}s)", timeout.as_secs_f64())
                    } else {
                        String::new()
                    }
                );
                if let Some(diag) = self.backend.diagnostics() {
                    let _ = write!(msg, "\n{diag}");
                }
                return Err(anyhow!(msg));
            }
        }
        Ok(())
    }

    fn say(&self, line: String) {
        if self.verbose {
            println!("[{}] {line}", self.name);
        }
    }

    async fn exec_range(&mut self, commands: &[Command]) -> anyhow::Result<()> {
        for cmd in commands {
            self.exec(cmd)
                .await
                .with_context(|| format!("line {}: `{}`", cmd.line, cmd.text))?;
        }
        Ok(())
    }

    /// Runs one command, honoring `!`.
    async fn exec(&mut self, cmd: &Command) -> anyhow::Result<()> {
        let args: Vec<String> = cmd.args.iter().map(|w| w.expand(&self.vars)).collect();
        let result = self.dispatch(&args[0], &args[1..]).await;
        match (cmd.negate, result) {
            (false, r) => r,
            (true, Ok(())) => bail!("command succeeded, but was expected to fail"),
            (true, Err(_)) => Ok(()),
        }
    }

    fn path(&self, arg: &str) -> PathBuf {
        self.work.join(arg)
    }

    fn read(&self, arg: &str) -> anyhow::Result<String> {
        let path = self.path(arg);
        std::fs::read_to_string(&path).with_context(|| format!("reading {arg}"))
    }

    async fn dispatch(&mut self, name: &str, args: &[String]) -> anyhow::Result<()> {
        match name {
            "hive/start" => {
                if self.backend.running() {
                    bail!("hive/start: apiserver already running");
                }
                let source = self.source.flags();
                self.backend.start(self.flags, &self.vars, &source).await
            }
            "hive/stop" => {
                if !self.backend.running() {
                    bail!("hive/stop: apiserver not running");
                }
                self.backend.stop().await
            }
            "k8s/add" | "k8s/update" | "k8s/delete" => {
                if args.is_empty() {
                    bail!("usage: {name} FILE...");
                }
                for file in args {
                    let objects = k8s::objects(&self.read(file)?)
                        .with_context(|| format!("{name} {file}"))?;
                    for object in &objects {
                        if name == "k8s/delete" {
                            self.source.delete(object)
                        } else {
                            self.source.write(object)
                        }
                        .with_context(|| format!("{name} {file}"))?;
                    }
                }
                Ok(())
            }
            "kvstore/list" => {
                let parsed = flags::parse(name, args, LIST_FLAGS)?;
                let format = match parsed.get("o") {
                    None | Some("plain") => listing::Format::Plain,
                    Some("json") => listing::Format::Json,
                    Some(other) => {
                        bail!("kvstore/list: unknown output format {other:?} (json or plain)")
                    }
                };
                let [prefix, out] = parsed.positional.as_slice() else {
                    bail!("usage: kvstore/list [-o json|plain] PREFIX OUTFILE");
                };
                let mut entries = self
                    .backend
                    .list(prefix)
                    .await
                    .with_context(|| format!("listing {prefix:?} in etcd"))?;
                std::fs::write(self.path(out), listing::render(&mut entries, format))
                    .with_context(|| format!("writing {out}"))
            }
            "cmp" => {
                let [actual, expected] = args else {
                    bail!("usage: cmp ACTUAL EXPECTED");
                };
                match listing::compare(&self.read(actual)?, &self.read(expected)?) {
                    Ok(()) => Ok(()),
                    Err(diffs) => {
                        bail!("{actual} and {expected} differ:\n  {}", diffs.join("\n  "))
                    }
                }
            }
            "empty" => {
                let [file] = args else {
                    bail!("usage: empty FILE");
                };
                let text = self.read(file)?;
                if text.is_empty() {
                    return Ok(());
                }
                let keys: Vec<String> = listing::parse(&text).into_iter().map(|e| e.key).collect();
                bail!("{file} is not empty; it lists {keys:?}")
            }
            "grep" => {
                let parsed = flags::parse(name, args, GREP_FLAGS)?;
                let quiet = parsed.get("q") == Some("true");
                let [pattern, file] = parsed.positional.as_slice() else {
                    bail!("usage: grep [-q] PATTERN FILE");
                };
                let re = regex::Regex::new(&format!("(?m){pattern}"))
                    .with_context(|| format!("invalid pattern {pattern:?}"))?;
                let text = self.read(file)?;
                if !re.is_match(&text) {
                    bail!("no match for {pattern:?} in {file}:\n{text}");
                }
                if !quiet {
                    for line in text.lines().filter(|l| re.is_match(l)) {
                        self.say(format!("    {line}"));
                    }
                }
                Ok(())
            }
            "cp" => {
                let [from, to] = args else {
                    bail!("usage: cp FROM TO");
                };
                std::fs::copy(self.path(from), self.path(to))
                    .with_context(|| format!("cp {from} {to}"))?;
                Ok(())
            }
            "replace" => {
                let [old, new, file] = args else {
                    bail!("usage: replace OLD NEW FILE");
                };
                let text = self.read(file)?;
                std::fs::write(self.path(file), text.replace(old.as_str(), new))
                    .with_context(|| format!("writing {file}"))
            }
            "sed" => {
                // Go's regexp.ReplaceAll over the whole file: RE2 syntax (the `regex` crate
                // is RE2-like, no backreferences or lookaround), `$1`/`${name}` expand.
                let [pattern, replacement, file] = args else {
                    bail!("usage: sed PATTERN REPLACEMENT FILE");
                };
                let re = regex::Regex::new(pattern)
                    .with_context(|| format!("sed: invalid pattern {pattern:?}"))?;
                let text = self.read(file)?;
                let edited = re.replace_all(&text, replacement.as_str());
                std::fs::write(self.path(file), edited.as_bytes())
                    .with_context(|| format!("writing {file}"))
            }
            "health" | "health/ok" => {
                let query = health::Query::parse(name, args)?;
                if !self.backend.running() {
                    bail!("{name}: the apiserver is not running (hive/start first)");
                }
                let reports = self
                    .backend
                    .health()
                    .await
                    .context("reading the health reporters")?;
                query.check(&reports)
            }
            "env" => {
                if args.is_empty() {
                    for (k, v) in &self.vars {
                        self.say(format!("    {k}={v}"));
                    }
                }
                for arg in args {
                    match arg.split_once('=') {
                        Some((k, v)) if !k.is_empty() => {
                            self.vars.insert(k.to_owned(), v.to_owned());
                        }
                        _ => {
                            let value = self.vars.get(arg).cloned().unwrap_or_default();
                            self.say(format!("    {arg}={value}"));
                        }
                    }
                }
                Ok(())
            }
            "sleep" => {
                let [duration] = args else {
                    bail!("usage: sleep DURATION");
                };
                tokio::time::sleep(script::parse_duration(duration)?).await;
                Ok(())
            }
            other => bail!(
                "unknown command {other:?}; the runner knows {}",
                COMMANDS.join(", ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// An in-memory backend: `start` records the flags, `list` serves a key/value map that
    /// a test can change over time via `script`.
    #[derive(Default)]
    struct Fake {
        running: bool,
        started_with: Vec<String>,
        source: Vec<String>,
        lists: Arc<Mutex<u32>>,
        /// After the n-th `list` call (1-based), the store becomes `later`.
        switch_after: u32,
        early: Vec<(String, Vec<u8>)>,
        later: Vec<(String, Vec<u8>)>,
        /// The environment of the last `start`.
        env: BTreeMap<String, String>,
        /// Health reporters: `early_health` until `health_after` health calls, then
        /// `later_health`.
        health_calls: u32,
        health_after: u32,
        early_health: Vec<health::Report>,
        later_health: Vec<health::Report>,
    }

    impl Backend for Fake {
        async fn start(
            &mut self,
            flags: &[String],
            env: &BTreeMap<String, String>,
            source: &[String],
        ) -> anyhow::Result<()> {
            self.running = true;
            self.env = env.clone();
            self.started_with = flags.to_vec();
            self.source = source.to_vec();
            Ok(())
        }
        async fn stop(&mut self) -> anyhow::Result<()> {
            self.running = false;
            Ok(())
        }
        fn running(&self) -> bool {
            self.running
        }
        async fn list(&mut self, prefix: &str) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
            let mut n = self.lists.lock().unwrap();
            *n += 1;
            let store = if *n > self.switch_after {
                &self.later
            } else {
                &self.early
            };
            Ok(store
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .cloned()
                .collect())
        }
        async fn health(&mut self) -> anyhow::Result<Vec<health::Report>> {
            self.health_calls += 1;
            Ok(if self.health_calls > self.health_after {
                self.later_health.clone()
            } else {
                self.early_health.clone()
            })
        }
        fn diagnostics(&mut self) -> Option<String> {
            Some("fake diagnostics".into())
        }
    }

    fn kv(k: &str, v: &str) -> (String, Vec<u8>) {
        (k.to_owned(), v.as_bytes().to_vec())
    }

    fn opts(ms: u64) -> Options {
        Options {
            retry_timeout: Duration::from_millis(ms),
            verbose: false,
        }
    }

    const CONFIG: &str = r#"#! --cluster-id=3 --cluster-name=cluster3

hive/start

# Assert
kvstore/list -o json cilium/cluster-config config.actual
* cmp config.actual config.expected

# ---

-- config.expected --
# cilium/cluster-config/cluster3
{
  "id": 3
}
"#;

    #[tokio::test]
    async fn retry_reruns_the_section_until_the_listing_matches() {
        let scenario = Scenario::parse("cfg", CONFIG).unwrap();
        let mut fake = Fake {
            switch_after: 3,
            early: vec![kv("cilium/cluster-config/cluster3", r#"{"id":0}"#)],
            later: vec![kv("cilium/cluster-config/cluster3", r#"{"id":3}"#)],
            ..Fake::default()
        };
        let dir = tempfile::tempdir().unwrap();
        run(&scenario, &mut fake, dir.path(), &opts(5_000))
            .await
            .unwrap();
        assert_eq!(
            fake.started_with,
            ["--cluster-id=3", "--cluster-name=cluster3"]
        );
        // The first list, then one list per retry: the section's kvstore/list re-ran.
        assert_eq!(*fake.lists.lock().unwrap(), 4);
        assert!(!fake.running, "stopped at the end");
        let actual = std::fs::read_to_string(dir.path().join("work/config.actual")).unwrap();
        assert_eq!(
            actual,
            "# cilium/cluster-config/cluster3\n{\n  \"id\": 3\n}\n"
        );
    }

    #[tokio::test]
    async fn timeout_reports_the_last_diff_and_diagnostics() {
        let scenario = Scenario::parse("cfg", CONFIG).unwrap();
        let mut fake = Fake {
            switch_after: u32::MAX,
            early: vec![kv("cilium/cluster-config/cluster3", r#"{"id":4}"#)],
            ..Fake::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let err = run(&scenario, &mut fake, dir.path(), &opts(300))
            .await
            .unwrap_err()
            .to_string();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(
            err.contains("[cfg] line 7: `* cmp config.actual config.expected` failed"),
            "{err}"
        );
        assert!(
            err.contains("cilium/cluster-config/cluster3: expected {\"id\":3} got {\"id\":4}"),
            "{err}"
        );
        assert!(err.contains("fake diagnostics"), "{err}");
        assert!(*fake.lists.lock().unwrap() > 2, "retried");
    }

    #[tokio::test]
    async fn plain_failures_do_not_retry() {
        let scenario = Scenario::parse(
            "x",
            "hive/start\n# s\nkvstore/list p a\ncmp a b\n-- b --\n# k\n1\n",
        )
        .unwrap();
        let mut fake = Fake::default();
        let dir = tempfile::tempdir().unwrap();
        let err = run(&scenario, &mut fake, dir.path(), &opts(5_000))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("k: missing (expected 1)"), "{err}");
        assert_eq!(*fake.lists.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn file_commands_and_k8s_directory() {
        let text = r#"#! --cluster-name=c1
k8s/add ns.yaml
hive/start
# edit
cp ep.yaml ep2.yaml
replace '10.0.0.1' '10.0.0.2' ep2.yaml
* replace '10.0.0.1' '10.0.0.2' ep2.yaml
k8s/add ep2.yaml
grep -q '^    - ipv4: 10\.0\.0\.2$' ep2.yaml
! grep -q '10\.0\.0\.1' ep2.yaml
env X=ep2.yaml
grep -q 'kind: CiliumEndpoint' $X
sleep 10ms
k8s/delete ns.yaml
hive/stop
kvstore/list cilium/ none.actual
empty none.actual
empty empty.expected
-- ns.yaml --
kind: Namespace
metadata:
  name: foo
---
kind: Namespace
metadata:
  name: bar

-- ep.yaml --
kind: CiliumEndpoint
metadata:
  name: cep
  namespace: foo
status:
  networking:
    addressing:
    - ipv4: 10.0.0.1
-- empty.expected --
"#;
        let scenario = Scenario::parse("files", text).unwrap();
        let mut fake = Fake::default();
        let dir = tempfile::tempdir().unwrap();
        run(&scenario, &mut fake, dir.path(), &opts(1_000))
            .await
            .unwrap();
        let mut files: Vec<_> = std::fs::read_dir(dir.path().join("manifests"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, ["ciliumendpoint.foo.cep.yaml"]);
        let ep = std::fs::read_to_string(dir.path().join("manifests/ciliumendpoint.foo.cep.yaml"))
            .unwrap();
        assert!(ep.contains("10.0.0.2") && !ep.contains("10.0.0.1"));
    }

    #[tokio::test]
    async fn negation_and_unknown_commands() {
        let dir = tempfile::tempdir().unwrap();
        let scenario = Scenario::parse("n", "! empty f\n-- f --\n").unwrap();
        let err = run(&scenario, &mut Fake::default(), dir.path(), &opts(100))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("expected to fail"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let scenario = Scenario::parse("u", "hive/start\n\n# x\nfrobnicate --now\n").unwrap();
        let err = run(&scenario, &mut Fake::default(), dir.path(), &opts(100))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[u] line 4: `frobnicate --now` failed")
                && err.contains("unknown command \"frobnicate\"; the runner knows hive/start"),
            "{err}"
        );
    }

    const NEWER: &str = r#"#! --cluster-id=3 --cluster-name=cluster3

hive/start

# Interspersed flags, as in namespace-filtering.txtar.
kvstore/list cilium/cluster-config/cluster3 -o json config.actual
* cmp config.actual config.expected

# sed: regular expressions, an empty replacement, `$1`.
sed http "" service.yaml
sed 'port: (8[0-9]+)' 'port: 1$1' service.yaml
grep -q '^  - name: $' service.yaml
grep '^    port: 18080$' -q service.yaml
sed '"port": 8080' '"port": 9090' config.expected
grep -q '"port": 9090' config.expected
env CLUSTERMESH_DEFAULT_GLOBAL_NAMESPACE=true
hive/stop
hive/start

-- service.yaml --
spec:
  ports:
  - name: http
    port: 8080
-- config.expected --
# cilium/cluster-config/cluster3
{
  "id": 3,
  "port": 8080
}
"#;

    #[tokio::test]
    async fn interspersed_flags_sed_and_env_for_the_next_start() {
        let scenario = Scenario::parse("newer", NEWER).unwrap();
        let mut fake = Fake {
            early: vec![kv(
                "cilium/cluster-config/cluster3",
                r#"{"id":3,"port":8080}"#,
            )],
            switch_after: u32::MAX,
            ..Fake::default()
        };
        let dir = tempfile::tempdir().unwrap();
        run(&scenario, &mut fake, dir.path(), &opts(1_000))
            .await
            .unwrap();
        let service = std::fs::read_to_string(dir.path().join("work/service.yaml")).unwrap();
        assert_eq!(service, "spec:\n  ports:\n  - name: \n    port: 18080\n");
        assert_eq!(
            fake.env
                .get("CLUSTERMESH_DEFAULT_GLOBAL_NAMESPACE")
                .map(String::as_str),
            Some("true"),
            "the restarted apiserver sees the script's env"
        );
        let config = std::fs::read_to_string(dir.path().join("work/config.actual")).unwrap();
        assert!(config.starts_with("# cilium/cluster-config/cluster3\n{\n  \"id\": 3,"));

        // An invalid pattern names itself.
        let dir = tempfile::tempdir().unwrap();
        let scenario = Scenario::parse("bad", "sed '(' x f\n-- f --\n").unwrap();
        let err = run(&scenario, &mut Fake::default(), dir.path(), &opts(100))
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("sed: invalid pattern \"(\""),
            "{err:#}"
        );
    }

    fn report(name: &str, level: health::Level, reason: &str) -> health::Report {
        health::Report {
            name: name.into(),
            level,
            reason: reason.into(),
        }
    }

    #[tokio::test]
    async fn health_commands_retry_until_the_reporter_recovers() {
        let text = "hive/start\n\n# degraded first\nhealth --levels=degraded --match=serviceexport\n\n# then ok\n* health/ok --match=serviceexport\nhealth --match '^source/' --levels ok\n";
        let scenario = Scenario::parse("h", text).unwrap();
        let degraded = vec![
            report("source/manifests", health::Level::Ok, ""),
            report(
                "export/serviceexports",
                health::Level::Degraded,
                "the ServiceExport CRD is not installed",
            ),
        ];
        let mut fake = Fake {
            health_after: 3,
            early_health: degraded.clone(),
            later_health: vec![
                report("source/manifests", health::Level::Ok, ""),
                report("export/serviceexports", health::Level::Ok, ""),
            ],
            ..Fake::default()
        };
        let dir = tempfile::tempdir().unwrap();
        run(&scenario, &mut fake, dir.path(), &opts(5_000))
            .await
            .unwrap();
        assert!(fake.health_calls > 3, "health/ok was retried");

        // Never recovering fails with the reporter's reason.
        let mut fake = Fake {
            health_after: u32::MAX,
            early_health: degraded,
            ..Fake::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let err = run(&scenario, &mut fake, dir.path(), &opts(300))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 7: `* health/ok --match=serviceexport` failed")
                && err.contains(
                    "export/serviceexports: degraded (the ServiceExport CRD is not installed)"
                ),
            "{err}"
        );

        // Before hive/start there is nothing to ask.
        let dir = tempfile::tempdir().unwrap();
        let scenario = Scenario::parse("h0", "health\n").unwrap();
        let err = run(&scenario, &mut Fake::default(), dir.path(), &opts(100))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not running"), "{err}");
    }
}
