//! The CONNECT request head, as spice-gtk and HTTP/1.1 clients send it. Pure and total:
//! every input gives a request or an error, never a panic (fuzzed by fuzz/head).

use std::fmt;

/// Largest request head accepted (slowloris and memory guard).
pub const MAX_HEAD: usize = 8 * 1024;

pub use crate::http_answer::Version;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub version: Version,
    /// Target host as sent: a DNS name, an IPv4 address or an IPv6 literal (brackets removed).
    pub host: String,
    pub port: u16,
    /// Value of `Proxy-Authorization`, if any.
    pub proxy_authorization: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// A method other than CONNECT (405), with the version to answer in.
    NotConnect { method: String, version: Version },
    /// Anything else that is not a CONNECT head we can serve (400).
    Malformed(&'static str),
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::NotConnect { method, .. } => write!(f, "method {method} not allowed: this proxy only tunnels CONNECT"),
            HeadError::Malformed(why) => write!(f, "malformed request: {why}"),
        }
    }
}

/// Length of the head including its terminating blank line, once complete.
pub fn head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

pub fn parse(head: &[u8]) -> Result<Request, HeadError> {
    let text = std::str::from_utf8(head).map_err(|_| HeadError::Malformed("request head is not UTF-8"))?;
    let text = text.strip_suffix("\r\n\r\n").ok_or(HeadError::Malformed("request head does not end with a blank line"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => (m, t, v),
        _ => return Err(HeadError::Malformed("request line is not METHOD TARGET VERSION")),
    };
    let version = match version {
        "HTTP/1.0" => Version::Http10,
        "HTTP/1.1" => Version::Http11,
        _ => return Err(HeadError::Malformed("unsupported HTTP version")),
    };
    if !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(HeadError::Malformed("invalid method"));
    }
    if method != "CONNECT" {
        return Err(HeadError::NotConnect { method: method.chars().take(16).collect(), version });
    }
    let (host, port) = split_authority(target)?;
    let mut proxy_authorization = None;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(HeadError::Malformed("header line without ':'"))?;
        if name.is_empty() || name.bytes().any(|b| !(b.is_ascii_graphic()) || b == b':') {
            return Err(HeadError::Malformed("invalid header name"));
        }
        if name.eq_ignore_ascii_case("proxy-authorization") {
            if proxy_authorization.is_some() {
                return Err(HeadError::Malformed("more than one Proxy-Authorization header"));
            }
            proxy_authorization = Some(value.trim().to_string());
        }
    }
    Ok(Request { version, host, port, proxy_authorization })
}

/// `host:port`, where an IPv6 literal may come bracketed or, as spice-gtk sends it, bare:
/// split at the last ':'.
fn split_authority(target: &str) -> Result<(String, u16), HeadError> {
    let (host, port) = target.rsplit_once(':').ok_or(HeadError::Malformed("CONNECT target has no port"))?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.len() > 255 {
        return Err(HeadError::Malformed("CONNECT target has an empty or overlong host"));
    }
    if !host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_' | b'%')) {
        return Err(HeadError::Malformed("CONNECT target host has invalid characters"));
    }
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HeadError::Malformed("CONNECT target port is not a number"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host.to_ascii_lowercase(), p)),
        _ => Err(HeadError::Malformed("CONNECT target port is out of range")),
    }
}

/// `host:port` as logs and answers write it: an IPv6 literal in brackets, so the port stays
/// apart from the address (`[fd00::5]:5900`, not the `fd00::5:5900` spice-gtk sends).
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// Decodes `Basic base64(user:pass)`; spice-gtk puts the ticket in the password.
pub fn basic_credentials(value: &str) -> Option<(String, String)> {
    use base64::Engine;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_string(), pass.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spice_gtk_request_parses() {
        let head = b"CONNECT 10.0.0.5:5900 HTTP/1.0\r\nHost: 10.0.0.5:5900\r\nProxy-Connection: keep-alive\r\nUser-Agent: GLib/2.74\r\nProxy-Authorization: Basic dXNlcjp0aWNrZXQ=\r\n\r\n";
        assert_eq!(head_len(head), Some(head.len()));
        let r = parse(head).unwrap();
        assert_eq!((r.version, r.host.as_str(), r.port), (Version::Http10, "10.0.0.5", 5900));
        assert_eq!(basic_credentials(r.proxy_authorization.as_deref().unwrap()), Some(("user".into(), "ticket".into())));
    }

    #[test]
    fn ipv6_targets_bare_and_bracketed() {
        let r = parse(b"CONNECT fd00::5:5901 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!((r.host.as_str(), r.port, r.version), ("fd00::5", 5901, Version::Http11));
        let r = parse(b"CONNECT [fd00::5]:5901 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(r.host, "fd00::5");
        assert_eq!(authority(&r.host, r.port), "[fd00::5]:5901");
        assert_eq!(authority("10.0.0.5", 5900), "10.0.0.5:5900");
    }

    #[test]
    fn other_methods_get_405_with_their_version() {
        assert_eq!(
            parse(b"GET http://x/ HTTP/1.1\r\n\r\n").unwrap_err(),
            HeadError::NotConnect { method: "GET".into(), version: Version::Http11 }
        );
    }

    #[test]
    fn malformed_heads_are_rejected() {
        for bad in [
            &b"CONNECT 10.0.0.5 HTTP/1.0\r\n\r\n"[..],
            b"CONNECT 10.0.0.5:0 HTTP/1.0\r\n\r\n",
            b"CONNECT 10.0.0.5:65536 HTTP/1.0\r\n\r\n",
            b"CONNECT 10.0.0.5:59a0 HTTP/1.0\r\n\r\n",
            b"CONNECT :5900 HTTP/1.0\r\n\r\n",
            b"CONNECT 10.0.0.5:5900 HTTP/2.0\r\n\r\n",
            b"CONNECT 10.0.0.5:5900\r\n\r\n",
            b"CONNECT  10.0.0.5:5900 HTTP/1.0\r\n\r\n",
            b"CONNECT 10.0.0.5:5900 HTTP/1.0\r\nno colon\r\n\r\n",
            b"CONNECT a/b:5900 HTTP/1.0\r\n\r\n",
            b"CONNECT 10.0.0.5:5900 HTTP/1.0\r\nProxy-Authorization: a\r\nProxy-Authorization: b\r\n\r\n",
            b"\xff\xfe\r\n\r\n",
            b"\r\n\r\n",
            b"",
        ] {
            assert!(matches!(parse(bad), Err(HeadError::Malformed(_))), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn basic_credentials_edge_cases() {
        assert_eq!(basic_credentials("Bearer abc"), None);
        assert_eq!(basic_credentials("Basic !!!"), None);
        assert_eq!(basic_credentials("basic dTpwOnE="), Some(("u".into(), "p:q".into())));
    }
}
