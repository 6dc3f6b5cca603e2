//! The interception rules as data (pure): which interface, which chain, and the exact
//! `iptables` argument lists that add, check and delete them.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::str::FromStr;
use std::time::Duration;

/// The address pods send metadata requests to.
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The address of the container credentials endpoint (EKS Pod Identity's).
pub const CONTAINER_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
/// The chain the agent owns, jumped to from `nat PREROUTING`.
pub const DEFAULT_CHAIN: &str = "KIAM-RS";
/// The longest chain name iptables accepts.
const MAX_CHAIN_LEN: usize = 28;
/// The longest interface name Linux accepts (`IFNAMSIZ` less the NUL).
const MAX_INTERFACE_LEN: usize = 15;

/// `--host-interface`: the interface pod traffic arrives on. A trailing `+` matches every
/// interface with that prefix (`cali+`); a leading `!` matches every interface but that one
/// (`!eth0`, for the AWS VPC CNI, where pods sit behind many `eni*` interfaces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    name: String,
    negated: bool,
}

/// Why an interface or chain name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "interface {0:?}: expected [!]name[+], at most 15 characters of letters, digits, '.', '_', '-', '@'"
    )]
    Interface(String),
    #[error("chain {0:?}: expected at most 28 characters of letters, digits, '_' and '-'")]
    Chain(String),
}

impl FromStr for Interface {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Interface, NameError> {
        let (negated, name) = match s.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let stem = name.strip_suffix('+').unwrap_or(name);
        let ok = !name.is_empty()
            && name.len() <= MAX_INTERFACE_LEN
            && stem.chars().all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c));
        if !ok {
            return Err(NameError::Interface(s.to_string()));
        }
        Ok(Interface { name: name.to_string(), negated })
    }
}

impl fmt::Display for Interface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", if self.negated { "!" } else { "" }, self.name)
    }
}

/// Checks a chain name.
pub fn check_chain(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CHAIN_LEN
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c));
    if ok { Ok(()) } else { Err(NameError::Chain(name.to_string())) }
}

/// What `--iptables` installs and how it looks after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `--host-interface`.
    pub interface: Interface,
    /// `--host:--port`, where the agent listens.
    pub target: SocketAddrV4,
    /// The chain of our own ([`DEFAULT_CHAIN`]).
    pub chain: String,
    /// `--iptables-remove`: delete the rules at shutdown.
    pub remove_at_exit: bool,
    /// `--iptables-check-interval`: how often the rules are checked and restored.
    pub check_interval: Duration,
    /// `--container-endpoint`: also send 169.254.170.23:80 to the agent.
    pub container: bool,
}

/// The two rules, as `iptables -t nat` argument lists without the command letter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// The chain name.
    pub chain: String,
    /// In `PREROUTING`: metadata traffic jumps to our chain. Matching here as well keeps every
    /// other packet out of the chain.
    pub jump: Vec<String>,
    /// In our chain: the DNAT to the agent, for traffic that arrived on the pod interface.
    pub dnat: Vec<String>,
    /// With `--container-endpoint`: the jump for 169.254.170.23:80 (from `PREROUTING` for pods
    /// and from `OUTPUT` for hostNetwork pods) and its DNAT to the agent, from any interface:
    /// the address has no other owner on a node without EKS's own agent, and the pod is told
    /// by its token, not by where it came from.
    pub container: Option<ContainerRules>,
}

/// The container endpoint's two rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRules {
    pub jump: Vec<String>,
    pub dnat: Vec<String>,
}

fn metadata_match() -> Vec<String> {
    destination_match(METADATA_IP)
}

fn destination_match(ip: Ipv4Addr) -> Vec<String> {
    let ip = format!("{ip}/32");
    ["-p", "tcp", "-d", ip.as_str(), "--dport", "80"].map(String::from).to_vec()
}

impl Rules {
    /// The rules for `config`.
    pub fn new(config: &Config) -> Rules {
        let mut jump = metadata_match();
        jump.extend(["-j".to_string(), config.chain.clone()]);
        let mut dnat = Vec::new();
        if config.interface.negated {
            dnat.push("!".to_string());
        }
        dnat.extend(["-i".to_string(), config.interface.name.clone()]);
        dnat.extend(metadata_match());
        dnat.extend(["-j", "DNAT", "--to-destination"].map(String::from));
        dnat.push(config.target.to_string());
        let container = config.container.then(|| {
            let mut jump = destination_match(CONTAINER_IP);
            jump.extend(["-j".to_string(), config.chain.clone()]);
            let mut dnat = destination_match(CONTAINER_IP);
            dnat.extend(["-j", "DNAT", "--to-destination"].map(String::from));
            dnat.push(config.target.to_string());
            ContainerRules { jump, dnat }
        });
        Rules { chain: config.chain.clone(), jump, dnat, container }
    }

    /// What our chain holds, in order.
    pub fn in_chain(&self) -> Vec<&Vec<String>> {
        std::iter::once(&self.dnat).chain(self.container.as_ref().map(|c| &c.dnat)).collect()
    }

    /// The jumps to our chain, each with the built-in chain it sits at the top of.
    pub fn jumps(&self) -> Vec<(&'static str, &Vec<String>)> {
        let mut jumps = vec![("PREROUTING", &self.jump)];
        if let Some(c) = &self.container {
            jumps.extend([("PREROUTING", &c.jump), ("OUTPUT", &c.jump)]);
        }
        jumps
    }
}

/// `[op, chain, rest...]` as owned strings.
pub fn command(op: &str, chain: &str, rest: &[String]) -> Vec<String> {
    let mut args = vec![op.to_string(), chain.to_string()];
    args.extend_from_slice(rest);
    args
}

/// A configuration for unit tests: DNAT to 10.0.0.5:8181 on `interface`, checked every 2 s.
#[cfg(test)]
pub(crate) fn test_config(interface: &str) -> Config {
    Config {
        interface: interface.parse().expect("interface"),
        target: "10.0.0.5:8181".parse().expect("target"),
        chain: DEFAULT_CHAIN.into(),
        remove_at_exit: true,
        check_interval: Duration::from_secs(2),
        container: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(interface: &str) -> Config {
        test_config(interface)
    }

    #[test]
    fn interfaces() {
        for good in ["docker0", "cali+", "!eth0", "eni+", "kube-bridge", "vlan.100", "+", "!lxc+"] {
            let parsed: Interface = good.parse().expect(good);
            assert_eq!(parsed.to_string(), good);
        }
        for bad in ["", "!", "a b", "eth0/1", "x+y", "++", "!!eth0", "waytoolonginterface", "-i eth0"] {
            assert!(bad.parse::<Interface>().is_err(), "{bad}");
        }
    }

    #[test]
    fn chains() {
        assert!(check_chain("KIAM-RS").is_ok());
        assert!(check_chain("KIAM-RS-12").is_ok());
        for bad in ["", "a b", "x".repeat(29).as_str(), "PRE;ROUTING"] {
            assert!(check_chain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rules_match_only_metadata_traffic() {
        let rules = Rules::new(&config("cali+"));
        assert_eq!(rules.jump.join(" "), "-p tcp -d 169.254.169.254/32 --dport 80 -j KIAM-RS");
        assert_eq!(
            rules.dnat.join(" "),
            "-i cali+ -p tcp -d 169.254.169.254/32 --dport 80 -j DNAT --to-destination 10.0.0.5:8181"
        );
        let negated = Rules::new(&config("!eth0"));
        assert_eq!(negated.dnat[..3].join(" "), "! -i eth0");
        assert_eq!(negated.in_chain().len(), 1);
    }

    #[test]
    fn the_container_endpoint_is_intercepted_from_pods_and_from_the_node() {
        let rules = Rules::new(&Config { container: true, ..config("cali+") });
        let c = rules.container.clone().expect("container rules");
        assert_eq!(c.jump.join(" "), "-p tcp -d 169.254.170.23/32 --dport 80 -j KIAM-RS");
        assert_eq!(
            c.dnat.join(" "),
            "-p tcp -d 169.254.170.23/32 --dport 80 -j DNAT --to-destination 10.0.0.5:8181"
        );
        assert_eq!(rules.in_chain(), vec![&rules.dnat, &c.dnat]);
        let jumps: Vec<&str> = rules.jumps().iter().map(|(chain, _)| *chain).collect();
        assert_eq!(jumps, ["PREROUTING", "PREROUTING", "OUTPUT"]);
    }
}
