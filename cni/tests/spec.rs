//! The CNI spec's behaviour of `clustermesh-cni`, command by command, in real network
//! namespaces: the plugin runs inside a "node" namespace (so the host side never touches
//! the test machine's own namespace) and wires "pod" namespaces, as a runtime would.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh-cni");

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A node namespace, pod namespaces and a state directory; removed on drop.
struct Lab {
    node: String,
    pods: Vec<String>,
    state: tempfile::TempDir,
}

static N: AtomicU32 = AtomicU32::new(0);

impl Lab {
    fn new(pods: usize) -> Result<Self> {
        let id = format!(
            "cmcni{}x{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let node = format!("{id}-node");
        ip(&["netns", "add", &node])?;
        let mut lab = Lab {
            node,
            pods: Vec::new(),
            state: tempfile::tempdir()?,
        };
        for i in 0..pods {
            let p = format!("{id}-p{i}");
            ip(&["netns", "add", &p])?;
            lab.pods.push(p);
        }
        // The gateway address the pods' replies go to (the agent's DNS address in the lab).
        ip(&["-n", &lab.node, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &lab.node,
            "addr",
            "add",
            "169.254.1.1/32",
            "dev",
            "lo",
        ])?;
        Ok(lab)
    }

    fn netns(&self, pod: usize) -> String {
        format!("/var/run/netns/{}", self.pods[pod])
    }

    fn config(&self, cidr: &str, start: &str) -> Value {
        json!({
            "cniVersion": "1.1.0", "name": "cm", "type": "clustermesh-cni",
            "podCIDR": cidr, "rangeStart": start,
            "stateDir": self.state.path(), "mtu": 1450,
            "routes": ["10.0.0.0/8"],
        })
    }

    fn allocations(&self) -> Result<Vec<Value>> {
        let f = self.state.path().join("cni/cm.json");
        let v: Value = serde_json::from_slice(&std::fs::read(&f)?)?;
        Ok(v["allocations"].as_array().cloned().unwrap_or_default())
    }

    /// Host-side veths in the node namespace.
    fn host_veths(&self) -> Result<BTreeSet<String>> {
        Ok(
            ip(&["-n", &self.node, "-o", "link", "show", "type", "veth"])?
                .lines()
                .filter_map(|l| l.split(':').nth(1))
                .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
                .collect(),
        )
    }

    fn node_routes(&self) -> Result<String> {
        ip(&["-n", &self.node, "route"])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &self.pods {
            let _ = ip(&["netns", "del", p]);
        }
        let _ = ip(&["netns", "del", &self.node]);
    }
}

/// Exit status, stdout as JSON (or `Null` when empty).
struct Reply {
    ok: bool,
    json: Value,
}

impl Reply {
    fn code(&self) -> u64 {
        self.json["code"].as_u64().unwrap_or(0)
    }
    fn msg(&self) -> String {
        self.json["msg"].as_str().unwrap_or("").to_owned()
    }
}

/// Runs the plugin in the node namespace with exactly `env` (plus PATH) and `stdin`.
fn cni(node: &str, env: &[(&str, &str)], stdin: &[u8]) -> Result<Reply> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", node, BIN])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().context("starting the plugin")?;
    child.stdin.take().context("stdin")?.write_all(stdin)?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let json = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(text.trim()).with_context(|| format!("plugin printed {text:?}"))?
    };
    Ok(Reply {
        ok: out.status.success(),
        json,
    })
}

fn add(lab: &Lab, pod: usize, id: &str, conf: &Value) -> Result<Reply> {
    let ns = lab.netns(pod);
    cni(
        &lab.node,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", &ns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ],
        conf.to_string().as_bytes(),
    )
}

fn del(lab: &Lab, id: &str, netns: Option<&str>, conf: &Value) -> Result<Reply> {
    let mut env = vec![
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", id),
        ("CNI_IFNAME", "eth0"),
    ];
    if let Some(n) = netns {
        env.push(("CNI_NETNS", n));
    }
    cni(&lab.node, &env, conf.to_string().as_bytes())
}

fn pod_ip(r: &Reply) -> String {
    r.json["ips"][0]["address"]
        .as_str()
        .unwrap_or("")
        .trim_end_matches("/32")
        .to_owned()
}

fn ping(node: &str, ip: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", node, "ping", "-c1", "-W1", ip])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn version_lists_the_supported_versions() -> Result<()> {
    let lab = Lab::new(0)?;
    let r = cni(
        &lab.node,
        &[("CNI_COMMAND", "VERSION")],
        br#"{"cniVersion":"1.1.0"}"#,
    )?;
    assert!(r.ok);
    assert_eq!(r.json["cniVersion"], "1.1.0");
    assert_eq!(
        r.json["supportedVersions"],
        json!(["0.4.0", "1.0.0", "1.1.0"])
    );
    Ok(())
}

#[test]
fn add_wires_a_reachable_pod_and_is_idempotent_per_container() -> Result<()> {
    let lab = Lab::new(2)?;
    let conf = lab.config("10.77.1.0/24", "10.77.1.11");
    let first = add(&lab, 0, "ctr-a", &conf)?;
    assert!(first.ok, "ADD failed: {}", first.json);
    assert_eq!(pod_ip(&first), "10.77.1.11");
    assert_eq!(first.json["cniVersion"], "1.1.0");
    assert_eq!(first.json["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(first.json["interfaces"][1]["name"], "eth0");
    assert_eq!(first.json["interfaces"][1]["sandbox"], lab.netns(0));
    let host_if = first.json["interfaces"][0]["name"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(lab
        .node_routes()?
        .contains(&format!("10.77.1.11 dev {host_if}")));
    assert!(
        ping(&lab.node, "10.77.1.11"),
        "the node reaches the pod it wired"
    );

    // The same container again: the same answer, nothing new made.
    let again = add(&lab, 0, "ctr-a", &conf)?;
    assert!(again.ok, "{}", again.json);
    assert_eq!(again.json, first.json);
    assert_eq!(lab.host_veths()?, BTreeSet::from([host_if.clone()]));
    assert_eq!(lab.allocations()?.len(), 1);

    // Another container: the next address.
    let second = add(&lab, 1, "ctr-b", &conf)?;
    assert!(second.ok, "{}", second.json);
    assert_eq!(pod_ip(&second), "10.77.1.12");
    assert!(ping(&lab.node, "10.77.1.12"));

    // CHECK with ADD's result passes; once the pod lost its address it fails.
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = first.json.clone();
    let ns0 = lab.netns(0);
    let check_env = [
        ("CNI_COMMAND", "CHECK"),
        ("CNI_CONTAINERID", "ctr-a"),
        ("CNI_NETNS", ns0.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let c = cni(&lab.node, &check_env, with_prev.to_string().as_bytes())?;
    assert!(c.ok, "CHECK of a healthy pod: {}", c.json);
    ip(&[
        "-n",
        &lab.pods[0],
        "addr",
        "del",
        "10.77.1.11/32",
        "dev",
        "eth0",
    ])?;
    let c = cni(&lab.node, &check_env, with_prev.to_string().as_bytes())?;
    assert!(!c.ok);
    assert_eq!(c.code(), 101, "{}", c.json);
    assert!(
        c.msg().contains("does not hold 10.77.1.11/32"),
        "{}",
        c.msg()
    );
    Ok(())
}

#[test]
fn del_leaks_nothing_and_succeeds_for_unknown_containers() -> Result<()> {
    let lab = Lab::new(1)?;
    let conf = lab.config("10.77.2.0/24", "10.77.2.11");
    let r = add(&lab, 0, "ctr-a", &conf)?;
    assert!(r.ok, "{}", r.json);
    let ns = lab.netns(0);
    let d = del(&lab, "ctr-a", Some(&ns), &conf)?;
    assert!(d.ok, "{}", d.json);
    assert_eq!(d.json, Value::Null, "DEL prints nothing");
    assert!(
        lab.host_veths()?.is_empty(),
        "veth left: {:?}",
        lab.host_veths()?
    );
    assert!(!lab.node_routes()?.contains("10.77.2.11"));
    assert!(lab.allocations()?.is_empty());
    assert!(
        !ip(&["-n", &lab.pods[0], "link"])?.contains("eth0"),
        "the pod side went with the pair"
    );
    // Again, and for a container never seen, with and without a namespace.
    assert!(del(&lab, "ctr-a", Some(&ns), &conf)?.ok);
    assert!(del(&lab, "never-added", None, &conf)?.ok);
    // The freed address is handed out again.
    let r = add(&lab, 0, "ctr-c", &conf)?;
    assert_eq!(pod_ip(&r), "10.77.2.11");
    Ok(())
}

#[test]
fn gc_frees_what_is_not_in_valid_attachments() -> Result<()> {
    let lab = Lab::new(2)?;
    let conf = lab.config("10.77.3.0/24", "10.77.3.11");
    let a = add(&lab, 0, "keep", &conf)?;
    let b = add(&lab, 1, "stale", &conf)?;
    assert!(a.ok && b.ok);
    let stale_if = b.json["interfaces"][0]["name"]
        .as_str()
        .unwrap_or("")
        .to_owned();

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let r = cni(
        &lab.node,
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")],
        gc.to_string().as_bytes(),
    )?;
    assert!(r.ok, "{}", r.json);
    let left: Vec<String> = lab
        .allocations()?
        .iter()
        .map(|a| a["containerID"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(left, ["keep"]);
    assert!(
        !lab.host_veths()?.contains(&stale_if),
        "GC removed the stale veth"
    );
    assert!(ping(&lab.node, &pod_ip(&a)), "the valid pod still answers");

    // Without the list, GC refuses to guess.
    let r = cni(
        &lab.node,
        &[("CNI_COMMAND", "GC")],
        conf.to_string().as_bytes(),
    )?;
    assert!(!r.ok);
    assert_eq!(r.code(), 7, "{}", r.json);
    assert_eq!(lab.allocations()?.len(), 1);
    Ok(())
}

#[test]
fn errors_carry_the_spec_codes() -> Result<()> {
    let lab = Lab::new(1)?;
    let ns = lab.netns(0);
    let add_env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "x"),
        ("CNI_NETNS", ns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let conf = lab.config("10.77.4.0/24", "10.77.4.11");

    let r = cni(&lab.node, &add_env, b"{\"cniVersion\": ")?;
    assert!(!r.ok);
    assert_eq!(r.code(), 6, "undecodable config: {}", r.json);

    let mut bad = conf.clone();
    bad["podCIDR"] = json!("10.77.4.0/33");
    let r = cni(&lab.node, &add_env, bad.to_string().as_bytes())?;
    assert_eq!(r.code(), 7, "invalid config: {}", r.json);
    assert!(r.msg().contains("podCIDR"), "{}", r.msg());

    let r = cni(&lab.node, &add_env[1..], conf.to_string().as_bytes())?;
    assert_eq!(r.code(), 4, "missing CNI_COMMAND: {}", r.json);
    let r = cni(
        &lab.node,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_NETNS", ns.as_str()),
            ("CNI_IFNAME", "eth0"),
        ],
        conf.to_string().as_bytes(),
    )?;
    assert_eq!(r.code(), 4, "missing CNI_CONTAINERID: {}", r.json);
    assert!(r.msg().contains("CNI_CONTAINERID"), "{}", r.msg());

    let mut old = conf.clone();
    old["cniVersion"] = json!("0.2.0");
    let r = cni(&lab.node, &add_env, old.to_string().as_bytes())?;
    assert_eq!(r.code(), 1, "unsupported version: {}", r.json);

    let r = cni(
        &lab.node,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "x"),
            ("CNI_NETNS", "/var/run/netns/cm-no-such-netns"),
            ("CNI_IFNAME", "eth0"),
        ],
        conf.to_string().as_bytes(),
    )?;
    assert_eq!(r.code(), 3, "missing netns: {}", r.json);
    assert!(lab.allocations().map_or(true, |a| a.is_empty()));
    Ok(())
}

#[test]
fn an_exhausted_range_fails_add_and_status_with_its_reason() -> Result<()> {
    let lab = Lab::new(3)?;
    // A /30: two host addresses.
    let conf = lab.config("10.77.5.0/30", "10.77.5.1");
    let s = cni(
        &lab.node,
        &[("CNI_COMMAND", "STATUS")],
        conf.to_string().as_bytes(),
    )?;
    assert!(s.ok, "STATUS with free addresses: {}", s.json);
    assert!(add(&lab, 0, "one", &conf)?.ok);
    assert!(add(&lab, 1, "two", &conf)?.ok);
    let r = add(&lab, 2, "three", &conf)?;
    assert!(!r.ok);
    assert_eq!(r.code(), 100, "{}", r.json);
    assert!(
        r.msg().contains("no free address in 10.77.5.0/30"),
        "{}",
        r.msg()
    );
    assert_eq!(lab.host_veths()?.len(), 2, "the failed ADD made nothing");
    let s = cni(
        &lab.node,
        &[("CNI_COMMAND", "STATUS")],
        conf.to_string().as_bytes(),
    )?;
    assert!(!s.ok);
    assert_eq!(s.code(), 50, "{}", s.json);
    Ok(())
}

#[test]
fn a_failed_add_removes_what_it_made() -> Result<()> {
    let lab = Lab::new(1)?;
    // The pod already has an eth0 (another plugin's): creating the pair fails.
    ip(&[
        "-n",
        &lab.pods[0],
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "other0",
    ])?;
    let conf = lab.config("10.77.6.0/24", "10.77.6.11");
    let r = add(&lab, 0, "x", &conf)?;
    assert!(!r.ok);
    assert_eq!(r.code(), 5, "{}", r.json);
    assert!(r.msg().contains("creating veth"), "{}", r.msg());
    assert!(lab.host_veths()?.is_empty());
    assert!(lab.allocations()?.is_empty(), "the address was freed");
    // And with the name free, the same ADD works.
    ip(&["-n", &lab.pods[0], "link", "del", "eth0"])?;
    assert!(add(&lab, 0, "x", &conf)?.ok);
    Ok(())
}

#[test]
fn concurrent_adds_get_distinct_addresses() -> Result<()> {
    let lab = Lab::new(8)?;
    let conf = lab.config("10.77.7.0/24", "10.77.7.11");
    let ips: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (lab, conf) = (&lab, &conf);
                s.spawn(move || add(lab, i, &format!("c{i}"), conf))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread").map(|r| pod_ip(&r)))
            .collect::<Result<_>>()
    })?;
    let distinct: BTreeSet<&String> = ips.iter().collect();
    assert_eq!(distinct.len(), 8, "{ips:?}");
    assert_eq!(lab.allocations()?.len(), 8);
    assert_eq!(lab.host_veths()?.len(), 8);
    Ok(())
}

#[test]
fn write_config_writes_a_config_add_accepts_and_refuses_a_bad_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("10-clustermesh.conf");
    let st = Command::new(BIN)
        .args([
            "write-config",
            "--pod-cidr",
            "10.77.8.0/24",
            "--mtu",
            "1450",
            "--out",
        ])
        .arg(&out)
        .status()?;
    assert!(st.success());
    let v: Value = serde_json::from_slice(&std::fs::read(&out)?)?;
    assert_eq!(v["type"], "clustermesh-cni");
    assert_eq!(v["podCIDR"], "10.77.8.0/24");
    assert_eq!(v["routes"], json!(["0.0.0.0/0"]));
    let bad = Command::new(BIN)
        .args(["write-config", "--pod-cidr", "10.77.8.1/24", "--out"])
        .arg(dir.path().join("bad.conf"))
        .output()?;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("host bits"));
    assert!(!dir.path().join("bad.conf").exists());
    Ok(())
}
