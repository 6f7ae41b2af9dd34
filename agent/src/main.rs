//! `clustermesh-agent`: for now only checks that this kernel can run the datapath.
//! The reconcile loop (syncer caches → maps) arrives with the rest of issue 4.

fn main() -> std::process::ExitCode {
    let bpffs = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/sys/fs/bpf".to_owned());
    match clustermesh_agent::kernel::check(std::path::Path::new(&bpffs)) {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
