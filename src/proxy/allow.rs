//! The allow-list: a tunnel may only reach addresses and ports a SpiceProxy lists. It is
//! checked on resolved addresses, and the proxy connects to exactly the address it checked
//! (no DNS rebinding). Loopback, link-local (cloud metadata), unspecified, multicast and
//! broadcast addresses are refused unless a rule lists them explicitly, i.e. a rule whose
//! whole block lies inside such a range (`0.0.0.0/0` does not count).

use std::net::IpAddr;
use std::sync::LazyLock;

use ipnet::IpNet;

use super::config::AllowedTarget;

#[derive(Debug, Clone)]
pub struct AllowList {
    rules: Vec<AllowedTarget>,
}

/// Addresses a catch-all rule must not open: loopback, "this network", link-local (cloud
/// metadata at 169.254.169.254 on AWS, Azure, GCP, OpenStack, Oracle), multicast, broadcast,
/// unspecified, and the metadata services elsewhere: AWS's and GCP's IPv6 ones, Alibaba's.
static SPECIAL: LazyLock<Vec<IpNet>> = LazyLock::new(|| {
    [
        "127.0.0.0/8", "0.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32",
        "100.100.100.200/32", "::1/128", "::/128", "fe80::/10", "ff00::/8", "fd00:ec2::254/128",
        "fd20:ce::254/128",
    ]
    .iter()
    .map(|r| r.parse().expect("valid built-in range"))
    .collect()
});

/// An IPv4-mapped IPv6 address is judged as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn is_special(ip: IpAddr) -> bool {
    SPECIAL.iter().any(|r| r.contains(&ip))
}

/// A rule lists special addresses explicitly when its whole block lies inside a special range.
fn explicitly_special(rule: &IpNet) -> bool {
    SPECIAL.iter().any(|r| r.contains(rule))
}

impl AllowList {
    pub fn new(rules: Vec<AllowedTarget>) -> Self {
        Self { rules }
    }

    pub fn permits(&self, ip: IpAddr, port: u16) -> bool {
        let ip = canonical(ip);
        let special = is_special(ip);
        self.rules.iter().any(|r| {
            r.cidr.contains(&ip)
                && r.ports.iter().any(|(from, to)| *from <= port && port <= *to)
                && (!special || explicitly_special(&r.cidr))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(rules: &[(&str, u16, u16)]) -> AllowList {
        AllowList::new(rules.iter().map(|(c, a, b)| AllowedTarget { cidr: c.parse().unwrap(), ports: vec![(*a, *b)] }).collect())
    }

    #[test]
    fn cidr_and_port_ranges() {
        let l = list(&[("10.0.0.0/16", 5900, 5999), ("2001:db8::/32", 5900, 5900)]);
        assert!(l.permits("10.0.3.4".parse().unwrap(), 5900));
        assert!(l.permits("10.0.3.4".parse().unwrap(), 5999));
        assert!(!l.permits("10.0.3.4".parse().unwrap(), 6000));
        assert!(!l.permits("10.1.0.1".parse().unwrap(), 5900));
        assert!(l.permits("2001:db8::7".parse().unwrap(), 5900));
        assert!(!l.permits("2001:db8::7".parse().unwrap(), 5901));
    }

    #[test]
    fn loopback_link_local_and_metadata_need_an_explicit_rule() {
        let open = list(&[("0.0.0.0/0", 1, 65535), ("::/0", 1, 65535)]);
        for ip in ["127.0.0.1", "169.254.169.254", "0.0.0.0", "::1", "fe80::1", "::ffff:127.0.0.1", "fd00:ec2::254", "fd20:ce::254", "100.100.100.200", "224.0.0.1"] {
            assert!(!open.permits(ip.parse().unwrap(), 5900), "{ip} allowed by a catch-all rule");
        }
        assert!(open.permits("192.0.2.1".parse().unwrap(), 5900));
        // Only the metadata address itself: its neighbours in shared address space stay open.
        assert!(open.permits("100.100.100.201".parse().unwrap(), 5900));
        let explicit = list(&[("127.0.0.1/32", 5900, 5900), ("::1/128", 5900, 5900)]);
        assert!(explicit.permits("127.0.0.1".parse().unwrap(), 5900));
        assert!(explicit.permits("::ffff:127.0.0.1".parse().unwrap(), 5900));
        assert!(explicit.permits("::1".parse().unwrap(), 5900));
        assert!(!explicit.permits("127.0.0.2".parse().unwrap(), 5900));
    }
}
