//! kube-rs clients from a kubeconfig file and context, or from the pod's service account.
//!
//! A wrong path or an unknown context is reported before anything connects, naming the file
//! and the contexts it has; the context's server address is kept so that an unreachable API
//! server can be named too ([`Target`]).

use std::path::PathBuf;

/// What went wrong setting a client up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig file cannot be opened or read (kube's own error repeats the OS error
    /// in its message and as its source, so the chain would say it twice: this carries the
    /// OS error alone).
    #[error(
        "kubeconfig {path} cannot be read: check the path given with --kubeconfig (or $KUBECONFIG)"
    )]
    KubeconfigFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kubeconfig file cannot be parsed.
    #[error(
        "kubeconfig {path} cannot be read: check the path given with --kubeconfig (or $KUBECONFIG)"
    )]
    Kubeconfig {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The context does not exist in the kubeconfig.
    #[error("kubeconfig {path} has no context {context:?} (it has: {available}); pick one with --context")]
    UnknownContext {
        /// The file.
        path: String,
        /// The context asked for.
        context: String,
        /// The contexts the file has.
        available: String,
    },
    /// The kubeconfig (or in-cluster config) cannot be turned into a client config.
    #[error("kubernetes client config from {from}")]
    Config {
        /// Where the config came from.
        from: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The client cannot be built.
    #[error("kubernetes client")]
    Client {
        /// Why.
        #[source]
        source: kube::Error,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the client's configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientConfig {
    /// The pod's service account (`KUBERNETES_SERVICE_HOST`, the mounted token and CA).
    InCluster,
    /// A kubeconfig file (`None`: `$KUBECONFIG` or `~/.kube/config`) and context (`None`: its
    /// current context).
    Kubeconfig {
        /// File.
        path: Option<PathBuf>,
        /// Context.
        context: Option<String>,
    },
}

/// A client and what it points at, for messages.
#[derive(Clone)]
pub struct Target {
    /// The client.
    pub client: kube::Client,
    /// The context name (`in-cluster` for the service account).
    pub context: String,
    /// The API server's URL.
    pub server: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("context", &self.context)
            .field("server", &self.server)
            .finish()
    }
}

impl ClientConfig {
    /// A kubeconfig file and context.
    pub fn kubeconfig(path: Option<PathBuf>, context: Option<String>) -> Self {
        ClientConfig::Kubeconfig { path, context }
    }

    /// Reads and checks the kubeconfig (file exists and parses, context exists) without
    /// connecting: called at start so a wrong path or context fails at once.
    pub fn validate(&self) -> Result<()> {
        let ClientConfig::Kubeconfig { path, context } = self else {
            return Ok(());
        };
        let (kc, shown) = read_kubeconfig(path.as_ref())?;
        if let Some(context) = context {
            if !kc.contexts.iter().any(|c| &c.name == context) {
                return Err(Error::UnknownContext {
                    path: shown,
                    context: context.clone(),
                    available: kc
                        .contexts
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        Ok(())
    }

    /// A kube-rs client.
    pub async fn client(&self) -> Result<kube::Client> {
        Ok(self.target().await?.client)
    }

    /// A kube-rs client with the context and server it talks to.
    pub async fn target(&self) -> Result<Target> {
        self.validate()?;
        let (config, context) = match self {
            ClientConfig::InCluster => (
                kube::Config::incluster().map_err(|source| Error::Config {
                    from: "the pod's service account (in-cluster)".into(),
                    source: Box::new(source),
                })?,
                "in-cluster".to_string(),
            ),
            ClientConfig::Kubeconfig { path, context } => {
                let (kc, shown) = read_kubeconfig(path.as_ref())?;
                let name = context
                    .clone()
                    .or_else(|| kc.current_context.clone())
                    .unwrap_or_default();
                let opts = kube::config::KubeConfigOptions {
                    context: context.clone(),
                    ..Default::default()
                };
                let cfg = kube::Config::from_custom_kubeconfig(kc, &opts)
                    .await
                    .map_err(|source| Error::Config {
                        from: format!("context {name:?} of {shown}"),
                        source: Box::new(source),
                    })?;
                (cfg, name)
            }
        };
        let server = config.cluster_url.to_string();
        let client = kube::Client::try_from(config).map_err(|source| Error::Client { source })?;
        Ok(Target {
            client,
            context,
            server,
        })
    }
}

/// Our error for a kubeconfig that kube could not read, naming `path`.
fn kubeconfig_error(path: String, source: kube::config::KubeconfigError) -> Error {
    match source {
        kube::config::KubeconfigError::ReadConfig(source, _) => {
            Error::KubeconfigFile { path, source }
        }
        source => Error::Kubeconfig { path, source },
    }
}

fn read_kubeconfig(path: Option<&PathBuf>) -> Result<(kube::config::Kubeconfig, String)> {
    match path {
        Some(p) => kube::config::Kubeconfig::read_from(p)
            .map(|kc| (kc, p.display().to_string()))
            .map_err(|source| kubeconfig_error(p.display().to_string(), source)),
        None => {
            let shown = std::env::var("KUBECONFIG").unwrap_or_else(|_| "~/.kube/config".into());
            kube::config::Kubeconfig::read()
                .map(|kc| (kc, shown.clone()))
                .map_err(|source| kubeconfig_error(shown, source))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole chain as a CLI prints it (`{e:#}`): each message once.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut out = e.to_string();
        let mut s = e.source();
        while let Some(c) = s {
            out.push_str(": ");
            out.push_str(&c.to_string());
            s = c.source();
        }
        out
    }

    #[test]
    fn a_missing_kubeconfig_is_named_once_with_its_os_error_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing");
        let err = ClientConfig::kubeconfig(Some(path.clone()), Some("east".into()))
            .validate()
            .unwrap_err();
        let text = chain(&err);
        assert!(
            text.starts_with(&format!("kubeconfig {} cannot be read", path.display())),
            "{text}"
        );
        assert_eq!(
            text.matches("No such file or directory").count(),
            1,
            "{text}"
        );
    }
}
