//! The PROXY protocol (v1 text and v2 binary, as HAProxy, AWS's and other load balancers send
//! it): a load balancer in front of the proxy opens each connection with a header naming the
//! client it came from. Accepted only from the configured load balancer addresses, and then
//! required from them: anyone else could name any address and so escape the per-client limit
//! and write what they like into the audit lines.

use std::net::{IpAddr, SocketAddr};

use ppp::{PartialResult, v1, v2};
use serde::{Deserialize, Serialize};

/// Largest header read. v1 is at most 107 bytes; v2 has 16 plus addresses and extensions
/// (TLVs), of which load balancers send a few hundred bytes at most (AWS: the VPC endpoint).
pub const MAX_HEADER: usize = 4096;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProxyProtocolConfig {
    /// Load balancers allowed to connect; every connection from them begins with a header.
    pub trusted: Vec<ipnet::IpNet>,
}

impl ProxyProtocolConfig {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = super::allow::canonical(ip);
        self.trusted.iter().any(|n| n.contains(&ip))
    }
}

/// Who the connection is for, by its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client the load balancer passes on.
    Client(SocketAddr),
    /// The load balancer speaking for itself (v2 LOCAL, v1 UNKNOWN, or an address family
    /// without an IP address): a health check. The connection's own address counts.
    Itself,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the connection does not begin with a PROXY protocol header (v1 or v2)")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("PROXY protocol header longer than {MAX_HEADER} bytes")]
    TooLong,
}

/// Parses a header at the start of `buf`: `Ok(None)` when more bytes are needed, else the
/// origin and the header's length (the bytes after it are the client's own).
pub fn parse(buf: &[u8]) -> Result<Option<(Origin, usize)>, HeaderError> {
    // By signature, so a broken v2 header is reported as one, not as a missing v1 line.
    let is_v2 = buf.get(..V2_SIGNATURE.len()).map_or(V2_SIGNATURE.starts_with(buf), |start| start == V2_SIGNATURE);
    if is_v2 {
        let parsed = v2::Header::try_from(buf);
        if parsed.is_incomplete() {
            return if buf.len() >= MAX_HEADER { Err(HeaderError::TooLong) } else { Ok(None) };
        }
        return match parsed {
            Ok(h) => {
                let origin = match (h.command, h.addresses) {
                    (v2::Command::Local, _) => Origin::Itself,
                    (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Origin::Client(SocketAddr::new(a.source_address.into(), a.source_port)),
                    (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Origin::Client(SocketAddr::new(a.source_address.into(), a.source_port)),
                    (v2::Command::Proxy, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => Origin::Itself,
                };
                if h.len() > MAX_HEADER { Err(HeaderError::TooLong) } else { Ok(Some((origin, h.len()))) }
            }
            Err(e) => Err(HeaderError::Malformed(e.to_string())),
        };
    }
    let parsed = v1::Header::try_from(buf);
    if parsed.is_incomplete() {
        return Ok(None); // v1 is at most 107 bytes: the parser says when it is too long
    }
    match parsed {
        // The parser also takes a line ended by a bare LF when a CR follows later, and counts
        // the bytes up to that CR as header: they are the client's.
        Ok(h) if !h.header.ends_with("\r\n") => Err(HeaderError::Malformed("a v1 header ends with CRLF".into())),
        Ok(h) => {
            let origin = match h.addresses {
                v1::Addresses::Tcp4(a) => Origin::Client(SocketAddr::new(a.source_address.into(), a.source_port)),
                v1::Addresses::Tcp6(a) => Origin::Client(SocketAddr::new(a.source_address.into(), a.source_port)),
                v1::Addresses::Unknown => Origin::Itself,
            };
            Ok(Some((origin, h.header.len())))
        }
        // Neither version's signature: a client that reached the proxy around its load balancer.
        Err(v1::BinaryParseError::Parse(v1::ParseError::InvalidPrefix)) => Err(HeaderError::Missing),
        Err(e) => Err(HeaderError::Malformed(e.to_string())),
    }
}

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&((addresses.len() + tlvs.len()) as u16).to_be_bytes());
        h.extend_from_slice(addresses);
        h.extend_from_slice(tlvs);
        h
    }

    #[test]
    fn v1_gives_the_client_and_leaves_what_follows() {
        let input = b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 3128\r\nCONNECT 10.1.2.3:5900 HTTP/1.0\r\n\r\n";
        let (origin, len) = parse(input).unwrap().unwrap();
        assert_eq!(origin, Origin::Client("198.51.100.7:40000".parse().unwrap()));
        assert!(input[len..].starts_with(b"CONNECT "));
        let (origin, _) = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 3128\r\n").unwrap().unwrap();
        assert_eq!(origin, Origin::Client("[2001:db8::7]:40000".parse().unwrap()));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap(), (Origin::Itself, 15));
    }

    #[test]
    fn v2_gives_the_client_and_local_is_the_balancer_itself() {
        let mut addresses = vec![198, 51, 100, 7, 10, 0, 0, 1];
        addresses.extend_from_slice(&40000u16.to_be_bytes());
        addresses.extend_from_slice(&3128u16.to_be_bytes());
        // An AWS-style extension (type 0xEA, the VPC endpoint) after the addresses.
        let mut input = v2(1, 0x11, &addresses, &[0xea, 0, 4, 1, 2, 3, 4]);
        let header_len = input.len();
        input.extend_from_slice(b"CONNECT");
        let (origin, len) = parse(&input).unwrap().unwrap();
        assert_eq!((origin, len), (Origin::Client("198.51.100.7:40000".parse().unwrap()), header_len));
        let mut six = [0u8; 36];
        six[..16].copy_from_slice(&"2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap().octets());
        six[32..34].copy_from_slice(&5000u16.to_be_bytes());
        assert_eq!(parse(&v2(1, 0x21, &six, &[])).unwrap().unwrap().0, Origin::Client("[2001:db8::7]:5000".parse().unwrap()));
        assert_eq!(parse(&v2(0, 0x00, &[], &[])).unwrap().unwrap(), (Origin::Itself, 16), "LOCAL: a health check");
        assert_eq!(parse(&v2(1, 0x00, &[], &[])).unwrap().unwrap().0, Origin::Itself, "no address: the connection's own");
    }

    #[test]
    fn partial_headers_wait_for_more_and_everything_else_is_refused() {
        let full = b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 3128\r\n";
        for cut in [0, 1, 5, 20, full.len() - 1] {
            assert_eq!(parse(&full[..cut]), Ok(None), "{cut} bytes");
        }
        let v2_full = v2(1, 0x11, &[1; 12], &[]);
        for cut in [1, 12, 15, 20] {
            assert_eq!(parse(&v2_full[..cut]), Ok(None), "v2, {cut} bytes");
        }
        assert_eq!(parse(b"CONNECT 10.1.2.3:5900 HTTP/1.0\r\n\r\n"), Err(HeaderError::Missing));
        assert!(matches!(parse(b"PROXY TCP4 198.51.100.999 10.0.0.1 1 2\r\n"), Err(HeaderError::Malformed(_))));
        assert!(matches!(parse(b"PROXY TCP4 198.51.100.7 10.0.0.1 040000 3128\r\n"), Err(HeaderError::Malformed(_))));
        // Found by fuzzing: a bare LF, then a CR that is the client's first byte.
        assert!(matches!(parse(b"PROXY UNKNOWN \n\r"), Err(HeaderError::Malformed(_))));
        assert!(matches!(parse(b"PROXY UNKNOWN \n"), Err(HeaderError::Malformed(_))));
        assert!(matches!(parse(&v2(7, 0x11, &[1; 12], &[])), Err(HeaderError::Malformed(_))), "unknown command");
        assert!(matches!(parse(&v2(1, 0x11, &[1; 4], &[])), Err(HeaderError::Malformed(_))), "addresses cut short");
        // A v1 line that never ends, and a v2 header announcing more than we read.
        assert!(parse(&[b'P', b'R', b'O', b'X', b'Y', b' '].repeat(30)).is_err());
        let mut huge = v2(1, 0x11, &[1; 12], &[]);
        huge[14..16].copy_from_slice(&60000u16.to_be_bytes());
        huge.resize(MAX_HEADER, 0);
        assert_eq!(parse(&huge), Err(HeaderError::TooLong));
    }

    #[test]
    fn only_listed_balancers_are_trusted_and_mapped_addresses_count_as_ipv4() {
        let c = ProxyProtocolConfig { trusted: vec!["10.0.0.0/24".parse().unwrap(), "2001:db8::/64".parse().unwrap()] };
        assert!(c.trusts("10.0.0.9".parse().unwrap()));
        assert!(c.trusts("::ffff:10.0.0.9".parse().unwrap()));
        assert!(c.trusts("2001:db8::5".parse().unwrap()));
        assert!(!c.trusts("10.0.1.9".parse().unwrap()));
    }
}
