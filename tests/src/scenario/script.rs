//! The scenario script: `#!` flags, commands, sections and argument quoting.

use std::collections::BTreeMap;

use anyhow::{bail, Context as _};

/// One piece of an argument: quoted text is never expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Plain(String),
    Quoted(String),
}

/// One argument as written, before `$VAR` expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word(Vec<Part>);

impl Word {
    /// The argument with `$NAME` / `${NAME}` in unquoted parts replaced from `vars`.
    /// Unknown variables expand to the empty string, like a shell; a `$` not followed by a
    /// name stays literal.
    pub fn expand(&self, vars: &BTreeMap<String, String>) -> String {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Quoted(s) => out.push_str(s),
                Part::Plain(s) => expand_into(s, vars, &mut out),
            }
        }
        out
    }

    /// The argument without expansion (used for `#!` flags and display).
    pub fn literal(&self) -> String {
        self.expand(&BTreeMap::new())
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn expand_into(s: &str, vars: &BTreeMap<String, String>, out: &mut String) {
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(braced) = after.strip_prefix('{') {
            if let Some(end) = braced.find('}') {
                out.push_str(vars.get(&braced[..end]).map_or("", String::as_str));
                rest = &braced[end + 1..];
                continue;
            }
        }
        let len = after.find(|c| !is_name_char(c)).unwrap_or(after.len());
        if len == 0 {
            out.push('$');
        } else {
            out.push_str(vars.get(&after[..len]).map_or("", String::as_str));
        }
        rest = &after[len..];
    }
    out.push_str(rest);
}

/// Splits a script line into arguments. Arguments are separated by spaces or tabs; single
/// quotes keep spaces, and `''` inside quotes is a literal quote; double quotes keep spaces
/// too (their text is still expanded) and `""` is an empty argument.
pub fn split_args(line: &str) -> anyhow::Result<Vec<Word>> {
    let mut words = Vec::new();
    let mut parts: Vec<Part> = Vec::new();
    let mut plain = String::new();
    let mut started = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if started {
                    if !plain.is_empty() {
                        parts.push(Part::Plain(std::mem::take(&mut plain)));
                    }
                    words.push(Word(std::mem::take(&mut parts)));
                    started = false;
                }
            }
            '\'' => {
                started = true;
                if !plain.is_empty() {
                    parts.push(Part::Plain(std::mem::take(&mut plain)));
                }
                let mut quoted = String::new();
                loop {
                    match chars.next() {
                        None => bail!("unterminated quoted argument in {line:?}"),
                        Some('\'') if chars.peek() == Some(&'\'') => {
                            chars.next();
                            quoted.push('\'');
                        }
                        Some('\'') => break,
                        Some(c) => quoted.push(c),
                    }
                }
                parts.push(Part::Quoted(quoted));
            }
            '"' => {
                // Double quotes keep spaces together but still expand `$VAR`; `""` is an
                // empty argument (`sed http "" service.yaml`).
                started = true;
                loop {
                    match chars.next() {
                        None => bail!("unterminated double-quoted argument in {line:?}"),
                        Some('"') => break,
                        Some(c) => plain.push(c),
                    }
                }
            }
            c => {
                started = true;
                plain.push(c);
            }
        }
    }
    if started {
        if !plain.is_empty() {
            parts.push(Part::Plain(plain));
        }
        words.push(Word(parts));
    }
    Ok(words)
}

/// One command line of the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// 1-based line number in the scenario file.
    pub line: usize,
    /// The line as written (trimmed), for progress output.
    pub text: String,
    /// `* ` prefix: on failure, re-run the section up to here until it passes or times out.
    pub retry: bool,
    /// `! ` prefix: the command is expected to fail.
    pub negate: bool,
    /// Index (into [`Script::commands`]) of the first command of this command's section.
    pub section_start: usize,
    /// Command name followed by its arguments (unexpanded).
    pub args: Vec<Word>,
}

impl Command {
    /// The command name (first argument).
    pub fn name(&self) -> String {
        self.args.first().map(Word::literal).unwrap_or_default()
    }
}

/// A parsed script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    /// Flags from the `#!` line, passed to the apiserver verbatim.
    pub flags: Vec<String>,
    pub commands: Vec<Command>,
}

/// Parses the script part of a scenario. `#` lines are comments and start a new section;
/// the `#!` line (anywhere before the first command, normally line 1) carries the flags.
pub fn parse(text: &str) -> anyhow::Result<Script> {
    let mut flags = Vec::new();
    let mut commands: Vec<Command> = Vec::new();
    let mut section_start = 0;
    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("#!") {
            if !commands.is_empty() {
                bail!("line {line_no}: `#!` flags must come before the first command");
            }
            flags = split_args(rest)
                .with_context(|| format!("line {line_no}"))?
                .iter()
                .map(Word::literal)
                .collect();
            continue;
        }
        if line.starts_with('#') {
            section_start = commands.len();
            continue;
        }
        let mut args = split_args(line).with_context(|| format!("line {line_no}"))?;
        let mut retry = false;
        let mut negate = false;
        while let Some(first) = args.first().map(Word::literal) {
            match first.as_str() {
                "*" if !retry => retry = true,
                "!" if !negate => negate = true,
                _ => break,
            }
            args.remove(0);
        }
        if args.is_empty() {
            bail!("line {line_no}: prefix without a command");
        }
        commands.push(Command {
            line: line_no,
            text: line.to_owned(),
            retry,
            negate,
            section_start,
            args,
        });
    }
    Ok(Script { flags, commands })
}

/// Parses a Go-style duration such as `100ms`, `1.5s`, `2m`, `1m30s`.
pub fn parse_duration(s: &str) -> anyhow::Result<std::time::Duration> {
    let mut rest = s.trim();
    if rest == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if rest.is_empty() {
        bail!("empty duration");
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..num_len]
            .parse()
            .with_context(|| format!("invalid duration {s:?}"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            unit => bail!("invalid duration {s:?}: unknown unit {unit:?}"),
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    Ok(std::time::Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lits(line: &str) -> Vec<String> {
        split_args(line)
            .unwrap()
            .iter()
            .map(Word::literal)
            .collect()
    }

    #[test]
    fn quoting() {
        assert_eq!(
            lits("replace 'ipv6:' '# ipv6:' f"),
            ["replace", "ipv6:", "# ipv6:", "f"]
        );
        assert_eq!(lits("a  'b c'\t d"), ["a", "b c", "d"]);
        assert_eq!(lits("x 'it''s' ''"), ["x", "it's", ""]);
        assert_eq!(lits("pre'mid dle'post"), ["premid dlepost"]);
        assert_eq!(
            lits("grep -q '^# cilium/synced/cluster3/cilium/state/ip/v1$' synced.actual"),
            [
                "grep",
                "-q",
                "^# cilium/synced/cluster3/cilium/state/ip/v1$",
                "synced.actual"
            ]
        );
        assert!(split_args("a 'b").is_err());
        assert_eq!(
            lits(r#"sed http "" service.yaml"#),
            ["sed", "http", "", "service.yaml"]
        );
        assert_eq!(
            lits(r#"sed '"name": "http"' '"name": ""' f"#),
            ["sed", r#""name": "http""#, r#""name": """#, "f"]
        );
        assert_eq!(lits(r#"a "b c"d"#), ["a", "b cd"]);
        assert!(split_args(r#"a "b"#).is_err());
    }

    #[test]
    fn expansion_only_outside_quotes() {
        let vars = BTreeMap::from([("WORK".to_owned(), "/w".to_owned())]);
        let words = split_args(r#"$WORK/a ${WORK}b '$WORK' $ x$ $NOPE. "$WORK c""#).unwrap();
        let got: Vec<_> = words.iter().map(|w| w.expand(&vars)).collect();
        assert_eq!(got, ["/w/a", "/wb", "$WORK", "$", "x$", ".", "/w c"]);
    }

    #[test]
    fn sections_flags_and_prefixes() {
        let s = parse(
            "#! --cluster-id=3 --cluster-name=cluster3\n\nhive/start\n\n# wait\nreplace a b f\nkvstore/list -o json p x.actual\n* cmp x.actual x.expected\n! empty x.actual\n# ---\n\n",
        )
        .unwrap();
        assert_eq!(s.flags, ["--cluster-id=3", "--cluster-name=cluster3"]);
        assert_eq!(s.commands.len(), 5);
        assert_eq!(s.commands[0].line, 3);
        assert_eq!(s.commands[0].section_start, 0);
        let cmp = &s.commands[3];
        assert_eq!((cmp.line, cmp.retry, cmp.negate), (8, true, false));
        assert_eq!(cmp.section_start, 1);
        assert_eq!(cmp.name(), "cmp");
        assert_eq!(cmp.text, "* cmp x.actual x.expected");
        assert!(s.commands[4].negate && !s.commands[4].retry);
        assert!(parse("*\n").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
