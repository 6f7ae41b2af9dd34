//! `health` and `health/ok`: the running process's health reporters, matched the way
//! Cilium's script commands match its hive's module and job reporters.
//!
//! A reporter is a named component (a source watcher, an export job, a KVStoreMesh remote)
//! with a level and a reason; the apiserver lists them under `health` in `/status`. This
//! module only decides whether a set of reports satisfies a command; fetching them is the
//! backend's job.

use anyhow::{bail, Context as _};
use regex::Regex;
use serde::Deserialize;

use super::flags::{self, Flag};

/// A reporter's level, as the apiserver reports it (lowercase in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Degraded,
    Stopped,
}

impl Level {
    fn parse(text: &str) -> anyhow::Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "ok" => Ok(Level::Ok),
            "degraded" => Ok(Level::Degraded),
            "stopped" => Ok(Level::Stopped),
            other => bail!("unknown health level {other:?} (ok, degraded or stopped)"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Degraded => "degraded",
            Level::Stopped => "stopped",
        }
    }
}

/// One reporter's state.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Report {
    /// Component name, e.g. `export/serviceexports`.
    pub name: String,
    pub level: Level,
    /// Why it is at that level (empty when ok).
    #[serde(default)]
    pub reason: String,
}

fn show(reports: &[&Report]) -> String {
    reports
        .iter()
        .map(|r| {
            if r.reason.is_empty() {
                format!("{}: {}", r.name, r.level.name())
            } else {
                format!("{}: {} ({})", r.name, r.level.name(), r.reason)
            }
        })
        .collect::<Vec<_>>()
        .join("\n  ")
}

const HEALTH_FLAGS: &[Flag] = &[
    Flag {
        names: &["levels"],
        takes_value: true,
    },
    Flag {
        names: &["match"],
        takes_value: true,
    },
];

/// What a `health` or `health/ok` line asks for.
#[derive(Debug, Clone)]
pub struct Query {
    /// `health/ok`: every matching reporter must be ok. `health`: some matching reporter
    /// must be at one of `levels`.
    all_ok: bool,
    levels: Vec<Level>,
    pattern: Option<Regex>,
}

impl Query {
    /// Parses the arguments of `command` (`health` or `health/ok`).
    pub fn parse(command: &str, args: &[String]) -> anyhow::Result<Self> {
        let all_ok = command == "health/ok";
        let spec = if all_ok {
            &HEALTH_FLAGS[1..]
        } else {
            HEALTH_FLAGS
        };
        let parsed = flags::parse(command, args, spec)?;
        if !parsed.positional.is_empty() {
            bail!(
                "usage: {command} {}[--match=REGEX] (unexpected {:?})",
                if all_ok {
                    ""
                } else {
                    "[--levels=ok,degraded,stopped] "
                },
                parsed.positional
            );
        }
        let levels = match parsed.get("levels") {
            Some(list) => list
                .split(',')
                .filter(|l| !l.trim().is_empty())
                .map(Level::parse)
                .collect::<anyhow::Result<Vec<_>>>()?,
            None => vec![Level::Ok, Level::Degraded, Level::Stopped],
        };
        let pattern = parsed
            .get("match")
            .map(|p| Regex::new(p).with_context(|| format!("{command}: invalid --match {p:?}")))
            .transpose()?;
        Ok(Self {
            all_ok,
            levels,
            pattern,
        })
    }

    /// Succeeds when `reports` satisfy the query; the error lists what was seen.
    pub fn check(&self, reports: &[Report]) -> anyhow::Result<()> {
        let matching: Vec<&Report> = reports
            .iter()
            .filter(|r| self.pattern.as_ref().is_none_or(|p| p.is_match(&r.name)))
            .collect();
        let filter = self
            .pattern
            .as_ref()
            .map(|p| format!(" matching {:?}", p.as_str()))
            .unwrap_or_default();
        if matching.is_empty() {
            // A typo in --match must not pass as "nothing is unhealthy".
            let all: Vec<&Report> = reports.iter().collect();
            bail!(
                "no health reporter{filter}; reporters:\n  {}",
                if all.is_empty() {
                    "(none)".to_owned()
                } else {
                    show(&all)
                }
            );
        }
        if self.all_ok {
            let bad: Vec<&Report> = matching
                .iter()
                .copied()
                .filter(|r| r.level != Level::Ok)
                .collect();
            if !bad.is_empty() {
                bail!("health reporters{filter} not ok:\n  {}", show(&bad));
            }
        } else if !matching.iter().any(|r| self.levels.contains(&r.level)) {
            let wanted: Vec<&str> = self.levels.iter().map(|l| l.name()).collect();
            bail!(
                "no health reporter{filter} is {}:\n  {}",
                wanted.join(" or "),
                show(&matching)
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reports() -> Vec<Report> {
        serde_json::from_str(
            r#"[
              {"name": "source/manifests", "level": "ok"},
              {"name": "export/serviceexports", "level": "degraded",
               "reason": "the ServiceExport CRD is not installed"},
              {"name": "kvstoremesh/cluster2", "level": "stopped", "reason": "removed"}
            ]"#,
        )
        .unwrap()
    }

    fn check(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Query::parse(cmd, &args)?.check(&reports())
    }

    #[test]
    fn health_levels_and_match() {
        check("health", &[]).unwrap();
        check("health", &["--levels=degraded", "--match=serviceexport"]).unwrap();
        check("health", &["--match", "^source/", "--levels", "ok"]).unwrap();
        let e = check("health", &["--levels=ok", "--match=serviceexport"]).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("no health reporter matching \"serviceexport\" is ok")
                && text.contains(
                    "export/serviceexports: degraded (the ServiceExport CRD is not installed)"
                ),
            "{text}"
        );
        assert!(check("health", &["--levels=bad"]).is_err());
        assert!(check("health", &["--match=("]).is_err());
        assert!(check("health", &["extra"]).is_err());
    }

    #[test]
    fn health_ok_needs_every_match_ok_and_some_match() {
        check("health/ok", &["--match=source"]).unwrap();
        let e = check("health/ok", &[]).unwrap_err().to_string();
        assert!(
            e.contains("export/serviceexports: degraded")
                && e.contains("kvstoremesh/cluster2: stopped"),
            "{e}"
        );
        let e = check("health/ok", &["--match=nothing-like-this"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no health reporter matching"), "{e}");
        // health/ok has no --levels.
        assert!(check("health/ok", &["--levels=ok"]).is_err());
    }
}
