//! The commands: what ADD, DEL, CHECK, STATUS and GC do to the kernel and the allocation
//! file. Every command holds the allocation file's lock from start to end, so two runs
//! for the same node never interleave.
//!
//! ADD: veth pair (host `lxc` + 11 hex of SHA-256(`<container>/<ifname>`), pod side
//! `CNI_IFNAME` created directly in `CNI_NETNS`), pod side `<ip>/32`, a scope-link route to
//! [`GATEWAY`], the configured routes through it and a permanent neighbour entry for it
//! with the host side's MAC; host side up and a `/32` route to the pod. A failure part way
//! removes what was made and frees the address.
//!
//! It must not change anything but the interfaces and routes it made and its own
//! allocation file.

use std::net::Ipv4Addr;

use clustermesh_rtnl::{Netns, Socket};

use crate::ipam::{Allocation, Store};
use crate::spec::{
    self, mac_string, AddResult, Command, Config, Env, Interface, IpConfig, RouteConfig, GATEWAY,
};
use crate::{Error, Result};

/// Host-side veth of `container_id`/`ifname`.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{container_id}/{ifname}").as_bytes(),
    );
    let hex: String = digest.as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("lxc{}", &hex[..11])
}

fn netlink(what: impl Into<String>) -> impl FnOnce(clustermesh_rtnl::Error) -> Error {
    let what = what.into();
    move |source| Error::Netlink { what, source }
}

/// Runs `env.command` with `config`; returns what to print on stdout.
pub fn execute(env: &Env, config: &Config) -> Result<String> {
    match env.command {
        Command::Add => add(env, config).map(|r| {
            serde_json::to_string(&r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        }),
        Command::Del => del(env, config).map(|()| String::new()),
        Command::Check => check(env, config).map(|()| String::new()),
        Command::Status => status(config).map(|()| String::new()),
        Command::Gc => gc(config).map(|()| String::new()),
        Command::Version => Ok(serde_json::json!({
            "cniVersion": spec::LATEST,
            "supportedVersions": spec::SUPPORTED_VERSIONS,
        })
        .to_string()),
    }
}

fn open_netns(env: &Env) -> Result<Netns> {
    let path = env
        .netns
        .clone()
        .ok_or_else(|| Error::Environment(format!("CNI_NETNS is required for {}", env.command)))?;
    Netns::open(&path).map_err(|source| Error::NoNetns { path, source })
}

fn add(env: &Env, config: &Config) -> Result<AddResult> {
    let ns = open_netns(env)?;
    let mut store = Store::open(&config.state_dir, &config.name)?;
    let mut host = Socket::new().map_err(netlink("opening a netlink socket"))?;
    let mut pod = Socket::new_in(&ns).map_err(netlink(format!(
        "opening a netlink socket in {}",
        ns.path().display()
    )))?;
    let ip = match store.get(&env.container_id, &env.ifname).cloned() {
        Some(a) => {
            // ADD again for the same attachment: answer what is there, or finish it.
            if let Some(r) = existing(env, config, &a, &mut host, &mut pod)? {
                return Ok(r);
            }
            remove_host_if(&mut host, &a.host_if)?;
            a.ip
        }
        None => store.free_address(config.pod_cidr, config.range_start)?,
    };
    let host_if = host_veth_name(&env.container_id, &env.ifname);
    store.insert(Allocation {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        ip,
        host_if: host_if.clone(),
        netns: ns.path().display().to_string(),
    });
    store.save()?;
    match wire(env, config, &ns, &host_if, ip, &mut host, &mut pod) {
        Ok(r) => Ok(r),
        Err(e) => {
            // Leak nothing: the pair (the pod side goes with it) and the address.
            let _ = remove_host_if(&mut host, &host_if);
            store.remove(&env.container_id, &env.ifname);
            let _ = store.save();
            Err(e)
        }
    }
}

fn result(
    env: &Env,
    config: &Config,
    host_if: &str,
    host_mac: &[u8],
    pod_mac: &[u8],
    ip: Ipv4Addr,
) -> AddResult {
    let old = config.cni_version.starts_with("0.");
    AddResult {
        cni_version: config.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: host_if.to_owned(),
                mac: mac_string(host_mac),
                sandbox: None,
            },
            Interface {
                name: env.ifname.clone(),
                mac: mac_string(pod_mac),
                sandbox: env.netns.as_ref().map(|p| p.display().to_string()),
            },
        ],
        ips: vec![IpConfig {
            version: old.then(|| "4".to_owned()),
            address: format!("{ip}/32"),
            gateway: Some(GATEWAY.to_string()),
            interface: Some(1),
        }],
        routes: config
            .routes
            .iter()
            .map(|r| RouteConfig {
                dst: r.to_string(),
                gw: Some(GATEWAY.to_string()),
            })
            .collect(),
        dns: serde_json::json!({}),
    }
}

/// The result of an attachment that is complete already, `None` if it is not.
fn existing(
    env: &Env,
    config: &Config,
    a: &Allocation,
    host: &mut Socket,
    pod: &mut Socket,
) -> Result<Option<AddResult>> {
    let Some(h) = host
        .link_by_name(&a.host_if)
        .map_err(netlink(format!("reading {}", a.host_if)))?
    else {
        return Ok(None);
    };
    let Some(p) = pod
        .link_by_name(&env.ifname)
        .map_err(netlink(format!("reading {} in the pod", env.ifname)))?
    else {
        return Ok(None);
    };
    let addrs = pod
        .addresses_v4(p.ifindex)
        .map_err(netlink("reading the pod's addresses"))?;
    if !addrs.contains(&(a.ip, 32)) {
        return Ok(None);
    }
    Ok(Some(result(env, config, &a.host_if, &h.mac, &p.mac, a.ip)))
}

fn wire(
    env: &Env,
    config: &Config,
    ns: &Netns,
    host_if: &str,
    ip: Ipv4Addr,
    host: &mut Socket,
    pod: &mut Socket,
) -> Result<AddResult> {
    let ifname = &env.ifname;
    host.add_veth(host_if, ifname, Some(ns), config.mtu)
        .map_err(netlink(format!(
            "creating veth {host_if} ↔ {ifname} (in {})",
            ns.path().display()
        )))?;
    let h = host
        .link_by_name(host_if)
        .map_err(netlink(format!("reading {host_if}")))?
        .ok_or_else(|| Error::Check(format!("{host_if} vanished right after it was created")))?;
    let host_mac = h
        .mac6()
        .ok_or_else(|| Error::Check(format!("{host_if} has no Ethernet address")))?;
    host.set_up(h.ifindex)
        .map_err(netlink(format!("setting {host_if} up")))?;
    let p = pod
        .link_by_name(ifname)
        .map_err(netlink(format!("reading {ifname} in the pod")))?
        .ok_or_else(|| {
            Error::Check(format!(
                "{ifname} is missing in the pod right after it was created"
            ))
        })?;
    if let Some(lo) = pod
        .link_by_name("lo")
        .map_err(netlink("reading the pod's lo"))?
    {
        if !lo.up {
            pod.set_up(lo.ifindex)
                .map_err(netlink("setting the pod's lo up"))?;
        }
    }
    pod.set_up(p.ifindex)
        .map_err(netlink(format!("setting {ifname} up in the pod")))?;
    pod.add_address(p.ifindex, ip, 32)
        .map_err(netlink(format!("adding {ip}/32 to {ifname} in the pod")))?;
    pod.add_route(GATEWAY, 32, p.ifindex, None)
        .map_err(netlink(format!("adding the route to {GATEWAY} in the pod")))?;
    for r in &config.routes {
        pod.add_route(r.addr, r.len, p.ifindex, Some(GATEWAY))
            .map_err(netlink(format!(
                "adding the route {r} via {GATEWAY} in the pod"
            )))?;
    }
    pod.add_permanent_neighbour(p.ifindex, GATEWAY, host_mac)
        .map_err(netlink("adding the gateway's neighbour entry in the pod"))?;
    // Last: the route is what tells the agent (RTM_NEWROUTE) that the pod is ready.
    host.add_route(ip, 32, h.ifindex, None)
        .map_err(netlink(format!("adding the route {ip}/32 dev {host_if}")))?;
    Ok(result(env, config, host_if, &host_mac, &p.mac, ip))
}

/// Deletes the host-side veth `name` if it exists (its peer goes with it).
fn remove_host_if(host: &mut Socket, name: &str) -> Result<()> {
    let Some(l) = host
        .link_by_name(name)
        .map_err(netlink(format!("reading {name}")))?
    else {
        return Ok(());
    };
    if l.kind != "veth" {
        return Err(Error::Check(format!(
            "{name} is a {} device, not the veth this plugin made; leaving it",
            if l.kind.is_empty() {
                "physical"
            } else {
                &l.kind
            }
        )));
    }
    match host.del_link(l.ifindex) {
        Ok(()) => Ok(()),
        // Gone in between (the pod's namespace was deleted).
        Err(e) if e.errno() == Some(nix::errno::Errno::ENODEV as i32) => Ok(()),
        Err(e) => Err(netlink(format!("deleting {name}"))(e)),
    }
}

fn del(env: &Env, config: &Config) -> Result<()> {
    let mut store = Store::open(&config.state_dir, &config.name)?;
    let host_if = store
        .get(&env.container_id, &env.ifname)
        .map(|a| a.host_if.clone())
        .unwrap_or_else(|| host_veth_name(&env.container_id, &env.ifname));
    let mut host = Socket::new().map_err(netlink("opening a netlink socket"))?;
    remove_host_if(&mut host, &host_if)?;
    if store.remove(&env.container_id, &env.ifname).is_some() {
        store.save()?;
    }
    Ok(())
}

fn check(env: &Env, config: &Config) -> Result<()> {
    let prev = config.prev_result.as_ref().ok_or_else(|| {
        Error::InvalidConfig("CHECK needs \"prevResult\" (the result of ADD)".into())
    })?;
    let prev: AddResult = serde_json::from_value(prev.clone())
        .map_err(|e| Error::InvalidConfig(format!("\"prevResult\" is not an ADD result: {e}")))?;
    let ns = open_netns(env)?;
    let store = Store::open(&config.state_dir, &config.name)?;
    let a = store
        .get(&env.container_id, &env.ifname)
        .cloned()
        .ok_or_else(|| {
            Error::Check(format!(
                "no address is allocated to {}/{} (in {})",
                env.container_id,
                env.ifname,
                store.path().display()
            ))
        })?;
    let want = format!("{}/32", a.ip);
    if !prev.ips.iter().any(|i| i.address == want) {
        return Err(Error::Check(format!(
            "prevResult does not hold {want}, the address allocated to {}/{}",
            env.container_id, env.ifname
        )));
    }
    let mut host = Socket::new().map_err(netlink("opening a netlink socket"))?;
    let h = host
        .link_by_name(&a.host_if)
        .map_err(netlink(format!("reading {}", a.host_if)))?
        .ok_or_else(|| Error::Check(format!("host-side veth {} is missing", a.host_if)))?;
    if !h.up {
        return Err(Error::Check(format!(
            "host-side veth {} is down",
            a.host_if
        )));
    }
    let routes = host.routes_v4().map_err(netlink("reading the routes"))?;
    if !routes
        .iter()
        .any(|r| r.dst == a.ip && r.prefix_len == 32 && r.oif == Some(h.ifindex))
    {
        return Err(Error::Check(format!(
            "the route {want} dev {} is missing",
            a.host_if
        )));
    }
    let mut pod = Socket::new_in(&ns).map_err(netlink("opening a netlink socket in the pod"))?;
    let p = pod
        .link_by_name(&env.ifname)
        .map_err(netlink(format!("reading {} in the pod", env.ifname)))?
        .ok_or_else(|| Error::Check(format!("{} is missing in the pod", env.ifname)))?;
    let addrs = pod
        .addresses_v4(p.ifindex)
        .map_err(netlink("reading the pod's addresses"))?;
    if !addrs.contains(&(a.ip, 32)) {
        return Err(Error::Check(format!(
            "{} in the pod does not hold {want}",
            env.ifname
        )));
    }
    Ok(())
}

fn status(config: &Config) -> Result<()> {
    let store = Store::open(&config.state_dir, &config.name)
        .map_err(|e| Error::NotAvailable(format!("the allocation file cannot be used: {e}")))?;
    store
        .free_address(config.pod_cidr, config.range_start)
        .map_err(|e| Error::NotAvailable(e.to_string()))?;
    Ok(())
}

fn gc(config: &Config) -> Result<()> {
    let valid = config.valid_attachments.as_ref().ok_or_else(|| {
        Error::InvalidConfig(
            "GC needs \"cni.dev/valid-attachments\" (the attachments still in use); refusing to guess"
                .into(),
        )
    })?;
    let mut store = Store::open(&config.state_dir, &config.name)?;
    let stale: Vec<Allocation> = store
        .allocations()
        .iter()
        .filter(|a| {
            !valid
                .iter()
                .any(|v| v.container_id == a.container_id && v.ifname == a.ifname)
        })
        .cloned()
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    let mut host = Socket::new().map_err(netlink("opening a netlink socket"))?;
    let mut first_error = None;
    for a in stale {
        match remove_host_if(&mut host, &a.host_if) {
            Ok(()) => {
                store.remove(&a.container_id, &a.ifname);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    store.save()?;
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_fit_and_differ() {
        let a = host_veth_name("abc", "eth0");
        assert!(a.starts_with("lxc") && a.len() == 14, "{a}");
        assert_ne!(a, host_veth_name("abc", "eth1"));
        assert_eq!(a, host_veth_name("abc", "eth0"));
    }
}
