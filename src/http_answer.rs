//! The answer of a server that refuses a connection before any protocol of its own: an HTTP
//! status line, a one-line body, `Connection: close`. The CONNECT proxy's refusals, the
//! browser port's refusals before a WebSocket upgrade and every HTTP server's "over capacity"
//! share it, so clients meet one form whichever port turned them away.

/// The HTTP version of an answer: the client's, as its request head gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }
}

/// A refusal: status, reason phrase and the one-line body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub body: String,
    /// Seconds for a `Retry-After` header (429).
    pub retry_after: Option<u64>,
}

pub fn refuse(status: u16, body: impl Into<String>) -> Refusal {
    Refusal { status, body: body.into(), retry_after: None }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "Connection established",
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

pub fn response(version: Version, r: &Refusal) -> Vec<u8> {
    let body = format!("{}\n", r.body);
    let mut out = format!("{} {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n", version.as_str(), r.status, reason(r.status), body.len());
    if r.status == 407 {
        out.push_str("Proxy-Authenticate: Basic realm=\"spice\"\r\n");
    }
    if let Some(secs) = r.retry_after {
        out.push_str(&format!("Retry-After: {secs}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_the_clients_version_a_reason_a_sized_body_and_its_headers() {
        let asked = response(Version::Http10, &refuse(407, "wrong proxy credentials"));
        let text = String::from_utf8(asked).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.0 407 Proxy Authentication Required\r\n"), "{head}");
        assert!(head.contains("\r\nProxy-Authenticate: Basic realm=\"spice\""), "{head}");
        assert_eq!(body, "wrong proxy credentials\n");
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())), "{head}");
        assert!(!head.contains("Retry-After"), "{head}");

        let busy = Refusal { status: 503, body: "over capacity".into(), retry_after: Some(1) };
        let text = String::from_utf8(response(Version::Http11, &busy)).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n") && text.contains("\r\nRetry-After: 1\r\n"), "{text}");
        assert!(!text.contains("Proxy-Authenticate") && text.contains("\r\nConnection: close\r\n"), "{text}");
    }
}
