//! IPv6 for the test nodes and pods of [`crate::netns`], for the agent's `ip6tables` rules: a pod
//! gets `fd00:251:N::2/64` on its veth (the node's end `::1`) and a default IPv6 route, and a
//! node gets an IPv6 address for the agent and, for a decoy of its real metadata service,
//! `fd00:ec2::254`. Addresses are added without duplicate address detection (`nodad`), so they
//! are usable at once.

use std::net::Ipv6Addr;

use crate::netns::{NodeNet, PodNet, ip};

impl PodNet {
    /// Adds IPv6 to the pod's veth pair; returns the pod's IPv6 address.
    pub fn enable_ipv6(&self) -> Ipv6Addr {
        let slot = u16::from(self.pod_ip.octets()[2]);
        let (pod6, host6) = (
            Ipv6Addr::new(0xfd00, 0x251, slot, 0, 0, 0, 0, 2),
            Ipv6Addr::new(0xfd00, 0x251, slot, 0, 0, 0, 0, 1),
        );
        let on_host = |args: &[&str]| match &self.node {
            Some(node) => ip(&[&["-n", node.as_str()], args].concat()),
            None => ip(args),
        };
        let (pod_cidr, host_cidr, via) = (format!("{pod6}/64"), format!("{host6}/64"), host6.to_string());
        let steps = [
            on_host(&["-6", "addr", "add", &host_cidr, "dev", &self.host_if, "nodad"]),
            ip(&["-n", &self.name, "-6", "addr", "add", &pod_cidr, "dev", &self.pod_if, "nodad"]),
            ip(&["-n", &self.name, "-6", "route", "add", "default", "via", &via]),
        ];
        for step in steps {
            step.unwrap_or_else(|e| panic!("IPv6 for {}: {e}", self.name));
        }
        pod6
    }
}

impl NodeNet {
    /// Gives the node an IPv6 address for the agent (`fd00:250:N::1`, on its loopback) and
    /// returns it.
    pub fn enable_ipv6(&self) -> Ipv6Addr {
        let slot = u16::from(self.agent_ip.octets()[2]);
        let agent6 = Ipv6Addr::new(0xfd00, 0x250, slot, 0, 0, 0, 0, 1);
        self.add_address6(agent6);
        agent6
    }

    /// Gives the node a default IPv6 route (through its loopback), as [`NodeNet::add_default_route`]
    /// does for IPv4: without it the node's own connections to `fd00:ec2::23` fail before any DNAT.
    pub fn add_default_route6(&self) {
        ip(&["-n", &self.name, "-6", "route", "add", "default", "dev", "lo"])
            .unwrap_or_else(|e| panic!("an IPv6 default route on {}: {e}", self.name));
    }

    /// Adds `ip`/128 to the node's loopback (`fd00:ec2::254` for a decoy metadata service).
    pub fn add_address6(&self, ip6: Ipv6Addr) {
        ip(&["-n", &self.name, "-6", "addr", "add", &format!("{ip6}/128"), "dev", "lo", "nodad"])
            .unwrap_or_else(|e| panic!("{ip6} on {}: {e}", self.name));
    }

    /// `ip6tables -t nat -S` inside the node.
    pub fn nat_rules6(&self) -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, "ip6tables", "-w", "-t", "nat", "-S"])
            .output()
            .expect("run ip6tables");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
