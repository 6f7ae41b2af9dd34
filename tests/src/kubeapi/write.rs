//! Writes over HTTP: server-side apply and delete, with minimal but honest `managedFields`.
//!
//! Apply: the object is created from the applied configuration, or the configuration is
//! merged into the stored object (maps merge key by key; lists and scalars replace), after
//! removing the fields this field manager applied last time and no longer applies. Each
//! manager's fields are kept as FieldsV1 in `metadata.managedFields`, so the removal works
//! across requests exactly as the stored object says. Conflicts between managers are not
//! detected (every writer here forces).

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use super::{Shared, State, Write, KINDS};

type Path = Vec<String>;

/// Leaf paths of an applied configuration: a non-empty map is descended, anything else
/// (scalars, lists, empty maps) is one field.
fn leaf_paths(v: &Map<String, Value>, prefix: &mut Path, out: &mut BTreeSet<Path>) {
    for (k, child) in v {
        prefix.push(k.clone());
        match child {
            Value::Object(m) if !m.is_empty() => leaf_paths(m, prefix, out),
            _ => {
                out.insert(prefix.clone());
            }
        }
        prefix.pop();
    }
}

/// The paths a manager owns: everything it applied except identity (apiVersion, kind,
/// metadata.name/namespace) and server-managed metadata.
fn owned_paths(applied: &Value) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    if let Some(m) = applied.as_object() {
        leaf_paths(m, &mut Vec::new(), &mut out);
    }
    out.retain(|p| {
        let s: Vec<&str> = p.iter().map(String::as_str).collect();
        !matches!(
            s.as_slice(),
            ["apiVersion"]
                | ["kind"]
                | ["metadata", "name"]
                | ["metadata", "namespace"]
                | ["metadata", "managedFields", ..]
                | ["metadata", "resourceVersion"]
                | ["metadata", "uid"]
                | ["metadata", "creationTimestamp"]
        )
    });
    out
}

/// FieldsV1 (`{"f:data": {"f:key": {}}}`) of a set of paths.
fn fields_v1(paths: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut cur = &mut root;
        for k in p {
            let entry = cur
                .entry(format!("f:{k}"))
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(next) = entry else {
                break;
            };
            cur = next;
        }
    }
    Value::Object(root)
}

/// The paths of a FieldsV1 value (leaves are empty maps).
fn parse_fields_v1(v: &Value, prefix: &mut Path, out: &mut BTreeSet<Path>) {
    let Some(m) = v.as_object() else { return };
    for (k, child) in m {
        let Some(k) = k.strip_prefix("f:") else {
            continue;
        };
        prefix.push(k.to_string());
        match child.as_object() {
            Some(c) if !c.is_empty() => parse_fields_v1(child, prefix, out),
            _ => {
                out.insert(prefix.clone());
            }
        }
        prefix.pop();
    }
}

/// Removes the field at `path` and then every map on the way that became empty.
fn remove_path(obj: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(m) = obj.as_object_mut() else { return };
    if rest.is_empty() {
        m.remove(first);
        return;
    }
    if let Some(child) = m.get_mut(first) {
        remove_path(child, rest);
        if child.as_object().is_some_and(Map::is_empty) {
            m.remove(first);
        }
    }
}

fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (into, from) => *into = from.clone(),
    }
}

fn managed_entry(manager: &str, api_version: &str, paths: &BTreeSet<Path>) -> Value {
    json!({
        "manager": manager,
        "operation": "Apply",
        "apiVersion": api_version,
        "fieldsType": "FieldsV1",
        "fieldsV1": fields_v1(paths),
    })
}

/// An error a real server would answer with (code, reason, message).
pub(crate) type Refusal = (u16, &'static str, String);

impl Shared {
    /// Server-side apply of `applied` to kind `ki` `ns/name` by `manager`. Returns the
    /// resulting object (as stored, or as it would be with `dry_run`).
    pub(crate) fn server_side_apply(
        &self,
        ki: usize,
        ns: &str,
        name: &str,
        mut applied: Value,
        manager: &str,
        dry_run: bool,
    ) -> Result<Value, Refusal> {
        let kd = KINDS[ki];
        let bad = |m: String| (400u16, "BadRequest", m);
        if applied.get("kind").and_then(Value::as_str) != Some(kd.kind)
            || applied.get("apiVersion").and_then(Value::as_str) != Some(&kd.api_version())
        {
            return Err(bad(format!(
                "the applied object must have apiVersion {} and kind {}",
                kd.api_version(),
                kd.kind
            )));
        }
        if applied["metadata"]["name"].as_str() != Some(name) {
            return Err(bad(format!(
                "the name of the object ({:?}) does not match the name in the URL ({name:?})",
                applied["metadata"]["name"]
            )));
        }
        if kd.namespaced {
            match applied["metadata"]["namespace"].as_str() {
                None => applied["metadata"]["namespace"] = json!(ns),
                Some(n) if n == ns => {}
                Some(n) => {
                    return Err(bad(format!(
                        "the namespace of the object ({n}) does not match the namespace in the URL ({ns})"
                    )))
                }
            }
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let key = (ns.to_string(), name.to_string());
        let old = st.objects[ki].get(&key).cloned();
        let new_paths = owned_paths(&applied);
        let mut merged = match &old {
            None => {
                json!({"apiVersion": kd.api_version(), "kind": kd.kind, "metadata": {"name": name}})
            }
            Some(o) => (**o).clone(),
        };
        if kd.namespaced {
            merged["metadata"]["namespace"] = json!(ns);
        }
        // The manager's previous fields that it no longer applies go away.
        let mut entries: Vec<Value> = merged["metadata"]["managedFields"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut previous = BTreeSet::new();
        entries.retain(|e| {
            if e["manager"].as_str() == Some(manager) && e["operation"] == "Apply" {
                parse_fields_v1(&e["fieldsV1"], &mut Vec::new(), &mut previous);
                false
            } else {
                true
            }
        });
        for p in previous.difference(&new_paths) {
            remove_path(&mut merged, p);
        }
        if let Some(m) = applied["metadata"].as_object_mut() {
            m.remove("managedFields");
            m.remove("resourceVersion");
        }
        merge(&mut merged, &applied);
        entries.push(managed_entry(manager, &kd.api_version(), &new_paths));
        merged["metadata"]["managedFields"] = Value::Array(entries);
        let op = match &old {
            None => "created",
            Some(o) => {
                let mut a = (**o).clone();
                let mut b = merged.clone();
                for v in [&mut a, &mut b] {
                    if let Some(m) = v["metadata"].as_object_mut() {
                        m.remove("resourceVersion");
                    }
                }
                if a == b {
                    "unchanged"
                } else {
                    "configured"
                }
            }
        };
        st.writes.push(Write {
            op,
            kind: kd.kind.into(),
            namespace: ns.into(),
            name: name.into(),
            dry_run,
        });
        if dry_run || op == "unchanged" {
            return Ok(old
                .map(|o| (*o).clone())
                .filter(|_| op == "unchanged")
                .unwrap_or(merged));
        }
        self.apply_locked(&mut st, merged)
            .map_err(|e| (422u16, "Invalid", e.to_string()))?;
        Ok(st.objects[ki]
            .get(&key)
            .map(|o| (**o).clone())
            .unwrap_or(Value::Null))
    }

    /// Deletes `ns/name` of kind `ki`; the deleted object, or `None` if there was none.
    pub(crate) fn delete_over_http(
        &self,
        ki: usize,
        ns: &str,
        name: &str,
        dry_run: bool,
    ) -> Option<Value> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let key = (ns.to_string(), name.to_string());
        let old = st.objects[ki].get(&key).map(|o| (**o).clone());
        st.writes.push(Write {
            op: if old.is_some() { "deleted" } else { "absent" },
            kind: KINDS[ki].kind.into(),
            namespace: ns.into(),
            name: name.into(),
            dry_run,
        });
        if old.is_some() && !dry_run {
            self.delete_locked(&mut st, ki, ns, name);
        }
        old
    }
}

/// Whether `State` forbids `verb` on a kind (the RBAC check of every request).
pub(crate) fn forbidden(st: &State, group: &str, plural: &str, verb: &str) -> bool {
    match st.forbidden.get(&(group.to_string(), plural.to_string())) {
        None => false,
        Some(None) => true,
        Some(Some(verbs)) => verbs.contains(verb),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_v1_round_trips_and_removal_prunes() {
        let applied = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "x", "labels": {"a": "1"}}, "data": {"k1": "v", "k2": "w"}});
        let paths = owned_paths(&applied);
        let mut back = BTreeSet::new();
        parse_fields_v1(&fields_v1(&paths), &mut Vec::new(), &mut back);
        assert_eq!(paths, back);
        let mut obj = applied.clone();
        remove_path(&mut obj, &["data".into(), "k1".into()]);
        remove_path(&mut obj, &["data".into(), "k2".into()]);
        assert!(obj.get("data").is_none(), "{obj}");
    }
}
