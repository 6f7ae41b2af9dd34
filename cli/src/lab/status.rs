//! `lab status`: namespaces, addresses, etcd endpoints, certificates and the state of every
//! component, as a summary or JSON.

use super::state;
use super::{http_get, netns, plan, DirArgs};

/// `lab status`.
pub fn status(a: DirArgs) -> anyhow::Result<()> {
    let st = state::load(&a.dir)?;
    let mut clusters = Vec::new();
    for c in &st.clusters {
        // The control-plane pod's kubelet (it keeps the etcd and apiserver containers up).
        let api = c.apiserver_pid.is_some_and(netns::alive);
        let pod = super::install::control_plane_root(c);
        let report = http_get(&st, c.health_addr, "/status")
            .filter(|(code, _)| *code == 200)
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .unwrap_or_default();
        let ready = report["ready"].as_bool().unwrap_or(false);
        let mut nodes = Vec::new();
        if a.output != "json" {
            println!(
                "{} cluster {} (ID {}) in {}: control-plane pod {}, {}",
                if ready { "✅" } else { "❌" },
                c.name,
                c.id,
                c.ns,
                if api { "running" } else { "NOT running" },
                if ready { "ready" } else { "not ready" }
            );
            println!(
                "   etcd {} (mTLS, certs in {}), health http://{}/status",
                c.etcd_endpoint,
                c.certs_dir.display(),
                c.health_addr
            );
            println!(
                "   pod clustermesh-apiserver (etcd, apiserver; Secret files, emptyDirs, logs via kubelet.log) in {}",
                pod.display()
            );
            if let Some(remotes) = report["remote-clusters"].as_array() {
                for r in remotes {
                    println!(
                        "   remote {}: {} ({} nodes, {} endpoints)",
                        r["name"].as_str().unwrap_or_default(),
                        if r["ready"].as_bool() == Some(true) {
                            "ready"
                        } else {
                            "NOT ready"
                        },
                        r["num-nodes"],
                        r["num-endpoints"]
                    );
                }
            }
        }
        for node in &c.nodes {
            let (agent_running, agent_ready, agent_status) = match &node.agent {
                Some(ag) => {
                    let ready = matches!(http_get(&st, ag.health_addr, "/readyz"), Some((200, _)));
                    let status = http_get(&st, ag.health_addr, "/status")
                        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
                        .unwrap_or_default();
                    (netns::alive(ag.pid), ready, status)
                }
                None => (false, false, serde_json::Value::Null),
            };
            let pods: Vec<serde_json::Value> = node
                .pods
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "name": p.name, "namespace": p.namespace, "netns": p.ns, "ip": p.ip,
                        "mac": p.mac, "host-veth": p.host_veth,
                        "echo-running": p.echo_pid.is_some_and(netns::alive),
                    })
                })
                .collect();
            if a.output != "json" {
                let agent = match &node.agent {
                    Some(ag) => format!(
                        "agent {} {} (http://{}, log {}){}",
                        if agent_running {
                            "running"
                        } else {
                            "NOT running"
                        },
                        if agent_ready { "ready" } else { "not ready" },
                        ag.health_addr,
                        ag.log.display(),
                        match agent_status["receive-path"].as_str() {
                            Some(path) => format!(", receives VXLAN through {path}"),
                            None => String::new(),
                        }
                    ),
                    None => "no agent".into(),
                };
                println!(
                    "   node {} in {} ({}): {agent}",
                    node.name, node.ns, node.ip
                );
                for p in &node.pods {
                    println!(
                        "     pod {} {} in {} via {}, echo {}",
                        p.name,
                        p.ip,
                        p.ns,
                        p.host_veth,
                        if p.echo_pid.is_some_and(netns::alive) {
                            "running"
                        } else {
                            "NOT running"
                        }
                    );
                }
            }
            nodes.push(serde_json::json!({
                "name": node.name, "netns": node.ns, "ip": node.ip, "pod-cidr": node.pod_cidr,
                "agent": node.agent.as_ref().map(|ag| serde_json::json!({
                    "pid": ag.pid, "running": agent_running, "ready": agent_ready,
                    "health": ag.health_addr, "log": ag.log, "bpffs-dir": ag.bpffs_dir,
                    "status": agent_status,
                })),
                "pods": pods,
            }));
        }
        clusters.push(serde_json::json!({
            "name": c.name, "id": c.id, "netns": c.ns, "ip": c.ip,
            "etcd": c.etcd_endpoint, "health": c.health_addr,
            "certs": c.certs_dir, "state-dir": c.state_dir,
            "etcd-configs": {
                "admin": c.state_dir.join("etcd-config.yaml"),
                "local": c.state_dir.join("local-etcd-config.yaml"),
                "remote": c.state_dir.join("remote-etcd-config.yaml"),
            },
            "apiserver": {"pid": c.apiserver_pid, "running": api, "ready": ready, "status": report},
            "control-plane-pod": pod,
            "nodes": nodes,
        }));
    }
    if a.output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "id": st.id, "dir": st.dir, "datapath": st.datapath, "router": st.router_ns,
                "root-link": st.root_link, "bpffs": st.bpffs, "namespaces": st.namespaces,
                "clusters": clusters,
            }))?
        );
    } else {
        println!(
            "router {}{}",
            st.router_ns,
            st.root_link
                .as_ref()
                .map(|l| format!(", root veth {l} ({} → {})", plan::ROOT_IP, plan::UNDERLAY))
                .unwrap_or_default()
        );
        println!(
            "inspect: ip netns exec {} curl -s http://{}/",
            st.pods()
                .first()
                .map(|p| p.pod.ns.clone())
                .unwrap_or_default(),
            st.pods()
                .last()
                .map(|p| std::net::SocketAddr::new(p.pod.ip, plan::ECHO_PORT).to_string())
                .unwrap_or_default(),
        );
    }
    Ok(())
}
