//! The allow-list: a tunnel may only reach addresses and ports a SpiceProxy lists. It is
//! checked on resolved addresses, and the proxy connects to exactly the address it checked
//! (no DNS rebinding). Loopback, link-local (cloud metadata), unspecified, multicast and
//! broadcast addresses are refused unless a rule lists them explicitly, i.e. a rule whose
//! whole block lies inside such a range (`0.0.0.0/0` does not count). An IPv6 address that
//! carries an IPv4 address for a translator or relay to reach (NAT64's well-known and
//! local-use prefixes, 6to4, Teredo, an ISATAP interface identifier) is special when the IPv4
//! address it carries is.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use ipnet::{IpNet, Ipv4Net};

use super::config::AllowedTarget;

#[derive(Debug, Clone, PartialEq)]
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

/// `canonical` for a socket address.
pub fn canonical_addr(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(canonical(addr.ip()), addr.port())
}

/// IPv6 addresses that carry an IPv4 address a gateway or tunnel reaches on the client's
/// behalf, and the bit at which it starts: a NAT64 gateway turns 64:ff9b::a9fe:a9fe into
/// 169.254.169.254 (RFC 6052), a 6to4 relay sends 2002:7f00:1:: to 127.0.0.1 (RFC 3056). The
/// local-use NAT64 block 64:ff9b:1::/48 (RFC 8215) may be translated to addresses the
/// well-known prefix may not name; a network picks its own prefix inside it, nearly always a /96
/// (the IPv4 address last, as behind the well-known prefix), and that is how it is read.
/// A Teredo address (RFC 4380) ends with its client's NAT address, every bit inverted: a
/// host with a Teredo interface sends to it directly, over UDP. ISATAP (RFC 5214) is no
/// prefix but an interface identifier, `0:5efe` or `200:5efe` then the IPv4 address, under
/// any /64: a host with an ISATAP interface sends such an address to that IPv4 address (the
/// same test as Linux's `ipv6_addr_is_isatap`).
/// A catch-all IPv6 rule must not open through them what it may not open directly.
struct Embedding {
    /// The bits an address must have to carry an IPv4 address this way, and their values.
    mask: u128,
    value: u128,
    ipv4_from_bit: u8,
    /// XORed with the 32 bits to get the IPv4 address (Teredo's obfuscation).
    xor: u32,
}

impl Embedding {
    const fn prefix(net: Ipv6Addr, len: u8, ipv4_from_bit: u8, xor: u32) -> Self {
        let mask = !(u128::MAX >> len);
        Self { mask, value: net.to_bits() & mask, ipv4_from_bit, xor }
    }
    /// A rule fixes the masked bits for all its addresses when its prefix reaches the last of them.
    fn pattern_len(&self) -> u8 {
        (128 - self.mask.trailing_zeros()) as u8
    }
    fn carries(&self, ip: Ipv6Addr) -> bool {
        ip.to_bits() & self.mask == self.value
    }
    fn ipv4(&self, ip: Ipv6Addr) -> Ipv4Addr {
        Ipv4Addr::from((ip.to_bits() >> (96 - self.ipv4_from_bit)) as u32 ^ self.xor)
    }
}

const EMBEDDING: [Embedding; 5] = [
    Embedding::prefix(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96, 96, 0),
    Embedding::prefix(Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48, 96, 0),
    Embedding::prefix(Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16, 16, 0),
    Embedding::prefix(Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 32, 96, u32::MAX),
    // Bits 64..96 are 0000:5efe, but for the universal/local bit (0200:5efe).
    Embedding { mask: 0xfdff_ffff << 32, value: 0x0000_5efe << 32, ipv4_from_bit: 96, xor: 0 },
];

/// The IPv4 addresses an IPv6 address carries for a NAT64 gateway, a 6to4 relay, Teredo or
/// ISATAP (two at once when a 6to4 or Teredo address has an ISATAP interface identifier).
fn embedded_ipv4(ip: Ipv6Addr) -> impl Iterator<Item = Ipv4Addr> {
    EMBEDDING.iter().filter(move |e| e.carries(ip)).map(move |e| e.ipv4(ip))
}

/// The IPv4 blocks a rule covers through those embeddings, for each one the rule lies inside
/// and is narrow enough to name IPv4 addresses through (longer than where the IPv4 address
/// starts). Inverting every bit maps a block onto a block of the same length, so Teredo's is
/// found the same way.
fn embedded_ipv4_blocks(rule: &IpNet) -> impl Iterator<Item = IpNet> + '_ {
    let net = match rule {
        IpNet::V6(net) => Some(*net),
        IpNet::V4(_) => None,
    };
    EMBEDDING.iter().filter_map(move |e| {
        let net = net.filter(|n| n.prefix_len() >= e.pattern_len() && e.carries(n.network()))?;
        let v4_len = net.prefix_len().checked_sub(e.ipv4_from_bit).filter(|l| *l > 0)?.min(32);
        Ipv4Net::new(e.ipv4(net.network()), v4_len).ok().map(|n| IpNet::V4(n.trunc()))
    })
}

fn is_special(ip: IpAddr) -> bool {
    let in_special = |ip: &IpAddr| SPECIAL.iter().any(|r| r.contains(ip));
    in_special(&ip) || matches!(ip, IpAddr::V6(v6) if embedded_ipv4(v6).any(|v4| in_special(&IpAddr::V4(v4))))
}

/// A rule lists special addresses explicitly when its whole block lies inside a special range,
/// directly or through the IPv4 block it covers behind a NAT64, 6to4 or Teredo prefix or an
/// ISATAP interface identifier.
fn explicitly_special(rule: &IpNet) -> bool {
    let in_special = |net: &IpNet| SPECIAL.iter().any(|r| r.contains(net));
    in_special(rule) || embedded_ipv4_blocks(rule).any(|v4| in_special(&v4))
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

    #[test]
    fn special_addresses_behind_nat64_and_6to4_prefixes_need_an_explicit_rule_too() {
        let open = list(&[("::/0", 1, 65535)]);
        // Behind the NAT64 well-known prefix: 169.254.169.254, 127.0.0.1, 100.100.100.200;
        // behind 6to4: 127.0.0.1, 169.254.169.254.
        // Behind a local-use NAT64 /96: 169.254.169.254 and 127.0.0.1.
        for ip in ["64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "64:ff9b::6464:64c8", "2002:7f00:1::", "2002:a9fe:a9fe:1::5", "64:ff9b:1::a9fe:a9fe", "64:ff9b:1:ab:cd::7f00:1"] {
            assert!(!open.permits(ip.parse().unwrap(), 5900), "{ip} allowed by a catch-all rule");
        }
        // Ordinary IPv4 hosts stay reachable through them.
        assert!(open.permits("64:ff9b::c000:201".parse().unwrap(), 5900));
        assert!(open.permits("2002:c000:201::1".parse().unwrap(), 5900));
        assert!(open.permits("64:ff9b:1:ab:cd::c000:201".parse().unwrap(), 5900));
        // Neither prefix as a whole lists the special addresses behind it explicitly, nor does a
        // /100 whose IPv4 block (160.0.0.0/4) spans special and ordinary addresses.
        let wide = list(&[("64:ff9b::/96", 5900, 5900), ("2002::/16", 5900, 5900), ("64:ff9b::a000:0/100", 5900, 5900)]);
        assert!(!wide.permits("64:ff9b::a9fe:a9fe".parse().unwrap(), 5900));
        assert!(!wide.permits("2002:7f00:1::".parse().unwrap(), 5900));
        // 169.254.0.0/16 behind NAT64 is a block inside a special range: explicit.
        let explicit = list(&[("64:ff9b::a9fe:0/112", 5900, 5900), ("2002:7f00:1::/48", 5900, 5900), ("64:ff9b:1:ab:cd::7f00:0/104", 5900, 5900)]);
        assert!(explicit.permits("64:ff9b::a9fe:a9fe".parse().unwrap(), 5900));
        assert!(explicit.permits("64:ff9b:1:ab:cd::7f00:1".parse().unwrap(), 5900));
        assert!(!explicit.permits("64:ff9b:1:ab:ce::7f00:1".parse().unwrap(), 5900), "another /96 of the local-use block is not listed");
        assert!(!list(&[("64:ff9b:1::/48", 5900, 5900)]).permits("64:ff9b:1::7f00:1".parse().unwrap(), 5900), "the whole local-use block is not explicit");
        assert!(explicit.permits("2002:7f00:1::9".parse().unwrap(), 5900));
        assert_eq!(embedded_ipv4("2001:db8::a9fe:a9fe".parse().unwrap()).count(), 0, "only those prefixes carry IPv4 addresses");
    }

    #[test]
    fn teredo_addresses_are_judged_by_the_client_address_they_carry_inverted() {
        // Server 65.54.227.120, flags 0x8000, then the client's port and address, inverted.
        let teredo = |client: &str| -> IpAddr {
            let v4: Ipv4Addr = client.parse().unwrap();
            let bits = (0x2001_0000_4136_e378_8000_63bf_u128 << 32) | u128::from(!u32::from(v4));
            IpAddr::V6(Ipv6Addr::from(bits))
        };
        assert_eq!(teredo("127.0.0.1"), "2001:0:4136:e378:8000:63bf:80ff:fffe".parse::<IpAddr>().unwrap());
        let open = list(&[("::/0", 1, 65535)]);
        for client in ["127.0.0.1", "169.254.169.254", "0.0.0.0", "100.100.100.200"] {
            assert!(!open.permits(teredo(client), 5900), "Teredo to {client} allowed by a catch-all rule");
        }
        assert!(open.permits(teredo("192.0.2.1"), 5900));
        // Neither the whole prefix nor one server's /64 lists them explicitly; a /104 that names
        // 127.0.0.0/8 behind one server and port does, and only there.
        assert!(!list(&[("2001::/32", 5900, 5900), ("2001:0:4136:e378::/64", 5900, 5900)]).permits(teredo("127.0.0.1"), 5900));
        let explicit = list(&[("2001:0:4136:e378:8000:63bf:8000:0/104", 5900, 5900)]);
        assert!(explicit.permits(teredo("127.0.0.1"), 5900));
        assert!(explicit.permits(teredo("127.255.0.9"), 5900));
        assert!(!explicit.permits("2001:0:4136:e378:8000:63be:80ff:fffe".parse().unwrap(), 5900), "another port is not listed");
        assert_eq!(embedded_ipv4_blocks(&"2001:0:4136:e378:8000:63bf:8000:0/104".parse().unwrap()).collect::<Vec<_>>(), ["127.0.0.0/8".parse().unwrap()]);
    }

    #[test]
    fn isatap_addresses_are_judged_by_the_ipv4_address_they_end_with_under_any_prefix() {
        let open = list(&[("::/0", 1, 65535)]);
        // Interface identifier 0:5efe (private IPv4) or 200:5efe (global), under any /64.
        for ip in ["2001:db8:1:2:0:5efe:7f00:1", "2001:db8:1:2:200:5efe:a9fe:a9fe", "fd12:3456::5efe:6464:64c8", "2a00:1450:4001:80b:200:5efe:7f00:1"] {
            assert!(!open.permits(ip.parse().unwrap(), 5900), "{ip} allowed by a catch-all rule");
        }
        assert!(open.permits("2001:db8:1:2:0:5efe:c000:201".parse().unwrap(), 5900), "an ordinary IPv4 host behind ISATAP");
        // Only the universal/local bit may differ: 100:5efe is no ISATAP identifier, nor is 5eff.
        assert!(open.permits("2001:db8:1:2:100:5efe:7f00:1".parse().unwrap(), 5900));
        assert!(open.permits("2001:db8:1:2:0:5eff:7f00:1".parse().unwrap(), 5900));
        // A 6to4 address of an ordinary IPv4 host with an ISATAP identifier naming 127.0.0.1 is
        // refused: a host with either interface could send it.
        assert!(!open.permits("2002:c000:201:1:0:5efe:7f00:1".parse().unwrap(), 5900));
        // A network's /64 does not list them explicitly; a /104 naming 127.0.0.0/8 does, and only there.
        assert!(!list(&[("2001:db8:1:2::/64", 5900, 5900)]).permits("2001:db8:1:2:0:5efe:7f00:1".parse().unwrap(), 5900));
        let explicit = list(&[("2001:db8:1:2:0:5efe:7f00:0/104", 5900, 5900)]);
        assert!(explicit.permits("2001:db8:1:2:0:5efe:7f00:1".parse().unwrap(), 5900));
        assert!(!explicit.permits("2001:db8:1:3:0:5efe:7f00:1".parse().unwrap(), 5900), "another /64 is not listed");
        assert_eq!(embedded_ipv4_blocks(&"2001:db8:1:2:200:5efe:a9fe:0/112".parse().unwrap()).collect::<Vec<_>>(), ["169.254.0.0/16".parse().unwrap()]);
    }
}
