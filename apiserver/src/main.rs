//! `clustermesh-apiserver`: parse flags (`cli`), set up logging, run the library until
//! SIGINT/SIGTERM (the shutdown pattern of every long-running clustermesh binary:
//! `clustermesh-runtime`, one root token, the library's tasks in a `JoinSet`, a grace period).

mod cli;

use std::time::Duration;

use clap::Parser;
use cli::Args;

/// How long the apiserver gets to stop its tasks (sessions, embedded etcd) after a signal
/// before they are aborted.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let cfg = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("clustermesh-apiserver: {e}");
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
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Every layer's message carries its cause: print it once, as is.
            tracing::error!("{e}");
            eprintln!("clustermesh-apiserver: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
