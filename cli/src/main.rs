//! `clustermesh`: the command line of the mesh, in the style of `cilium clustermesh`.

mod certs;
mod clustermesh;
mod enable;
mod http;
mod lab;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "clustermesh",
    version,
    about = "Connect clusters into one network (Cilium ClusterMesh compatible)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Certificates: create or import the CA, issue cluster certificates, show them.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Prepare a cluster for the mesh (certificates, apiserver config, state dir).
    Enable(enable::EnableArgs),
    /// Connect two clusters in both directions (remote configs, CA, etcd users).
    Connect(clustermesh::ConnectArgs),
    /// Undo `connect`.
    Disconnect(clustermesh::DisconnectArgs),
    /// Show whether every remote cluster is connected and synced, with hints.
    Status(clustermesh::StatusArgs),
    /// A whole mesh on this machine.
    #[command(subcommand)]
    Lab(LabCommand),
}

#[derive(Debug, Subcommand)]
enum LabCommand {
    /// Bring the lab up.
    Up(lab::UpArgs),
    /// Show namespaces, addresses, etcd endpoints, certificates and component state.
    Status(lab::DirArgs),
    /// Stop everything the lab started and remove it.
    Down(lab::DirArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Certs(c) => certs::run(c),
        Command::Enable(a) => enable::run(a),
        Command::Connect(a) => clustermesh::connect(a),
        Command::Disconnect(a) => clustermesh::disconnect(a),
        Command::Status(a) => clustermesh::status(a),
        Command::Lab(LabCommand::Up(a)) => lab::up(a),
        Command::Lab(LabCommand::Status(a)) => lab::status(a),
        Command::Lab(LabCommand::Down(a)) => lab::down(a),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("❌ {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
