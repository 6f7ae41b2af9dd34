//! `clustermesh`: the command line of the mesh, in the style of `cilium clustermesh`.

mod certs;
mod cni;
mod connectivity;
mod contexts;
mod enable;
mod http;
mod lab;
mod manifests;
mod observe;
mod remotes;
mod ui;

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
    /// Install the mesh in a cluster (--context; certificates, objects) or prepare a state dir.
    Enable(enable::EnableCmd),
    /// Connect two clusters in both directions (remote configs, CA, etcd users).
    Connect(remotes::ConnectArgs),
    /// Undo `connect`.
    Disconnect(remotes::DisconnectArgs),
    /// Show whether every remote cluster is connected and synced, with hints.
    Status(remotes::StatusArgs),
    /// A whole mesh on this machine.
    #[command(subcommand)]
    Lab(LabCommand),
    /// Pod-to-pod checks over the lab (same node, cross node, cross cluster; TCP and ICMP).
    #[command(subcommand)]
    Connectivity(ConnectivityCommand),
    /// Flows from every agent (policy verdicts, drops), like `hubble observe`.
    Observe(observe::ObserveArgs),
    /// The Kubernetes objects of a cluster's mesh install (YAML), or the deploy/kubernetes tree.
    Manifests(manifests::ManifestsArgs),
    /// A web view of the mesh: clusters, service map, live flows (like Hubble UI).
    Ui(ui::UiArgs),
    /// Install clustermesh-cni on a node (the agent DaemonSet's init step).
    #[command(subcommand)]
    Cni(cni::CniCommand),
}

#[derive(Debug, Subcommand)]
enum ConnectivityCommand {
    /// Run every check; exits non-zero on any failure.
    Test(connectivity::TestArgs),
}

#[derive(Debug, Subcommand)]
enum LabCommand {
    /// Bring the lab up.
    Up(lab::UpArgs),
    /// Show namespaces, addresses, etcd endpoints, certificates and component state.
    Status(lab::DirArgs),
    /// Stop everything the lab started and remove it.
    Down(lab::DirArgs),
    /// The echo server of a lab pod (runs inside the pod's namespace).
    #[command(hide = true)]
    Echo(lab::echo::EchoArgs),
    /// A load client against a lab pod (runs inside a pod's namespace).
    #[command(hide = true)]
    Load(lab::load::LoadArgs),
    /// The lab's kubelet of a control-plane pod (runs inside its namespace).
    #[command(hide = true)]
    Kubelet(lab::kubelet::KubeletArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Certs(c) => certs::run(c),
        Command::Enable(a) => enable::run_cmd(a),
        Command::Connect(a) => remotes::connect(a),
        Command::Disconnect(a) => remotes::disconnect(a),
        Command::Status(a) => remotes::status(a),
        Command::Lab(LabCommand::Up(a)) => lab::up(a),
        Command::Lab(LabCommand::Status(a)) => lab::status(a),
        Command::Lab(LabCommand::Down(a)) => lab::down(a),
        Command::Lab(LabCommand::Echo(a)) => lab::echo::run(a),
        Command::Lab(LabCommand::Load(a)) => lab::load::run(a),
        Command::Lab(LabCommand::Kubelet(a)) => lab::kubelet::run(a),
        Command::Connectivity(ConnectivityCommand::Test(a)) => connectivity::test(a),
        Command::Observe(a) => observe::run(a),
        Command::Manifests(a) => manifests::run(a),
        Command::Ui(a) => ui::run(a),
        Command::Cni(c) => cni::run(c),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("❌ {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn flags_are_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
