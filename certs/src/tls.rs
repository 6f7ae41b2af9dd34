//! rustls client and server configurations for etcd mTLS, always on the ring provider, built
//! once from PEM text (see [`crate::reload`] for configs that follow their files).

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::fs::read_to_string;
use crate::issue::CertFiles;
use crate::pem::{certs, private_key};
use crate::{Error, Result};

/// The crypto provider used by every config this crate builds. Explicit, so that the result
/// does not depend on which provider some other crate installed as the process default.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client config that trusts `ca_pem` (one or more CAs) and presents `cert_pem`/`key_pem`.
pub fn client_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<ClientConfig> {
    let roots = root_store(ca_pem, "CA bundle")?;
    let chain = certs(cert_pem, "client certificate")?;
    let key = private_key(key_pem, "client private key")?;
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| Error::Tls {
            what: "client config",
            source,
        })?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|source| Error::Tls {
            what: "client config",
            source,
        })
}

/// Reads the three files of `files` and builds a [`client_config`].
pub fn load_client_config(files: &CertFiles) -> Result<ClientConfig> {
    client_config(
        &read_to_string(&files.ca)?,
        &read_to_string(&files.cert)?,
        &read_to_string(&files.key)?,
    )
}

/// A server config presenting `cert_pem`/`key_pem` that requires a client certificate chaining
/// to `ca_pem` (one or more CAs).
pub fn server_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<ServerConfig> {
    let roots = Arc::new(root_store(ca_pem, "CA bundle")?);
    let chain = certs(cert_pem, "server certificate")?;
    let key = private_key(key_pem, "server private key")?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|source| Error::ClientVerifier { source })?;
    ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| Error::Tls {
            what: "server config",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|source| Error::Tls {
            what: "server config",
            source,
        })
}

/// Every CA of `ca_pem` (`what` names it in errors).
pub(crate) fn root_store(ca_pem: &str, what: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for der in certs(ca_pem, what)? {
        roots.add(der).map_err(|source| Error::Tls {
            what: "root store",
            source,
        })?;
    }
    Ok(roots)
}
