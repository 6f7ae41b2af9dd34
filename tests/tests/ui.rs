//! Issue 17 acceptance in a real browser: `clustermesh lab up` (2 clusters × 2 nodes × 2
//! pods, eBPF datapath), a CiliumNetworkPolicy in c2 that admits only c1's frontend into one
//! c2 pod, a c1 pod carrying a `<script>` label, `clustermesh ui` over the lab, and Debian's
//! headless Chromium driven over WebDriver. Every pod talks to every pod; then the rendered
//! DOM must show both clusters with all nodes and their remotes ready, every cross-cluster
//! edge, the denied edge as dropped (red, with the policy side), a filter narrowing the flow
//! table (and saying so when nothing matches), the label as text, a new flow within 2 s of
//! its packet, and a killed agent as not answering while the rest keeps working. A PNG of the
//! page is saved as `target/ui-screenshot.png`.
//!
//! Needs root, iproute2, curl, chromium and chromium-driver (`scripts/install-deps.sh`) and
//! the workspace binaries (`cargo build --workspace --bins`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use clustermesh_tests::browser::Browser;
use clustermesh_tests::lab::{curl_echo, run, Lab};
use clustermesh_tests::process::{free_port, http_get};
use serde_json::{json, Value};

/// A label value a user could write; it must show as these characters, never run.
const XSS: &str = r#"<script>window.__cmXss=1</script><img src=x onerror="window.__cmXss=2">"#;
const PODS: [&str; 4] = ["echo-1-1", "echo-1-2", "echo-2-1", "echo-2-2"];

/// `clustermesh ui` as a child, stopped on drop.
struct Ui {
    child: Child,
    addr: SocketAddr,
}

impl Ui {
    fn start(lab: &Lab, log: &Path) -> Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let file = std::fs::File::create(log)?;
        let child = Command::new(&lab.bin)
            .args(["ui", "--listen", &addr.to_string(), "--dir"])
            .arg(&lab.dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting clustermesh ui")?;
        let ui = Self { child, addr };
        let t = Instant::now();
        while !matches!(http_get(addr, "/api/mesh"), Ok((200, _))) {
            ensure!(
                t.elapsed() < Duration::from_secs(15),
                "clustermesh ui does not answer on {addr}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(ui)
    }

    fn get(&self, path: &str) -> Result<Value> {
        let (code, body) = http_get(self.addr, path)?;
        ensure!(code == 200, "GET {path}: HTTP {code}: {body}");
        Ok(serde_json::from_str(&body)?)
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pod(state: &Value, c: usize, n: usize, p: usize) -> &Value {
    &state["clusters"][c]["nodes"][n]["pods"][p]
}

fn s(v: &Value) -> Result<&str> {
    v.as_str().with_context(|| format!("not a string: {v}"))
}

/// Every pod asks every other pod (curl, 1 s timeout); returns the pairs that got no answer.
fn every_pod_to_every_pod(state: &Value) -> Result<Vec<String>> {
    let mut pods = Vec::new();
    for c in state["clusters"].as_array().context("clusters")? {
        for n in c["nodes"].as_array().context("nodes")? {
            for p in n["pods"].as_array().context("pods")? {
                pods.push((
                    format!("{}/{}", s(&c["name"])?, s(&p["name"])?),
                    s(&p["ns"])?.to_owned(),
                    s(&p["ip"])?.to_owned(),
                ));
            }
        }
    }
    let failed = std::thread::scope(|sc| {
        let handles: Vec<_> = pods
            .iter()
            .map(|(from, ns, _)| {
                let pods = &pods;
                sc.spawn(move || {
                    pods.iter()
                        .filter(|(to, _, _)| to != from)
                        .filter(|(_, _, ip)| curl_echo(ns, ip, "1").is_none())
                        .map(|(to, _, _)| format!("{from} -> {to}"))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect::<Vec<_>>()
    });
    Ok(failed)
}

/// `curl` from `ns` to `ip` from source port `port` (so the page can find the flow).
fn curl_from_port(ns: &str, ip: &str, port: u16) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "-o", "/dev/null"])
        .args(["--max-time", "2", "--local-port", &port.to_string()])
        .arg(format!("http://{ip}:8080/"))
        .output()?;
    ensure!(out.status.success(), "curl from {ns}:{port} to {ip} failed");
    Ok(())
}

fn screenshot_path() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("ui-screenshot.png")
}

/// Pods → map node keys, as the page shows them.
const KEY_OF: &str = r#"
  const nodes = [...document.querySelectorAll('#map g.node')].map(n => ({
    key: n.dataset.key, cluster: n.dataset.cluster, pods: (n.dataset.pods || '').split(' ') }));
  const keyOf = (c, p) => (nodes.find(n => n.cluster === c && n.pods.includes(p)) || {}).key;
  const edgeOf = (f, t) => [...document.querySelectorAll('#map g.edge')]
    .find(e => f && t && e.dataset.from === f && e.dataset.to === t);
"#;

fn rows(b: &Browser) -> Result<Value> {
    b.eval(
        "return [...document.querySelectorAll('#flow-rows tr.flow')].map(r => ({verdict: r.dataset.verdict, src: r.dataset.srcPod, dst: r.dataset.dstPod, sc: r.dataset.srcCluster, dc: r.dataset.dstCluster}));",
        json!([]),
    )
}

fn check_page(state: &Value, ui: &Ui, b: &Browser) -> Result<()> {
    let url = format!("http://{}/", ui.addr);
    b.goto(&url)?;
    b.wait_for(
        "the live stream",
        "return {ok: document.getElementById('live').dataset.state === 'live', live: document.getElementById('live').textContent};",
        json!([]),
        Duration::from_secs(10),
    )?;

    // Both clusters, all nodes, each remote ready.
    let clusters = b.wait_for(
        "both clusters with all nodes and remotes ready",
        r#"const cs = [...document.querySelectorAll('#clusters section.cluster')].map(c => ({
             name: c.dataset.cluster,
             nodes: [...c.querySelectorAll('li.node')].map(n => n.dataset.node + ':' + n.dataset.state),
             remotes: [...c.querySelectorAll('li.remote')].map(r => r.dataset.remote + ':' + r.dataset.state) }));
           const ok = cs.length === 2 && cs[0].name === 'c1' && cs[1].name === 'c2'
             && cs.every(c => c.nodes.join() === 'n1:ready,n2:ready' && c.remotes.length === 1 && c.remotes[0].endsWith(':ready'));
           return {ok, cs};"#,
        json!([]),
        Duration::from_secs(15),
    )?;
    println!("clusters on the page: {}", clusters["cs"]);

    // The service map: every cross-cluster pair is an edge.
    let map = b.wait_for(
        "every cross-cluster edge on the map",
        &format!(
            "{KEY_OF}
            const pods = arguments[0], missing = [];
            for (const [a, z] of [['c1', 'c2'], ['c2', 'c1']])
              for (const p of pods) for (const q of pods)
                if (!edgeOf(keyOf(a, p), keyOf(z, q))) missing.push(`${{a}}/${{p}} -> ${{z}}/${{q}}`);
            const groups = [...document.querySelectorAll('#map g.cluster-group')].map(g => g.dataset.cluster);
            const services = [...document.querySelectorAll('#map g.node.service')].map(n => n.dataset.key);
            return {{ok: missing.length === 0 && groups.includes('c1') && groups.includes('c2') && services.length === 4,
                     missing, groups, services, edges: document.querySelectorAll('#map g.edge').length}};"
        ),
        json!([PODS]),
        Duration::from_secs(10),
    )?;
    println!(
        "map: groups {}, {} edges, services {}",
        map["groups"], map["edges"], map["services"]
    );

    // The denied edge is dropped (red), the frontend's is forwarded (green).
    let edges = b.wait_for(
        "the denied edge shown as dropped",
        &format!(
            "{KEY_OF}
            const style = e => e ? getComputedStyle(e.querySelector('.edge-line')).stroke : null;
            const denied = edgeOf(keyOf('c1', 'echo-2-1'), keyOf('c2', 'echo-1-1'));
            const front = edgeOf(keyOf('c1', 'echo-1-1'), keyOf('c2', 'echo-1-1'));
            const d = denied ? {{verdict: denied.dataset.verdict, dropped: +denied.dataset.dropped, stroke: style(denied), label: denied.textContent}} : null;
            const f = front ? {{verdict: front.dataset.verdict, dropped: +front.dataset.dropped, stroke: style(front)}} : null;
            return {{ok: !!d && !!f && d.verdict === 'dropped' && d.dropped > 0 && d.stroke === 'rgb(214, 69, 69)'
                       && d.label.includes('✗') && f.verdict === 'forwarded' && f.dropped === 0 && f.stroke === 'rgb(46, 157, 91)',
                     denied: d, frontend: f}};"
        ),
        json!([]),
        Duration::from_secs(10),
    )?;
    println!(
        "denied edge: {}, frontend edge: {}",
        edges["denied"], edges["frontend"]
    );
    // Its details name the policy side and the identities.
    b.eval(
        &format!("{KEY_OF} edgeOf(keyOf('c1', 'echo-2-1'), keyOf('c2', 'echo-1-1')).dispatchEvent(new MouseEvent('click', {{bubbles: true}}));"),
        json!([]),
    )?;
    let detail = b.wait_for(
        "the dropped edge's details",
        "const d = document.getElementById('edge-detail'); return {ok: !d.hidden && d.textContent.includes('by the ingress policy of') && /identities \\d+ → \\d+/.test(d.textContent), text: d.textContent};",
        json!([]),
        Duration::from_secs(5),
    )?;
    println!("edge details: {}", detail["text"]);

    // Filters narrow the table.
    let all = rows(b)?.as_array().map_or(0, Vec::len);
    ensure!(all > 0, "the flow table is empty");
    b.click("#filter-verdict option[value=DROPPED]")?;
    let dropped = b.wait_for(
        "only dropped flows after choosing DROPPED",
        "const r = [...document.querySelectorAll('#flow-rows tr.flow')];
         const drop = r.find(x => x.dataset.verdict === 'DROPPED');
         return {ok: r.length > 0 && r.length < arguments[0] && r.every(x => x.dataset.verdict === 'DROPPED') && location.hash.includes('verdict=DROPPED'),
                 rows: r.length, details: drop ? drop.querySelector('.details').textContent : null};",
        json!([all]),
        Duration::from_secs(5),
    )?;
    println!(
        "verdict=DROPPED: {all} rows → {}; e.g. {}",
        dropped["rows"], dropped["details"]
    );
    let details = dropped["details"].as_str().unwrap_or_default();
    ensure!(
        details.contains("POLICY_DENIED: by the ingress policy of default/echo-1-1 (c2)")
            && details.contains("identities"),
        "a dropped row does not say which policy side dropped it and the identities: {details}"
    );
    b.type_into("#filter-pod", "echo-2-1")?;
    let narrowed = b.wait_for(
        "pod=echo-2-1 narrowing the dropped flows",
        "const r = [...document.querySelectorAll('#flow-rows tr.flow')];
         return {ok: r.length > 0 && r.length <= arguments[0] && r.every(x => x.dataset.verdict === 'DROPPED'
                   && (x.dataset.srcPod.startsWith('echo-2-1') || x.dataset.dstPod.startsWith('echo-2-1'))), rows: r.length};",
        json!([dropped["rows"]]),
        Duration::from_secs(5),
    )?;
    println!("verdict=DROPPED, pod=echo-2-1: {} rows", narrowed["rows"]);
    b.type_into("#filter-cluster", "no-such-cluster")?;
    let empty = b.wait_for(
        "a filter matching nothing says so",
        "const e = document.getElementById('flows-empty');
         return {ok: document.querySelectorAll('#flow-rows tr.flow').length === 0 && !e.hidden && e.textContent.includes('No flow matches'), text: e.textContent};",
        json!([]),
        Duration::from_secs(5),
    )?;
    println!("{}", empty["text"]);

    // The <script> label, shown as text: the c1 pod that carries it, filtered.
    b.click("#filter-clear")?;
    b.type_into("#filter-cluster", "c1")?;
    b.type_into("#filter-pod", "echo-2-2")?;
    let xss = b.wait_for(
        "the <script> label rendered as text",
        "const rows = [...document.querySelectorAll('#flow-rows tr.flow')];
         const inRow = rows.some(r => r.textContent.includes(arguments[0]));
         const inMap = [...document.querySelectorAll('#map g.node')].some(n => n.textContent.includes(arguments[0]));
         const injected = document.querySelectorAll('#app script, #app img, #clusters script').length;
         const filtered = location.hash.includes('pod=echo-2-2') && rows.length > 0
           && rows.every(r => (r.dataset.srcCluster === 'c1' || r.dataset.dstCluster === 'c1')
                              && (r.dataset.srcPod === 'echo-2-2' || r.dataset.dstPod === 'echo-2-2'));
         return {ok: filtered && inRow && inMap && injected === 0 && window.__cmXss === undefined,
                 rows: rows.length, inRow, inMap, injected, xss: String(window.__cmXss)};",
        json!([XSS]),
        Duration::from_secs(5),
    )?;
    println!("<script> label: {xss}");

    // A new flow shows within 2 s of its packet.
    b.click("#filter-clear")?;
    b.wait_for(
        "the cleared filter",
        "return {ok: location.hash === '' && document.querySelectorAll('#flow-rows tr.flow').length > 0};",
        json!([]),
        Duration::from_secs(5),
    )?;
    let (src_ns, dst_ip) = (
        s(&pod(state, 0, 0, 0)["ns"])?,
        s(&pod(state, 1, 1, 1)["ip"])?,
    );
    let t = Instant::now();
    curl_from_port(src_ns, dst_ip, 47123)?;
    b.wait_for(
        "the new flow from port 47123",
        "return {ok: !!document.querySelector('#flow-rows tr.flow[data-sport=\"47123\"]')};",
        json!([]),
        Duration::from_secs(5),
    )?;
    let shown = t.elapsed();
    println!("c1/echo-1-1:47123 → c2/echo-2-2: on the page {shown:?} after curl started");
    ensure!(
        shown < Duration::from_secs(2),
        "the flow took {shown:?} to appear (> 2 s)"
    );

    let png = screenshot_path();
    b.screenshot(&png)?;
    println!("screenshot: {}", png.display());

    // An agent that stops answering is shown as such; the rest keeps working.
    let agent = &state["clusters"][1]["nodes"][1]["agent"];
    let pid = agent["pid"].as_u64().context("c2/n2 agent pid")? as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let dead = b.wait_for(
        "c2/n2 shown as not answering",
        "const n = document.querySelector('section.cluster[data-cluster=c2] li.node[data-node=n2]');
         const others = [...document.querySelectorAll('li.node')].filter(x => x !== n).map(x => x.dataset.state);
         return {ok: !!n && n.dataset.state === 'not-answering' && n.textContent.includes('not answering')
                   && others.every(s => s === 'ready'), text: n ? n.textContent : null, others};",
        json!([]),
        Duration::from_secs(20),
    )?;
    println!("after killing the agent of c2/n2: {}", dead["text"]);
    let (src_ns, dst_ip) = (
        s(&pod(state, 0, 0, 1)["ns"])?,
        s(&pod(state, 0, 1, 0)["ip"])?,
    );
    curl_from_port(src_ns, dst_ip, 47124)?;
    b.wait_for(
        "a new flow while one agent is down",
        "return {ok: !!document.querySelector('#flow-rows tr.flow[data-sport=\"47124\"]')};",
        json!([]),
        Duration::from_secs(5),
    )?;
    let stats = ui.get("/api/stats")?;
    let failing: Vec<&Value> = stats["observers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o["state"] != "following")
        .collect();
    ensure!(
        failing.len() == 1 && failing[0]["node"] == "n2" && failing[0]["cluster"] == "c2",
        "only c2/n2's observer should be failing: {failing:?}"
    );
    println!("/api/stats: failing observer {}", failing[0]);
    Ok(())
}

#[test]
fn ui_shows_the_mesh_live_in_a_real_browser() -> Result<()> {
    let mut lab = Lab::new("cm-lab-ui")?;
    let (_, state) = lab.up_mesh(2, &[])?;
    let (c1, c2) = (&state["clusters"][0], &state["clusters"][1]);

    // A label nobody should trust, on c1's echo-2-2.
    let manifest = Path::new(s(&c1["state_dir"])?).join("manifests/pod-echo-2-2.yaml");
    let text = std::fs::read_to_string(&manifest)?;
    ensure!(text.contains("    instance: echo-2-2\n"), "{text}");
    std::fs::write(
        &manifest,
        text.replace(
            "    instance: echo-2-2\n",
            &format!("    instance: echo-2-2\n    note: '{XSS}'\n"),
        ),
    )?;
    // Only c1's frontend (echo-1-1) may reach c2's echo-1-1.
    std::fs::write(
        Path::new(s(&c2["state_dir"])?).join("manifests/policy-frontend-only.yaml"),
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: frontend-only\n  \
         namespace: default\nspec:\n  endpointSelector:\n    matchLabels:\n      \
         instance: echo-1-1\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        \
         instance: echo-1-1\n        io.cilium.k8s.policy.cluster: c1\n",
    )?;

    let ui = Ui::start(&lab, &lab.dir.with_file_name("ui.log"))?;
    // Wait for the policy (a denied pod gets no answer) and the label (in the map's
    // inventory, read from etcd).
    let (denied_ns, target_ip) = (
        s(&pod(&state, 0, 1, 0)["ns"])?,
        s(&pod(&state, 1, 0, 0)["ip"])?,
    );
    let t = Instant::now();
    loop {
        let labelled = ui.get("/api/map")?["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| {
                n["labels"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|l| l.as_str() == Some(&format!("k8s:note={XSS}")))
            });
        if labelled && curl_echo(denied_ns, target_ip, "0.3").is_none() {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "after 30 s: label in the map {labelled}, policy not yet enforced or label missing"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "policy enforced and label published after {:?}",
        t.elapsed()
    );

    let failed = every_pod_to_every_pod(&state)?;
    let mut want: Vec<String> = [
        "c1/echo-1-2",
        "c1/echo-2-1",
        "c1/echo-2-2",
        "c2/echo-1-2",
        "c2/echo-2-1",
        "c2/echo-2-2",
    ]
    .iter()
    .map(|p| format!("{p} -> c2/echo-1-1"))
    .collect();
    let mut got = failed.clone();
    want.sort();
    got.sort();
    ensure!(
        got == want,
        "pairs without an answer: {got:?}, expected exactly the denied ones {want:?}"
    );
    println!("every pod → every pod: 56 pairs, the 6 denied ones dropped");

    let browser = Browser::start(1400, 1250)?;
    let res = check_page(&state, &ui, &browser);
    if res.is_err() {
        let png = screenshot_path().with_file_name("ui-screenshot-failed.png");
        if browser.screenshot(&png).is_ok() {
            eprintln!("the page at the failure: {}", png.display());
        }
    }
    drop(browser);
    drop(ui);
    res?;
    run(&mut lab.cli(&["lab", "down"]))?;
    lab.down = true;
    Ok(())
}
