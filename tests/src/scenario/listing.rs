//! etcd listings as the scenarios write them (`# <key>` then the value) and their semantic
//! comparison.
//!
//! `cmp` compares listings, not bytes: the key lists must be identical, and values that
//! both parse as JSON are compared as JSON where a missing object field equals an explicit
//! `null`. That rule exists because Cilium versions differ on `"Mask": null` in ipcache
//! values (see the testdata README); other values are compared as text.

use serde_json::Value;

/// How `kvstore/list` renders values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The stored bytes.
    Plain,
    /// The stored JSON re-indented with two spaces, field order kept.
    Json,
}

/// Renders `entries` (sorted by key here) the way `kvstore/list` writes them.
pub fn render(entries: &mut [(String, Vec<u8>)], format: Format) -> String {
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::new();
    for (key, value) in entries.iter() {
        out.push_str("# ");
        out.push_str(key);
        out.push('\n');
        let raw = String::from_utf8_lossy(value);
        match format {
            Format::Plain => out.push_str(&raw),
            Format::Json => match indent_json(&raw) {
                Some(pretty) => out.push_str(&pretty),
                // Not JSON: show what is stored, `cmp` will report it.
                None => out.push_str(&raw),
            },
        }
        out.push('\n');
    }
    out
}

/// Re-indents JSON text with two spaces per level like Go's `json.Indent`: tokens are kept
/// verbatim (field order, number spelling, string escapes), empty `{}`/`[]` stay compact.
/// Returns `None` if `text` is not valid JSON.
pub fn indent_json(text: &str) -> Option<String> {
    serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let mut chars = text.trim().chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        for _ in 0..depth {
            out.push_str("  ");
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push('"');
                while let Some(c) = chars.next() {
                    out.push(c);
                    match c {
                        '\\' => out.extend(chars.next()),
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
                    chars.next();
                }
                out.push(c);
                if chars.peek() == Some(&close) {
                    chars.next();
                    out.push(close);
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(',');
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_ascii_whitespace() => {}
            c => out.push(c),
        }
    }
    Some(out)
}

/// One `# key` entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    /// The value text, without the newline that ends the entry.
    pub value: String,
}

/// Key used for text before the first `# ` line, so that it still takes part in `cmp`.
pub const PREAMBLE_KEY: &str = "(text before the first key)";

/// Splits a listing into entries. A line starting with `# ` starts a new entry.
pub fn parse(text: &str) -> Vec<Entry> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut preamble = String::new();
    for line in text.split_inclusive('\n') {
        let bare = line.strip_suffix('\n').unwrap_or(line);
        if let Some(key) = bare.strip_prefix("# ") {
            entries.push(Entry {
                key: key.to_owned(),
                value: String::new(),
            });
        } else if let Some(entry) = entries.last_mut() {
            entry.value.push_str(line);
        } else {
            preamble.push_str(line);
        }
    }
    for entry in &mut entries {
        if entry.value.ends_with('\n') {
            entry.value.pop();
        }
    }
    if !preamble.trim().is_empty() {
        entries.insert(
            0,
            Entry {
                key: PREAMBLE_KEY.to_owned(),
                value: preamble,
            },
        );
    }
    entries
}

/// JSON equality where a missing object field equals an explicit `null`.
pub fn json_eq(a: &Value, b: &Value) -> bool {
    json_diff("", a, b).is_none()
}

/// First difference between `expected` and `got` as `<path>: expected X got Y`.
fn json_diff(path: &str, expected: &Value, got: &Value) -> Option<String> {
    match (expected, got) {
        (Value::Object(e), Value::Object(g)) => {
            let mut keys: Vec<&String> = e.keys().chain(g.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let ev = e.get(k).unwrap_or(&Value::Null);
                let gv = g.get(k).unwrap_or(&Value::Null);
                json_diff(&format!("{path}.{k}"), ev, gv)
            })
        }
        (Value::Array(e), Value::Array(g)) if e.len() == g.len() => e
            .iter()
            .zip(g)
            .enumerate()
            .find_map(|(i, (ev, gv))| json_diff(&format!("{path}[{i}]"), ev, gv)),
        _ if expected == got => None,
        _ => Some(format!(
            "{}: expected {} got {}",
            if path.is_empty() { "." } else { path },
            expected,
            got
        )),
    }
}

fn compact(text: &str) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(v) => v.to_string(),
        Err(_) => format!("{text:?}"),
    }
}

/// Compares an actual listing with an expected one. On mismatch returns one line per
/// difference: `key: expected <...> got <...>`, `key: missing ...`, `key: unexpected ...`.
pub fn compare(actual: &str, expected: &str) -> Result<(), Vec<String>> {
    let got = parse(actual);
    let want = parse(expected);
    let mut diffs = Vec::new();
    for w in &want {
        if !got.iter().any(|g| g.key == w.key) {
            diffs.push(format!(
                "{}: missing (expected {})",
                w.key,
                compact(&w.value)
            ));
        }
    }
    for g in &got {
        if !want.iter().any(|w| w.key == g.key) {
            diffs.push(format!("{}: unexpected (got {})", g.key, compact(&g.value)));
        }
    }
    for w in &want {
        let Some(g) = got.iter().find(|g| g.key == w.key) else {
            continue;
        };
        let parsed = (
            serde_json::from_str::<Value>(&w.value),
            serde_json::from_str::<Value>(&g.value),
        );
        match parsed {
            (Ok(wv), Ok(gv)) => {
                if let Some(detail) = json_diff("", &wv, &gv) {
                    diffs.push(format!(
                        "{}: expected {} got {} (first difference at {detail})",
                        w.key, wv, gv
                    ));
                }
            }
            _ => {
                if w.value != g.value {
                    diffs.push(format!(
                        "{}: expected {:?} got {:?}",
                        w.key, w.value, g.value
                    ));
                }
            }
        }
    }
    if diffs.is_empty() {
        let got_keys: Vec<&str> = got.iter().map(|e| e.key.as_str()).collect();
        let want_keys: Vec<&str> = want.iter().map(|e| e.key.as_str()).collect();
        if got_keys != want_keys {
            diffs.push(format!(
                "key order differs: expected {want_keys:?} got {got_keys:?}"
            ));
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const EXPECTED_WITH_MASK: &str = r#"# cilium/state/ip/v1/default/10.244.1.79
{
  "IP": "10.244.1.79",
  "Mask": null,
  "HostIP": "172.18.0.3",
  "ID": 199472
}
"#;

    #[test]
    fn render_indents_like_go_and_keeps_field_order() {
        let mut entries = vec![
            (
                "cilium/cluster-config/b".to_owned(),
                br#"{"id":3,"capabilities":{"syncedCanaries":true,"x":[],"y":{},"z":[1,{"a":"b\"c,:{"}]}}"#
                    .to_vec(),
            ),
            ("cilium/a".to_owned(), b"plain;value;".to_vec()),
        ];
        let out = render(&mut entries, Format::Json);
        assert_eq!(
            out,
            r#"# cilium/a
plain;value;
# cilium/cluster-config/b
{
  "id": 3,
  "capabilities": {
    "syncedCanaries": true,
    "x": [],
    "y": {},
    "z": [
      1,
      {
        "a": "b\"c,:{"
      }
    ]
  }
}
"#
        );
        let out = render(&mut entries, Format::Plain);
        assert!(out.starts_with(
            "# cilium/a\nplain;value;\n# cilium/cluster-config/b\n{\"id\":3,\"capabilities\""
        ));
        assert_eq!(render(&mut [], Format::Json), "");
    }

    #[test]
    fn parse_entries() {
        let e = parse("# a\nx;\n# b\n{\n  \"k\": 1\n}\n# c\n");
        assert_eq!(e.len(), 3);
        assert_eq!(
            e[0],
            Entry {
                key: "a".into(),
                value: "x;".into()
            }
        );
        assert_eq!(e[1].value, "{\n  \"k\": 1\n}");
        assert_eq!(e[2].value, "");
        assert!(parse("").is_empty());
        assert_eq!(parse("junk\n# a\n1\n")[0].key, PREAMBLE_KEY);
    }

    #[test]
    fn missing_field_equals_null() {
        assert!(json_eq(
            &json!({"IP": "a", "Mask": null}),
            &json!({"IP": "a"})
        ));
        assert!(json_eq(
            &json!({"IP": "a"}),
            &json!({"IP": "a", "Mask": null})
        ));
        assert!(json_eq(&json!({"a": [{"b": null}]}), &json!({"a": [{}]})));
        assert!(!json_eq(&json!({"Mask": "////AA=="}), &json!({})));
        assert!(!json_eq(&json!({"a": [1]}), &json!({"a": [1, 2]})));
        assert!(!json_eq(&json!({"a": 1}), &json!({"a": "1"})));
    }

    #[test]
    fn mask_rule_makes_both_upstream_formats_equal() {
        let actual = "# cilium/state/ip/v1/default/10.244.1.79\n{\"IP\":\"10.244.1.79\",\"HostIP\":\"172.18.0.3\",\"ID\":199472}\n";
        assert_eq!(compare(actual, EXPECTED_WITH_MASK), Ok(()));
    }

    #[test]
    fn field_order_and_whitespace_do_not_matter_but_values_do() {
        let actual = "# k\n{\"b\": 2, \"a\": 1}\n";
        assert_eq!(
            compare(actual, "# k\n{\n  \"a\": 1,\n  \"b\": 2\n}\n"),
            Ok(())
        );
        let diffs = compare(actual, "# k\n{\"a\": 1, \"b\": 3}\n").unwrap_err();
        assert_eq!(diffs.len(), 1);
        assert!(
            diffs[0].starts_with("k: expected {\"a\":1,\"b\":3} got {\"a\":1,\"b\":2}"),
            "{diffs:?}"
        );
        assert!(diffs[0].contains(".b: expected 3 got 2"), "{diffs:?}");
    }

    #[test]
    fn key_lists_must_match() {
        let diffs = compare("# a\n1\n# c\n3\n", "# a\n1\n# b\n2\n").unwrap_err();
        assert_eq!(diffs, ["b: missing (expected 2)", "c: unexpected (got 3)"]);
        let diffs = compare("# b\n1\n# a\n1\n", "# a\n1\n# b\n1\n").unwrap_err();
        assert!(diffs[0].starts_with("key order differs"), "{diffs:?}");
        assert_eq!(compare("", ""), Ok(()));
        assert!(compare("# a\n1\n", "").is_err());
    }

    #[test]
    fn text_values_compare_as_text() {
        let id = "# cilium/state/identities/v1/id/1\nk8s:app=baz;\n";
        assert_eq!(compare(id, id), Ok(()));
        let diffs = compare(id, "# cilium/state/identities/v1/id/1\nk8s:app=fred;\n").unwrap_err();
        assert_eq!(
            diffs,
            [r#"cilium/state/identities/v1/id/1: expected "k8s:app=fred;" got "k8s:app=baz;""#]
        );
    }
}
