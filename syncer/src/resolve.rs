//! Host names of etcd endpoints, resolved with hickory-resolver rather than the C library.
//!
//! Order: `cilium-host-aliases` in the cluster's file (handled by the caller), then
//! `/etc/hosts`, then the name servers of `/etc/resolv.conf`. Special-use names are answered
//! locally (RFC 6761: `localhost` is loopback, `*.invalid` does not exist), so they never
//! reach a name server.
//!
//! A resolver is built per lookup: lookups happen only when (re)connecting, and a resolver
//! owns sockets bound to the tokio runtime that created it, which a process-wide one would
//! outlive in tests that start one runtime per test. Building it re-reads the system
//! configuration, so an edited resolv.conf takes effect at the next reconnect.
//!
//! Without a readable resolv.conf only `/etc/hosts` and special-use names resolve: there is
//! deliberately no fallback to public resolvers (a packet to an address nobody configured).

use std::net::IpAddr;

use hickory_resolver::config::{ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use tracing::debug;

/// The addresses of `host` (IPv4 first), or why there are none.
pub async fn lookup(host: &str) -> std::io::Result<Vec<IpAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let not_found = |e: hickory_resolver::net::NetError| {
        std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string())
    };
    let resolver = build().map_err(not_found)?;
    let found = resolver.lookup_ip(host).await.map_err(not_found)?;
    let mut ips: Vec<IpAddr> = found.iter().collect();
    ips.sort_by_key(|ip| ip.is_ipv6());
    ips.dedup();
    if ips.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no addresses",
        ));
    }
    Ok(ips)
}

fn build() -> Result<TokioResolver, hickory_resolver::net::NetError> {
    let mut builder = TokioResolver::builder_tokio().unwrap_or_else(|e| {
        debug!(error = %e, "no usable /etc/resolv.conf; resolving from /etc/hosts only");
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, Vec::new(), Vec::new()),
            TokioRuntimeProvider::default(),
        )
    });
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.use_hosts_file = ResolveHosts::Always;
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn localhost_and_ips_resolve_locally() {
        let ips = lookup("localhost").await.unwrap();
        assert!(ips.iter().all(|ip| ip.is_loopback()), "{ips:?}");
        assert_eq!(ips[0], IpAddr::from([127, 0, 0, 1]));
        assert_eq!(
            lookup("10.1.2.3").await.unwrap(),
            vec![IpAddr::from([10, 1, 2, 3])]
        );
    }

    #[tokio::test]
    async fn special_use_invalid_names_fail_without_a_name_server() {
        // RFC 6761: answered by the resolver itself, so this never leaves the machine.
        let err = lookup("cluster9.mesh.invalid").await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    }
}
