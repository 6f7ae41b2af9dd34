//! Command flags the way Cilium's script engine reads them (Go's `flag`/pflag): a flag may
//! come before, between or after the positional arguments
//! (`kvstore/list cilium/cluster-config/cluster3 -o json out` is
//! `kvstore/list -o json cilium/cluster-config/cluster3 out`).
//!
//! Only commands that declare flags are parsed this way; the arguments of the others
//! (`replace`, `sed`, `cp`, ...) are taken as written, so a pattern that starts with `-`
//! stays a pattern there. `--` ends the flags; a lone `-` is positional.

use std::collections::BTreeMap;

use anyhow::bail;

/// One flag a command accepts.
#[derive(Debug, Clone, Copy)]
pub struct Flag {
    /// Every spelling without dashes (`["o", "output"]`); each is accepted with one or two
    /// dashes, as Go's `flag` package does. The first is the name results are stored under.
    pub names: &'static [&'static str],
    /// Whether the flag takes a value (`-o json`, `-o=json`); otherwise it is a switch.
    pub takes_value: bool,
}

/// The parsed arguments of one command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// Flag (by its first name) → value; switches map to `"true"`. A repeated flag keeps
    /// the last value, as in Go.
    pub flags: BTreeMap<&'static str, String>,
    /// The positional arguments, in order.
    pub positional: Vec<String>,
}

impl Parsed {
    /// The value of a flag, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.flags.get(name).map(String::as_str)
    }

    /// Whether a switch was given.
    pub fn has(&self, name: &str) -> bool {
        self.flags.contains_key(name)
    }
}

/// Splits `args` (without the command name) into flags and positional arguments.
pub fn parse(command: &str, args: &[String], spec: &[Flag]) -> anyhow::Result<Parsed> {
    let mut parsed = Parsed::default();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--" {
            parsed.positional.extend(iter.by_ref().cloned());
            break;
        }
        let Some(body) = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-'))
            .filter(|b| !b.is_empty())
        else {
            parsed.positional.push(arg.clone());
            continue;
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let Some(flag) = spec.iter().find(|f| f.names.contains(&name)) else {
            let known: Vec<String> = spec.iter().map(|f| format!("-{}", f.names[0])).collect();
            if known.is_empty() {
                bail!("{command}: unknown flag {arg:?} ({command} takes no flags)");
            }
            bail!(
                "{command}: unknown flag {arg:?} (known: {})",
                known.join(", ")
            );
        };
        let value = match (flag.takes_value, inline) {
            (true, Some(v)) => v.to_owned(),
            (true, None) => match iter.next() {
                Some(v) => v.clone(),
                None => bail!("{command}: flag {arg:?} needs a value"),
            },
            (false, None) => "true".to_owned(),
            (false, Some(v)) => match v {
                "true" | "1" | "t" | "T" | "TRUE" | "True" => "true".to_owned(),
                "false" | "0" | "f" | "F" | "FALSE" | "False" => "false".to_owned(),
                _ => bail!("{command}: flag {arg:?}: {v:?} is not a boolean"),
            },
        };
        parsed.flags.insert(flag.names[0], value);
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &[Flag] = &[Flag {
        names: &["o", "output"],
        takes_value: true,
    }];
    const GREP: &[Flag] = &[Flag {
        names: &["q"],
        takes_value: false,
    }];

    fn args(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn flags_anywhere() {
        for line in [
            "-o json cilium/cluster-config/cluster3 out",
            "cilium/cluster-config/cluster3 -o json out",
            "cilium/cluster-config/cluster3 out -o json",
            "cilium/cluster-config/cluster3 out --output=json",
            "-o=plain cilium/cluster-config/cluster3 out --o json",
        ] {
            let p = parse("kvstore/list", &args(line), LIST).unwrap();
            assert_eq!(p.get("o"), Some("json"), "{line}");
            assert_eq!(
                p.positional,
                ["cilium/cluster-config/cluster3", "out"],
                "{line}"
            );
        }
    }

    #[test]
    fn switches_double_dash_and_errors() {
        let p = parse("grep", &args("pat -q file"), GREP).unwrap();
        assert!(p.has("q"));
        assert_eq!(p.positional, ["pat", "file"]);
        let p = parse("grep", &args("-q -- -pat file"), GREP).unwrap();
        assert_eq!(p.positional, ["-pat", "file"]);
        let p = parse("grep", &args("- file"), GREP).unwrap();
        assert_eq!(p.positional, ["-", "file"]);
        assert_eq!(
            parse("grep", &args("-q=false p f"), GREP).unwrap().get("q"),
            Some("false")
        );

        let e = parse("kvstore/list", &args("p out -x"), LIST).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"kvstore/list: unknown flag "-x" (known: -o)"#
        );
        let e = parse("kvstore/list", &args("p out -o"), LIST).unwrap_err();
        assert_eq!(e.to_string(), r#"kvstore/list: flag "-o" needs a value"#);
        let e = parse("grep", &args("-q=maybe p f"), GREP).unwrap_err();
        assert!(e.to_string().contains("not a boolean"), "{e}");
        let e = parse("cp", &args("-r a b"), &[]).unwrap_err();
        assert!(e.to_string().contains("cp takes no flags"), "{e}");
    }
}
