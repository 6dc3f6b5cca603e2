//! The interception rules as data (pure): which interface, which chain, and the exact
//! `iptables` (and `ip6tables`) argument lists that add, check and delete them; and, with
//! `--iptables-connlimit`, the per-source connection limit in front of the agent's port.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::str::FromStr;
use std::time::Duration;

/// The address pods send metadata requests to.
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The address of the container credentials endpoint (EKS Pod Identity's).
pub const CONTAINER_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
/// The container credentials endpoint's IPv6 address (EKS Pod Identity's).
pub const CONTAINER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);
/// The metadata service's IPv6 address on Nitro instances (when its IPv6 endpoint is on).
pub const METADATA_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
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
    /// `--host-ipv6:--port`, where the agent also listens when the node has an IPv6 address:
    /// traffic for [`METADATA_IP6`] is sent there by `ip6tables`.
    pub target6: Option<SocketAddrV6>,
    /// The chain of our own ([`DEFAULT_CHAIN`]).
    pub chain: String,
    /// `--iptables-remove`: delete the rules at shutdown.
    pub remove_at_exit: bool,
    /// `--iptables-check-interval`: how often the rules are checked and restored.
    pub check_interval: Duration,
    /// `--container-endpoint`: also send 169.254.170.23:80 to the agent.
    pub container: bool,
    /// `--iptables-connlimit`: the most connections one source address may hold to the agent's
    /// port; the kernel resets the ones above it ([`Rules::limit`]).
    pub connlimit: Option<u32>,
}

/// The two rules of one address family, as `iptables -t nat` (or `ip6tables`) argument lists
/// without the command letter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// The metadata address the rules intercept.
    pub metadata: IpAddr,
    /// The chain name.
    pub chain: String,
    /// In `PREROUTING`: metadata traffic jumps to our chain. Matching here as well keeps every
    /// other packet out of the chain.
    pub jump: Vec<String>,
    /// In our chain: the DNAT to the agent, for traffic that arrived on the pod interface.
    pub dnat: Vec<String>,
    /// The built-in chains whose first rule is the jump: `PREROUTING` (pods); the container
    /// endpoint's also `OUTPUT` (hostNetwork pods); the connection limit's `INPUT`.
    pub builtins: &'static [&'static str],
    /// `nat` for the interception, `filter` for the connection limit.
    pub table: Table,
}

/// The table a set of rules lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Nat,
    Filter,
}

fn metadata_match(metadata: IpAddr) -> Vec<String> {
    let ip = match metadata {
        IpAddr::V4(ip) => format!("{ip}/32"),
        IpAddr::V6(ip) => format!("{ip}/128"),
    };
    ["-p", "tcp", "-d", ip.as_str(), "--dport", "80"].map(String::from).to_vec()
}

impl Rules {
    /// The IPv4 rules for `config`.
    pub fn new(config: &Config) -> Rules {
        Rules::to(config, IpAddr::V4(METADATA_IP), SocketAddr::V4(config.target))
    }

    /// The IPv6 rules for `config`, when it has an IPv6 target.
    pub fn new6(config: &Config) -> Option<Rules> {
        config.target6.map(|target| Rules::to(config, IpAddr::V6(METADATA_IP6), SocketAddr::V6(target)))
    }

    fn to(config: &Config, metadata: IpAddr, target: SocketAddr) -> Rules {
        let mut jump = metadata_match(metadata);
        jump.extend(["-j".to_string(), config.chain.clone()]);
        let mut dnat = Vec::new();
        if config.interface.negated {
            dnat.push("!".to_string());
        }
        dnat.extend(["-i".to_string(), config.interface.name.clone()]);
        dnat.extend(metadata_match(metadata));
        dnat.extend(["-j", "DNAT", "--to-destination"].map(String::from));
        dnat.push(target.to_string());
        Rules {
            metadata,
            chain: config.chain.clone(),
            jump,
            dnat,
            builtins: &["PREROUTING"],
            table: Table::Nat,
        }
    }

    /// With `--container-endpoint`: 169.254.170.23:80 sent to the agent, in a chain of its own
    /// (`<chain>-CT`) jumped to first from `PREROUTING` (pods) and `OUTPUT` (hostNetwork pods),
    /// from any interface: the address has no other owner on a node without EKS's own agent,
    /// and the caller is told by its token, not by where it came from.
    pub fn container(config: &Config) -> Option<Rules> {
        config
            .container
            .then(|| Rules::container_to(config, IpAddr::V4(CONTAINER_IP), SocketAddr::V4(config.target)))
    }

    /// The same for `[fd00:ec2::23]:80` through `ip6tables`, when the agent has an IPv6 address.
    pub fn container6(config: &Config) -> Option<Rules> {
        let target = config.target6.filter(|_| config.container)?;
        Some(Rules::container_to(config, IpAddr::V6(CONTAINER_IP6), SocketAddr::V6(target)))
    }

    fn container_to(config: &Config, ip: IpAddr, target: SocketAddr) -> Rules {
        let chain = format!("{}-CT", config.chain);
        let mut jump = metadata_match(ip);
        jump.extend(["-j".to_string(), chain.clone()]);
        let mut dnat = metadata_match(ip);
        dnat.extend(["-j", "DNAT", "--to-destination"].map(String::from));
        dnat.push(target.to_string());
        Rules { metadata: ip, chain, jump, dnat, builtins: &["PREROUTING", "OUTPUT"], table: Table::Nat }
    }

    /// With `--iptables-connlimit N`: in `filter`, a chain of our own (`<chain>-LIM`) jumped to
    /// first from `INPUT` for TCP to the agent's address and port (where the DNAT sends pods),
    /// whose one rule resets a new connection from a source address (`/32`, `/128` for IPv6)
    /// that already holds `N`. The kernel refuses it before the agent accepts it, so a flood
    /// costs the agent no file descriptor, and other sources are not counted against it.
    /// (`nat` may not filter: the limit cannot live beside the DNAT.)
    pub fn limit(config: &Config) -> Option<Rules> {
        Rules::limit_to(config, SocketAddr::V4(config.target))
    }

    /// The same for the agent's IPv6 address, with `ip6tables`.
    pub fn limit6(config: &Config) -> Option<Rules> {
        Rules::limit_to(config, SocketAddr::V6(config.target6?))
    }

    fn limit_to(config: &Config, target: SocketAddr) -> Option<Rules> {
        let above = config.connlimit?;
        let chain = format!("{}-LIM", config.chain);
        let (address, mask) = match target.ip() {
            IpAddr::V4(ip) => (format!("{ip}/32"), "32"),
            IpAddr::V6(ip) => (format!("{ip}/128"), "128"),
        };
        let port = target.port().to_string();
        let mut jump: Vec<String> =
            ["-p", "tcp", "-d", address.as_str(), "--dport", port.as_str()].map(String::from).to_vec();
        jump.extend(["-j".to_string(), chain.clone()]);
        let mut reject: Vec<String> =
            ["-p", "tcp", "--syn", "-m", "connlimit", "--connlimit-above"].map(String::from).to_vec();
        reject.push(above.to_string());
        reject.extend(
            ["--connlimit-mask", mask, "-j", "REJECT", "--reject-with", "tcp-reset"].map(String::from),
        );
        Some(Rules {
            metadata: target.ip(),
            chain,
            jump,
            dnat: reject,
            builtins: &["INPUT"],
            table: Table::Filter,
        })
    }

    /// `conntrack` arguments that delete the tracked flows that reach the metadata address
    /// itself: a flow opened before the DNAT existed (a kept-alive connection, one opened while
    /// no agent ran) would otherwise keep reaching the node's real service (kiam #284).
    ///
    /// Only flows whose replies come from that address are deleted. A flow already sent to an
    /// agent answers from the agent's address and is left alone: deleting it would cut a pod's
    /// connection opened between the rules going in and the flush. One sent to an earlier agent
    /// keeps going there, and never to the node's service, since NAT is decided once per flow.
    pub fn flush(&self) -> Vec<String> {
        let family = if self.metadata.is_ipv4() { "ipv4" } else { "ipv6" };
        let address = self.metadata.to_string();
        let address = address.as_str();
        ["-D", "-f", family, "-p", "tcp", "--orig-dst", address, "--reply-src", address, "--dport", "80"]
            .map(String::from)
            .to_vec()
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
        target6: None,
        chain: DEFAULT_CHAIN.into(),
        remove_at_exit: true,
        check_interval: Duration::from_secs(2),
        container: false,
        connlimit: None,
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
        assert_eq!(Rules::new6(&config("cali+")), None);
        assert_eq!(
            rules.flush().join(" "),
            "-D -f ipv4 -p tcp --orig-dst 169.254.169.254 --reply-src 169.254.169.254 --dport 80"
        );
    }

    #[test]
    fn ipv6_rules_send_the_ipv6_endpoint_to_the_agents_ipv6_address() {
        let dual = Config { target6: Some("[fd00:1::5]:8181".parse().expect("v6")), ..config("cali+") };
        let rules = Rules::new6(&dual).expect("an IPv6 target");
        assert_eq!(rules.jump.join(" "), "-p tcp -d fd00:ec2::254/128 --dport 80 -j KIAM-RS");
        assert_eq!(
            rules.dnat.join(" "),
            "-i cali+ -p tcp -d fd00:ec2::254/128 --dport 80 -j DNAT --to-destination [fd00:1::5]:8181"
        );
        assert_eq!(
            rules.flush().join(" "),
            "-D -f ipv6 -p tcp --orig-dst fd00:ec2::254 --reply-src fd00:ec2::254 --dport 80"
        );
    }

    #[test]
    fn the_connection_limit_resets_the_connection_above_it_per_source_address() {
        assert_eq!(Rules::limit(&config("cali+")), None, "off by default");
        let limited = Config { connlimit: Some(64), ..config("cali+") };
        let rules = Rules::limit(&limited).expect("a limit");
        assert_eq!(
            (rules.table, rules.chain.as_str(), rules.builtins),
            (Table::Filter, "KIAM-RS-LIM", &["INPUT"][..])
        );
        assert_eq!(rules.jump.join(" "), "-p tcp -d 10.0.0.5/32 --dport 8181 -j KIAM-RS-LIM");
        assert_eq!(
            rules.dnat.join(" "),
            "-p tcp --syn -m connlimit --connlimit-above 64 --connlimit-mask 32 -j REJECT --reject-with tcp-reset"
        );
        assert_eq!(Rules::limit6(&limited), None, "no IPv6 address, no IPv6 limit");
        let dual = Config { target6: Some("[fd00:1::5]:8181".parse().expect("v6")), ..limited };
        let rules6 = Rules::limit6(&dual).expect("an IPv6 limit");
        assert_eq!(rules6.jump.join(" "), "-p tcp -d fd00:1::5/128 --dport 8181 -j KIAM-RS-LIM");
        assert!(rules6.dnat.join(" ").contains("--connlimit-mask 128"));
        assert_eq!(Rules::new(&dual).table, Table::Nat);
    }
}
