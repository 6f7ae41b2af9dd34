//! `clustermesh-apiserver`: parse flags, set up logging, run until SIGINT/SIGTERM (the
//! shutdown pattern of every long-running clustermesh binary: `clustermesh-runtime`).

use std::time::Duration;

use clap::Parser;
use clustermesh_apiserver::config::{Args, Config};

/// How long the apiserver gets to stop its tasks (sessions, embedded etcd) after a signal
/// before they are aborted.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let cfg = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("clustermesh-apiserver: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    clustermesh_runtime::init_tracing(&cfg.log_level);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("clustermesh-apiserver: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt
        .block_on(clustermesh_runtime::run(SHUTDOWN_GRACE, |token| {
            clustermesh_apiserver::run(cfg, token)
        }))
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("clustermesh-apiserver: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
