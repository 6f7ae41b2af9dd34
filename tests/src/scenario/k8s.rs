//! The apiserver's "Kubernetes API": a directory with one YAML file per object.
//!
//! Each object lives in `<kind>.<namespace-or-_>.<name>.yaml` (lowercase kind). Files are
//! written atomically (a `.tmp-*` dotfile, which the apiserver ignores, then a rename) so
//! the watcher never sees half an object.

use std::path::Path;

use anyhow::{bail, Context as _};

/// Kinds without a namespace; their file names use `_`.
const CLUSTER_SCOPED: &[&str] = &[
    "namespace",
    "node",
    "ciliumnode",
    "ciliumidentity",
    "ciliumendpointslice",
    "customresourcedefinition",
    "ciliumexternalworkload",
    "clusterrole",
    "clusterrolebinding",
];

/// One Kubernetes object of a manifest file, with its raw text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// `<kind>.<namespace-or-_>.<name>.yaml`
    pub file_name: String,
    /// `Kind namespace/name`, for messages.
    pub display: String,
    /// The document exactly as written in the scenario.
    pub text: String,
}

/// Splits a multi-document YAML file into its objects (documents that are empty or only
/// comments are skipped).
pub fn objects(text: &str) -> anyhow::Result<Vec<Object>> {
    let mut docs = vec![String::new()];
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") {
            docs.push(String::new());
        } else if let Some(doc) = docs.last_mut() {
            doc.push_str(line);
        }
    }
    let mut out = Vec::new();
    for doc in docs {
        let value: serde_yaml::Value = serde_yaml::from_str(&doc).context("invalid YAML")?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|v| v.as_str())
            .context("object without `kind`")?;
        let meta = value.get("metadata");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(|v| v.as_str())
            .with_context(|| format!("{kind} without `metadata.name`"))?;
        let lower = kind.to_ascii_lowercase();
        let namespace = if CLUSTER_SCOPED.contains(&lower.as_str()) {
            "_".to_owned()
        } else {
            meta.and_then(|m| m.get("namespace"))
                .and_then(|v| v.as_str())
                .unwrap_or("default")
                .to_owned()
        };
        if [&lower, &namespace, &name.to_owned()]
            .iter()
            .any(|p| p.contains('/') || p.is_empty())
        {
            bail!("{kind} {namespace}/{name}: unusable kind, namespace or name");
        }
        out.push(Object {
            file_name: format!("{lower}.{namespace}.{name}.yaml"),
            display: if namespace == "_" {
                format!("{kind} {name}")
            } else {
                format!("{kind} {namespace}/{name}")
            },
            text: doc,
        });
    }
    Ok(out)
}

/// Writes `object` into `dir` atomically (replacing any previous version).
pub fn write(dir: &Path, object: &Object) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".tmp-{}", object.file_name));
    std::fs::write(&tmp, &object.text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(&object.file_name))
        .with_context(|| format!("renaming {} into place", tmp.display()))
}

/// Removes `object` from `dir`; fails like the Kubernetes API if it does not exist.
pub fn delete(dir: &Path, object: &Object) -> anyhow::Result<()> {
    let path = dir.join(&object.file_name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{} not found", object.display)
        }
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_and_multi_documents() {
        let objs = objects(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: foo\n\n---\n# only a comment\n---\napiVersion: cilium.io/v2\nkind: CiliumEndpoint\nmetadata:\n  name: cep-001\n  namespace: foo\n---\nkind: Service\nmetadata:\n  name: s\n---\nkind: CiliumIdentity\nmetadata:\n  name: \"196915\"\n",
        )
        .unwrap();
        let names: Vec<_> = objs.iter().map(|o| o.file_name.as_str()).collect();
        assert_eq!(
            names,
            [
                "namespace._.foo.yaml",
                "ciliumendpoint.foo.cep-001.yaml",
                "service.default.s.yaml",
                "ciliumidentity._.196915.yaml",
            ]
        );
        assert_eq!(
            objs[0].text,
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: foo\n\n"
        );
        assert!(objects("kind: X\n").is_err());
        assert!(objects("metadata:\n  name: x\n").is_err());
    }

    #[test]
    fn write_replace_delete() {
        let dir = tempfile::tempdir().unwrap();
        let obj = &objects("kind: Namespace\nmetadata:\n  name: foo\n").unwrap()[0];
        write(dir.path(), obj).unwrap();
        write(dir.path(), obj).unwrap();
        let listed: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(listed, ["namespace._.foo.yaml"]);
        delete(dir.path(), obj).unwrap();
        let err = delete(dir.path(), obj).unwrap_err();
        assert_eq!(err.to_string(), "Namespace foo not found");
    }
}
