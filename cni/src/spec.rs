//! The CNI 1.1 protocol as this plugin speaks it: the environment variables of each
//! command, the network configuration, the result and error JSON, and version negotiation
//! (containernetworking/cni `SPEC.md`).
//!
//! It must not touch the kernel or the allocation file: it only decodes and encodes.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Versions this plugin accepts in `cniVersion` (and lists for `VERSION`), oldest first.
/// 0.4.0 is the first with CHECK; results before 1.0.0 carry `"version": "4"` per IP.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];

/// The newest supported version.
pub const LATEST: &str = "1.1.0";

/// The pods' gateway: a link-local address the pod reaches through a permanent neighbour
/// entry for the host-side veth (Cilium's scheme), so the host side needs no address.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The spec's well-known error codes (plugin-specific ones are ≥ 100).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// 1: incompatible CNI version.
    IncompatibleVersion,
    /// 3: container unknown or does not exist (no cleanup needed).
    UnknownContainer,
    /// 4: invalid necessary environment variables.
    InvalidEnvironment,
    /// 5: I/O failure.
    Io,
    /// 6: failed to decode content.
    Decode,
    /// 7: invalid network config.
    InvalidConfig,
    /// 11: try again later.
    TryAgainLater,
    /// 50: the plugin is not available (STATUS).
    NotAvailable,
    /// 100: no free address left in the pod CIDR (plugin-specific).
    AddressesExhausted,
    /// 101: CHECK found the attachment not as ADD left it (plugin-specific).
    CheckFailed,
}

impl Code {
    /// The number on the wire.
    pub fn number(self) -> u32 {
        match self {
            Code::IncompatibleVersion => 1,
            Code::UnknownContainer => 3,
            Code::InvalidEnvironment => 4,
            Code::Io => 5,
            Code::Decode => 6,
            Code::InvalidConfig => 7,
            Code::TryAgainLater => 11,
            Code::NotAvailable => 50,
            Code::AddressesExhausted => 100,
            Code::CheckFailed => 101,
        }
    }
}

/// The error JSON (`{"cniVersion", "code", "msg", "details"}`).
#[derive(Debug, Serialize)]
pub struct ErrorReply {
    /// The version of the request (or the newest).
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// The code.
    pub code: u32,
    /// One line: what failed.
    pub msg: String,
    /// The cause chain and what to do.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

/// A CNI command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Attach.
    Add,
    /// Detach.
    Del,
    /// Verify an attachment.
    Check,
    /// Report the supported versions.
    Version,
    /// Ready for ADD?
    Status,
    /// Release what is not in `cni.dev/valid-attachments`.
    Gc,
}

impl Command {
    /// Parses `CNI_COMMAND`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        })
    }
}

/// The `CNI_*` variables of one invocation, validated for its command.
#[derive(Clone, Debug)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (ADD, DEL, CHECK).
    pub container_id: String,
    /// `CNI_NETNS` (ADD, CHECK; optional for DEL).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME` (ADD, DEL, CHECK).
    pub ifname: String,
}

impl Env {
    /// Reads and checks the variables through `get` (the process environment in the
    /// binary). The error is the message for code 4.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let var = |name: &str| get(name).filter(|v| !v.is_empty());
        let command = var("CNI_COMMAND").ok_or("CNI_COMMAND is not set")?;
        let command = Command::parse(&command).ok_or_else(|| {
            format!("CNI_COMMAND {command:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC")
        })?;
        let mut env = Env {
            command,
            container_id: String::new(),
            netns: None,
            ifname: String::new(),
        };
        if matches!(command, Command::Add | Command::Del | Command::Check) {
            let missing = |n: &str| format!("CNI_{n} is required for {command}");
            env.container_id = var("CNI_CONTAINERID").ok_or_else(|| missing("CONTAINERID"))?;
            if !env
                .container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            {
                return Err(format!(
                    "CNI_CONTAINERID {:?} may hold only letters, digits, '_', '.' and '-'",
                    env.container_id
                ));
            }
            env.ifname = var("CNI_IFNAME").ok_or_else(|| missing("IFNAME"))?;
            if env.ifname.len() > 15
                || env.ifname.contains(['/', ':'])
                || env.ifname.chars().any(char::is_whitespace)
                || env.ifname == "."
                || env.ifname == ".."
            {
                return Err(format!(
                    "CNI_IFNAME {:?} is not an interface name (at most 15 characters, no '/', ':' or spaces)",
                    env.ifname
                ));
            }
            env.netns = var("CNI_NETNS").map(PathBuf::from);
            if env.netns.is_none() && command != Command::Del {
                return Err(missing("NETNS"));
            }
        }
        Ok(env)
    }
}

/// An attachment the runtime still uses (`cni.dev/valid-attachments` of GC).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    /// The container.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Its interface.
    pub ifname: String,
}

/// An IPv4 prefix (`10.1.1.0/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// Network address (host bits zero).
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub len: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`; host bits must be zero.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a prefix (a.b.c.d/n)"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{s:?}: {a:?} is not an IPv4 address"))?;
        let len: u8 = l
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("{s:?}: prefix length {l:?} is not 0..=32"))?;
        let c = Cidr { addr, len };
        if c.network() != addr {
            return Err(format!(
                "{s:?} has host bits set (the network is {}/{len})",
                c.network()
            ));
        }
        Ok(c)
    }

    fn mask(self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        }
    }

    /// The network address.
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// Whether `ip` is inside.
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// The addresses pods may get: all but the network and broadcast addresses (a /31 or
    /// /32 has no such reserved ones).
    pub fn hosts(self) -> (u32, u32) {
        let first = u32::from(self.network());
        let last = first | !self.mask();
        if self.len >= 31 {
            (first, last)
        } else {
            (first + 1, last - 1)
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// The network configuration as it arrives (only the decoding can fail here).
#[derive(Debug, Deserialize)]
pub struct RawConfig {
    /// `cniVersion`.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: Option<String>,
    /// `cniVersions` (1.1: the runtime picks the newest it knows).
    #[serde(rename = "cniVersions", default)]
    pub cni_versions: Option<Vec<String>>,
    /// Everything else, checked by [`Config::from_raw`].
    #[serde(flatten)]
    pub rest: BTreeMap<String, serde_json::Value>,
}

/// The validated network configuration of `clustermesh-cni`.
///
/// ```json
/// {"cniVersion": "1.1.0", "name": "clustermesh", "type": "clustermesh-cni",
///  "podCIDR": "10.1.1.0/24", "rangeStart": "10.1.1.11",
///  "stateDir": "/var/run/clustermesh", "mtu": 1450, "routes": ["10.0.0.0/8"]}
/// ```
#[derive(Clone, Debug)]
pub struct Config {
    /// The negotiated version (what results carry).
    pub cni_version: String,
    /// `name`: the network (names the allocation file).
    pub name: String,
    /// The node's pod CIDR (the Node object's `spec.podCIDR`).
    pub pod_cidr: Cidr,
    /// First address handed out (default: the first host address).
    pub range_start: Ipv4Addr,
    /// The agent's state directory; allocations live in `<stateDir>/cni/`.
    pub state_dir: PathBuf,
    /// MTU of both veth ends.
    pub mtu: u32,
    /// Prefixes the pod routes through [`GATEWAY`] (default `0.0.0.0/0`).
    pub routes: Vec<Cidr>,
    /// `prevResult` (CHECK).
    pub prev_result: Option<serde_json::Value>,
    /// `cni.dev/valid-attachments` (GC).
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// Where allocations are kept when the config does not say.
pub const DEFAULT_STATE_DIR: &str = "/var/run/clustermesh";

/// Why a configuration is refused.
#[derive(Debug)]
pub enum ConfigError {
    /// Code 1.
    Version(String),
    /// Code 7.
    Invalid(String),
}

impl Config {
    /// Negotiates the version and checks every field.
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let cni_version = negotiate(&raw).map_err(ConfigError::Version)?;
        let bad = |s: String| ConfigError::Invalid(s);
        let r = &raw.rest;
        let string = |k: &str| -> Result<Option<String>, ConfigError> {
            match r.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => Err(bad(format!("{k:?} must be a string, not {v}"))),
            }
        };
        let name = string("name")?.ok_or_else(|| bad("\"name\" is required".into()))?;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            || name.starts_with('.')
        {
            return Err(bad(format!(
                "\"name\" {name:?} may hold only letters, digits, '_', '.' and '-'"
            )));
        }
        let pod_cidr = string("podCIDR")?
            .ok_or_else(|| bad("\"podCIDR\" (the node's pod CIDR) is required".into()))?;
        let pod_cidr = Cidr::parse(&pod_cidr).map_err(|e| bad(format!("\"podCIDR\": {e}")))?;
        let (first, last) = pod_cidr.hosts();
        let range_start = match string("rangeStart")? {
            None => Ipv4Addr::from(first),
            Some(s) => {
                let ip: Ipv4Addr = s
                    .parse()
                    .map_err(|_| bad(format!("\"rangeStart\" {s:?} is not an IPv4 address")))?;
                if !(first..=last).contains(&u32::from(ip)) {
                    return Err(bad(format!(
                        "\"rangeStart\" {ip} is not a host address of \"podCIDR\" {pod_cidr}"
                    )));
                }
                ip
            }
        };
        let state_dir =
            PathBuf::from(string("stateDir")?.unwrap_or_else(|| DEFAULT_STATE_DIR.to_owned()));
        if !state_dir.is_absolute() {
            return Err(bad(format!(
                "\"stateDir\" {} must be an absolute path",
                state_dir.display()
            )));
        }
        let mtu = match r.get("mtu") {
            None | Some(serde_json::Value::Null) => 1500,
            Some(v) => v
                .as_u64()
                .filter(|m| (68..=65535).contains(m))
                .ok_or_else(|| bad(format!("\"mtu\" {v} is not 68..=65535")))?
                as u32,
        };
        let routes = match r.get("routes") {
            None | Some(serde_json::Value::Null) => vec![Cidr {
                addr: Ipv4Addr::UNSPECIFIED,
                len: 0,
            }],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| match v.as_str() {
                    Some(s) => Cidr::parse(s).map_err(|e| bad(format!("\"routes\": {e}"))),
                    None => Err(bad(format!("\"routes\" holds {v}, not a prefix string"))),
                })
                .collect::<Result<_, _>>()?,
            Some(v) => {
                return Err(bad(format!(
                    "\"routes\" must be a list of prefixes, not {v}"
                )))
            }
        };
        let valid_attachments = match r.get("cni.dev/valid-attachments") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| {
                bad(format!(
                    "\"cni.dev/valid-attachments\" must be a list of {{\"containerID\", \"ifname\"}}: {e}"
                ))
            })?),
        };
        Ok(Config {
            cni_version,
            name,
            pod_cidr,
            range_start,
            state_dir,
            mtu,
            routes,
            prev_result: r.get("prevResult").cloned(),
            valid_attachments,
        })
    }
}

fn version_key(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

/// The version to answer in: the newest of `cniVersions` this plugin supports, else
/// `cniVersion` if supported.
fn negotiate(raw: &RawConfig) -> Result<String, String> {
    if let Some(list) = &raw.cni_versions {
        if let Some(v) = list
            .iter()
            .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
            .max_by_key(|v| version_key(v))
        {
            return Ok(v.clone());
        }
    }
    match raw.cni_version.as_deref() {
        Some(v) if SUPPORTED_VERSIONS.contains(&v) => Ok(v.to_owned()),
        Some(v) => Err(format!(
            "cniVersion {v:?} is not supported; this plugin speaks {}",
            SUPPORTED_VERSIONS.join(", ")
        )),
        None => Err(format!(
            "the config has no cniVersion; this plugin speaks {}",
            SUPPORTED_VERSIONS.join(", ")
        )),
    }
}

/// One interface of a result.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Interface {
    /// Name.
    pub name: String,
    /// MAC, `aa:bb:…`.
    pub mac: String,
    /// The netns path for the container's side.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sandbox: Option<String>,
}

/// One address of a result.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IpConfig {
    /// `"4"` in 0.4.0 results only.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub version: Option<String>,
    /// `a.b.c.d/n`.
    pub address: String,
    /// Gateway.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub interface: Option<usize>,
}

/// One route of a result.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteConfig {
    /// Destination prefix.
    pub dst: String,
    /// Next hop.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gw: Option<String>,
}

/// The ADD result.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddResult {
    /// Version.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Host side first, then the container's.
    pub interfaces: Vec<Interface>,
    /// The pod's address.
    pub ips: Vec<IpConfig>,
    /// The pod's routes.
    pub routes: Vec<RouteConfig>,
    /// No DNS settings (the runtime's own).
    pub dns: serde_json::Value,
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> RawConfig {
        serde_json::from_str(json).expect("decodes")
    }

    #[test]
    fn versions_are_negotiated_to_the_newest_common_one() {
        let c = Config::from_raw(raw(
            r#"{"cniVersion":"1.0.0","cniVersions":["0.3.1","1.0.0","1.1.0","9.0.0"],"name":"n","podCIDR":"10.1.1.0/24"}"#,
        ))
        .expect("valid");
        assert_eq!(c.cni_version, "1.1.0");
        let Err(ConfigError::Version(e)) = Config::from_raw(raw(
            r#"{"cniVersion":"0.2.0","name":"n","podCIDR":"10.1.1.0/24"}"#,
        )) else {
            panic!("0.2.0 must be refused as a version")
        };
        assert!(e.contains("0.4.0, 1.0.0, 1.1.0"), "{e}");
    }

    #[test]
    fn invalid_fields_are_named() {
        for (json, want) in [
            (
                r#"{"cniVersion":"1.1.0","podCIDR":"10.1.1.0/24"}"#,
                "\"name\" is required",
            ),
            (r#"{"cniVersion":"1.1.0","name":"n"}"#, "\"podCIDR\""),
            (
                r#"{"cniVersion":"1.1.0","name":"n","podCIDR":"10.1.1.5/24"}"#,
                "host bits",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"../x","podCIDR":"10.1.1.0/24"}"#,
                "\"name\"",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","podCIDR":"10.1.1.0/24","rangeStart":"10.1.2.1"}"#,
                "rangeStart",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","podCIDR":"10.1.1.0/24","mtu":10}"#,
                "mtu",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","podCIDR":"10.1.1.0/24","routes":[1]}"#,
                "routes",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","podCIDR":"10.1.1.0/24","stateDir":"rel"}"#,
                "absolute",
            ),
        ] {
            match Config::from_raw(raw(json)) {
                Err(ConfigError::Invalid(e)) => assert!(e.contains(want), "{json}: {e}"),
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    #[test]
    fn environment_is_checked_per_command() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(Env::from_vars(vars(&[]))
            .unwrap_err()
            .contains("CNI_COMMAND"));
        assert!(Env::from_vars(vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "eth0")
        ]))
        .unwrap_err()
        .contains("CNI_CONTAINERID"));
        assert!(Env::from_vars(vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "a"),
            ("CNI_IFNAME", "eth0")
        ]))
        .unwrap_err()
        .contains("CNI_NETNS"));
        // DEL may come without a namespace (it may be gone already).
        let e = Env::from_vars(vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "a"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .expect("valid");
        assert_eq!(e.netns, None);
        assert!(Env::from_vars(vars(&[("CNI_COMMAND", "GC")])).is_ok());
        assert!(Env::from_vars(vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "a/b"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "eth0")
        ]))
        .is_err());
    }

    #[test]
    fn host_range_of_a_cidr() {
        let c = Cidr::parse("10.1.1.0/24").expect("valid");
        assert_eq!(
            c.hosts(),
            (
                u32::from(Ipv4Addr::new(10, 1, 1, 1)),
                u32::from(Ipv4Addr::new(10, 1, 1, 254))
            )
        );
        assert!(c.contains(Ipv4Addr::new(10, 1, 1, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 1, 2, 1)));
    }
}
