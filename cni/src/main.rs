//! `clustermesh-cni`: the plugin binary. Reads `CNI_*` from the environment and the network
//! configuration from stdin, prints the result (or the CNI error JSON, exiting 1) on
//! stdout, as the CNI spec wants. All logic lives in the library.

use std::io::{Read as _, Write as _};

fn main() {
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
