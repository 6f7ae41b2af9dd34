//! Server-side apply with field manager `clustermesh`, deletes, reads, and the API server's
//! pod proxy — each reporting exactly what changed, so a second run can say "0 changes".
//!
//! Errors are one line that names the context, what failed and what to do: an unreachable
//! API server, a user the cluster's RBAC does not allow to write, or another API error.

use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::client::Target;
use crate::objects::{Object, FIELD_MANAGER};

/// What went wrong talking to a cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection to the API server.
    #[error("context {context}: cannot reach the Kubernetes API server at {server}: check that the cluster is up and that the kubeconfig's server address is right")]
    Unreachable {
        /// kubeconfig context.
        context: String,
        /// Its server URL.
        server: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// RBAC refused the request.
    #[error("context {context}: not allowed to {verb} {what} ({message}): grant the context's user `{verb}` on {resource} in {scope} (`clustermesh enable` needs to write Secrets, ConfigMaps, Services, Deployments, DaemonSets and RBAC)")]
    Forbidden {
        /// kubeconfig context.
        context: String,
        /// The verb.
        verb: String,
        /// The object.
        what: String,
        /// The resource (plural.group).
        resource: String,
        /// Namespace or cluster scope.
        scope: String,
        /// The server's message.
        message: String,
    },
    /// Any other API error.
    #[error("context {context}: {verb} {what}")]
    Api {
        /// kubeconfig context.
        context: String,
        /// The verb.
        verb: String,
        /// The object.
        what: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// A request could not be built or a response not decoded.
    #[error("context {context}: {what}: {message}")]
    Decode {
        /// kubeconfig context.
        context: String,
        /// The object.
        what: String,
        /// Why.
        message: String,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What one write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The object did not exist and was created.
    Created,
    /// The object existed and changed.
    Configured,
    /// The object existed and the apply changed nothing.
    Unchanged,
    /// The object was deleted.
    Deleted,
    /// There was nothing to delete.
    Absent,
}

impl Change {
    /// Whether the cluster changed.
    pub fn changed(&self) -> bool {
        matches!(self, Change::Created | Change::Configured | Change::Deleted)
    }

    /// kubectl's word for it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Configured => "configured",
            Change::Unchanged => "unchanged",
            Change::Deleted => "deleted",
            Change::Absent => "absent",
        }
    }
}

/// Where an object is, for requests and messages.
#[derive(Debug, Clone)]
pub struct Ref {
    /// Its dynamic type.
    pub resource: kube::core::ApiResource,
    /// Namespace (`None`: cluster-scoped).
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

impl Ref {
    /// A typed kind's object.
    pub fn of<K: k8s_openapi::Resource>(namespace: Option<&str>, name: &str) -> Self {
        Self {
            resource: kube::core::ApiResource {
                group: K::GROUP.into(),
                version: K::VERSION.into(),
                api_version: K::API_VERSION.into(),
                kind: K::KIND.into(),
                plural: K::URL_PATH_SEGMENT.into(),
            },
            namespace: namespace.map(String::from),
            name: name.into(),
        }
    }

    /// `Kind ns/name`.
    pub fn describe(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.resource.kind, self.name),
            None => format!("{} {}", self.resource.kind, self.name),
        }
    }
}

impl From<&Object> for Ref {
    fn from(o: &Object) -> Self {
        Self {
            resource: o.api_resource(),
            namespace: o.namespace.clone(),
            name: o.name.clone(),
        }
    }
}

fn is_unreachable(e: &kube::Error) -> bool {
    matches!(
        e,
        kube::Error::HyperError(_)
            | kube::Error::Service(_)
            | kube::Error::HttpError(_)
            | kube::Error::TlsRequired
    )
}

/// Turns a kube error into one that says what to do.
pub fn explain(t: &Target, verb: &str, r: &Ref, e: kube::Error) -> Error {
    if is_unreachable(&e) {
        return Error::Unreachable {
            context: t.context.clone(),
            server: t.server.clone(),
            source: e,
        };
    }
    if let kube::Error::Api(s) = &e {
        if s.code == 403 {
            let resource = if r.resource.group.is_empty() {
                r.resource.plural.clone()
            } else {
                format!("{}.{}", r.resource.plural, r.resource.group)
            };
            return Error::Forbidden {
                context: t.context.clone(),
                verb: verb.into(),
                what: r.describe(),
                resource,
                scope: match &r.namespace {
                    Some(ns) => format!("namespace {ns}"),
                    None => "the cluster scope".into(),
                },
                message: s.message.clone(),
            };
        }
    }
    Error::Api {
        context: t.context.clone(),
        verb: verb.into(),
        what: r.describe(),
        source: e,
    }
}

fn api(t: &Target, r: &Ref) -> Api<DynamicObject> {
    match &r.namespace {
        Some(ns) => Api::namespaced_with(t.client.clone(), ns, &r.resource),
        None => Api::all_with(t.client.clone(), &r.resource),
    }
}

fn resource_version(o: &DynamicObject) -> Option<String> {
    o.metadata.resource_version.clone()
}

/// Reads an object as JSON; `None` if it does not exist.
pub async fn get_json(t: &Target, r: &Ref) -> Result<Option<Value>> {
    let o = api(t, r)
        .get_opt(&r.name)
        .await
        .map_err(|e| explain(t, "get", r, e))?;
    o.map(|o| {
        serde_json::to_value(&o).map_err(|e| Error::Decode {
            context: t.context.clone(),
            what: r.describe(),
            message: e.to_string(),
        })
    })
    .transpose()
}

/// Reads a typed object; `None` if it does not exist.
pub async fn get<K>(t: &Target, namespace: Option<&str>, name: &str) -> Result<Option<K>>
where
    K: k8s_openapi::Resource + DeserializeOwned,
{
    let r = Ref::of::<K>(namespace, name);
    let Some(v) = get_json(t, &r).await? else {
        return Ok(None);
    };
    serde_json::from_value(v)
        .map(Some)
        .map_err(|e| Error::Decode {
            context: t.context.clone(),
            what: r.describe(),
            message: format!("does not parse as a {}: {e}", K::KIND),
        })
}

/// Server-side apply of `obj` (field manager `clustermesh`, forcing ownership of the fields
/// it sets); says whether it was created, changed or left as it was.
pub async fn apply(t: &Target, obj: &Object) -> Result<Change> {
    apply_with(t, obj, false).await
}

/// [`apply`], or with `dry_run` the server's dry run of it (`dryRun=All`: checked by the
/// API server — RBAC included — and nothing stored).
pub async fn apply_with(t: &Target, obj: &Object, dry_run: bool) -> Result<Change> {
    let r = Ref::from(obj);
    let a = api(t, &r);
    let before = a
        .get_opt(&r.name)
        .await
        .map_err(|e| explain(t, "get", &r, e))?;
    let verb = if before.is_some() { "patch" } else { "create" };
    let after = a
        .patch(
            &r.name,
            &{
                let p = PatchParams::apply(FIELD_MANAGER).force();
                if dry_run {
                    p.dry_run()
                } else {
                    p
                }
            },
            &Patch::Apply(&obj.value),
        )
        .await
        .map_err(|e| explain(t, verb, &r, e))?;
    Ok(match before {
        None => Change::Created,
        Some(b) if resource_version(&b) == resource_version(&after) => Change::Unchanged,
        Some(_) => Change::Configured,
    })
}

/// Deletes an object; [`Change::Absent`] if it was not there.
pub async fn delete(t: &Target, r: &Ref) -> Result<Change> {
    delete_with(t, r, false).await
}

/// [`delete`], or with `dry_run` the server's dry run of it.
pub async fn delete_with(t: &Target, r: &Ref, dry_run: bool) -> Result<Change> {
    let params = DeleteParams {
        dry_run,
        ..Default::default()
    };
    match api(t, r).delete(&r.name, &params).await {
        Ok(_) => Ok(Change::Deleted),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Change::Absent),
        Err(e) => Err(explain(t, "delete", r, e)),
    }
}

/// `GET` through the API server's pod proxy (`/api/v1/namespaces/<ns>/pods/<pod>:<port>/proxy/<path>`):
/// reaches a pod's HTTP port from outside the cluster with nothing but the kubeconfig.
pub async fn pod_proxy_get(
    t: &Target,
    namespace: &str,
    pod: &str,
    port: i32,
    path: &str,
) -> Result<String> {
    let r = Ref::of::<k8s_openapi::api::core::v1::Pod>(Some(namespace), pod);
    let url = format!(
        "/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy/{}",
        path.trim_start_matches('/')
    );
    let req = http::Request::get(url)
        .body(Vec::new())
        .map_err(|e| Error::Decode {
            context: t.context.clone(),
            what: r.describe(),
            message: e.to_string(),
        })?;
    t.client
        .request_text(req)
        .await
        .map_err(|e| explain(t, "get (pod proxy)", &r, e))
}
