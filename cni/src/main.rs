//! `clustermesh-cni`: the plugin binary. Reads `CNI_*` from the environment and the network
//! configuration from stdin, prints the result (or the CNI error JSON, exiting 1) on
//! stdout, as the CNI spec wants. All logic lives in the library.
//!
//! `clustermesh-cni write-config --pod-cidr CIDR [--state-dir DIR] [--mtu N] [--route CIDR]…
//! --out FILE` writes the node's network configuration (for `/etc/cni/net.d/`, from the
//! agent's DaemonSet), checked as ADD would check it.

use std::io::{Read as _, Write as _};

fn write_config(args: &[String]) -> Result<(), String> {
    let (mut cidr, mut state, mut mtu, mut routes, mut out) = (
        None,
        clustermesh_cni::spec::DEFAULT_STATE_DIR.to_owned(),
        1500u32,
        Vec::new(),
        None,
    );
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let v = it
            .next()
            .ok_or_else(|| format!("{k} needs a value"))?
            .clone();
        match k.as_str() {
            "--pod-cidr" => cidr = Some(v),
            "--state-dir" => state = v,
            "--mtu" => {
                mtu = v
                    .parse()
                    .map_err(|_| format!("--mtu {v:?} is not a number"))?
            }
            "--route" => routes.push(v),
            "--out" => out = Some(v),
            _ => {
                return Err(format!(
                    "unknown flag {k} (--pod-cidr, --state-dir, --mtu, --route, --out)"
                ))
            }
        }
    }
    if routes.is_empty() {
        routes.push("0.0.0.0/0".to_owned());
    }
    let cidr = cidr.ok_or("--pod-cidr (the node's spec.podCIDR) is required")?;
    let out = out.ok_or("--out (e.g. /etc/cni/net.d/10-clustermesh.conf) is required")?;
    let conf =
        clustermesh_cni::network_config(&cidr, &state, mtu, &routes).map_err(|e| e.to_string())?;
    let path = std::path::Path::new(&out);
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| format!("creating a file in {}: {e}", dir.display()))?;
    writeln!(tmp, "{conf:#}").map_err(|e| format!("writing {out}: {e}"))?;
    // Runtimes read the directory as they like: the file appears whole or not at all.
    tmp.persist(path)
        .map_err(|e| format!("writing {out}: {}", e.error))?;
    Ok(())
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("write-config") {
        if let Err(e) = write_config(&argv[1..]) {
            eprintln!("clustermesh-cni write-config: {e}");
            std::process::exit(2);
        }
        return;
    }
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let outcome = match read {
        Ok(_) => clustermesh_cni::run(|k| std::env::var(k).ok(), &stdin),
        Err(e) => Err((
            clustermesh_cni::spec::LATEST.to_owned(),
            clustermesh_cni::Error::Decode(format!("reading stdin: {e}")),
        )),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(s) => {
            if !s.is_empty() {
                let _ = writeln!(out, "{s}");
            }
        }
        Err((version, e)) => {
            let reply = clustermesh_cni::spec::ErrorReply {
                cni_version: version,
                code: e.code().number(),
                msg: e.to_string(),
                details: e.details(),
            };
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string(&reply).unwrap_or_else(|_| e.to_string())
            );
            let _ = out.flush();
            std::process::exit(1);
        }
    }
}
