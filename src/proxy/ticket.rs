//! Tickets: HMAC-SHA256 tokens bound to a target host, its ports (port and tls-port) and an
//! expiry, signed with a key all replicas share (stateless HA). A ticket is carried as the
//! Basic password of the proxy URL, so it uses only characters spice-gtk's URI parsing keeps
//! (base64url and '.'): never ':', '@', '/', '?' or '%'. Reusable by every channel of one
//! session until it expires.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

const PREFIX: &str = "v1";

/// Keys of a SpiceProxy's key Secret (files in the replicas' key directory): `current` signs;
/// `previous` (the one before the last rotation) and `next` (staged by a rotation, signing
/// nothing yet) are accepted too. See `rotation`.
pub const CURRENT_KEY: &str = "current";
pub const PREVIOUS_KEY: &str = "previous";
pub const NEXT_KEY: &str = "next";
const DOMAIN: &[u8] = b"spice-operator ticket v1\n";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// Target host, lower-case, as the client will send it in CONNECT.
    #[serde(rename = "h")]
    pub host: String,
    /// Ports the ticket opens on that host (SPICE port and tls-port).
    #[serde(rename = "p")]
    pub ports: Vec<u16>,
    /// Expiry, seconds since the Unix epoch.
    #[serde(rename = "e")]
    pub expires: u64,
    /// Who it was issued for (audit only).
    #[serde(rename = "s", default)]
    pub subject: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("ticket is malformed")]
    Malformed,
    #[error("ticket signature is invalid")]
    BadSignature,
    #[error("ticket expired")]
    Expired,
    #[error("no signing key is configured")]
    NoKey,
}

fn mac(key: &[u8], payload: &str) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(DOMAIN);
    m.update(payload.as_bytes());
    m
}

pub fn mint(key: &[u8], claims: &Claims) -> String {
    sign(key, &B64.encode(serde_json::to_vec(claims).expect("claims serialise")))
}

/// A token around an encoded payload: `mint`'s last step, public so the fuzz target can sign
/// payloads no `Claims` would serialise to and so reach the decoding behind the signature.
#[doc(hidden)]
pub fn sign(key: &[u8], payload: &str) -> String {
    let sig = B64.encode(mac(key, payload).finalize().into_bytes());
    format!("{PREFIX}.{payload}.{sig}")
}

/// Checks the signature against every key (current first, then previous: rotation) in
/// constant time, then the expiry.
pub fn verify(keys: &[Vec<u8>], token: &str, now: u64) -> Result<Claims, TicketError> {
    if keys.is_empty() {
        return Err(TicketError::NoKey);
    }
    let mut parts = token.split('.');
    let (Some(PREFIX), Some(payload), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TicketError::Malformed);
    };
    let sig = B64.decode(sig).map_err(|_| TicketError::Malformed)?;
    if !keys.iter().any(|k| mac(k, payload).verify_slice(&sig).is_ok()) {
        return Err(TicketError::BadSignature);
    }
    let raw = B64.decode(payload).map_err(|_| TicketError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&raw).map_err(|_| TicketError::Malformed)?;
    if claims.expires <= now {
        return Err(TicketError::Expired);
    }
    Ok(claims)
}

impl Claims {
    pub fn allows(&self, host: &str, port: u16) -> bool {
        self.ports.contains(&port) && same_host(&self.host, host)
    }
}

/// Names compare without case; IP literals by the address they write, so `fd00::5`,
/// `FD00:0::5` and `[fd00::5]` (or `::ffff:10.0.0.5` and `10.0.0.5`) are one host, as they are
/// one target to the allow-list and the connect.
fn same_host(a: &str, b: &str) -> bool {
    let ip = |h: &str| h.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(h).parse::<std::net::IpAddr>().ok().map(super::allow::canonical);
    match (ip(a), ip(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a.eq_ignore_ascii_case(b),
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims { host: "10.0.0.5".into(), ports: vec![5900, 5901], expires: exp, subject: "vm-42".into() }
    }

    #[test]
    fn round_trip_and_binding() {
        let t = mint(b"k1", &claims(1000));
        let c = verify(&[b"k1".to_vec()], &t, 999).unwrap();
        assert!(c.allows("10.0.0.5", 5900) && c.allows("10.0.0.5", 5901));
        assert!(!c.allows("10.0.0.6", 5900) && !c.allows("10.0.0.5", 5902));
        assert!(c.allows("::ffff:10.0.0.5", 5900), "the same IPv4 address, mapped");
        let v6 = Claims { host: "fd00::5".into(), ..claims(1000) };
        for same in ["fd00::5", "FD00:0::5", "fd00:0:0:0:0:0:0:5", "[fd00::5]"] {
            assert!(v6.allows(same, 5900), "{same}");
        }
        assert!(!v6.allows("fd00::6", 5900) && !v6.allows("fd00::5", 5902));
        let name = Claims { host: "Host1.Example.com".into(), ..claims(1000) };
        assert!(name.allows("host1.example.com", 5900) && !name.allows("host1.example.com.evil", 5900));
    }

    #[test]
    fn only_uri_safe_characters() {
        let t = mint(b"key", &Claims { host: "host.example.com".into(), ports: vec![5900], expires: u64::MAX / 2, subject: "ü@:/?%".into() });
        assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'), "{t}");
    }

    #[test]
    fn expired_forged_and_rotated() {
        let t = mint(b"old", &claims(1000));
        assert_eq!(verify(&[b"old".to_vec()], &t, 1000), Err(TicketError::Expired));
        assert_eq!(verify(&[b"new".to_vec()], &t, 1), Err(TicketError::BadSignature));
        assert!(verify(&[b"new".to_vec(), b"old".to_vec()], &t, 1).is_ok(), "previous key still accepted");
        // Changing the payload breaks the signature.
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged_payload = B64.encode(serde_json::to_vec(&Claims { host: "10.9.9.9".into(), ..claims(1000) }).unwrap());
        parts[1] = &forged_payload;
        assert_eq!(verify(&[b"old".to_vec()], &parts.join("."), 1), Err(TicketError::BadSignature));
        for junk in ["", "v1", "v1..", "v2.a.b", "v1.a.b.c", "v1.!!.??"] {
            assert!(matches!(verify(&[b"old".to_vec()], junk, 1), Err(TicketError::Malformed | TicketError::BadSignature)), "{junk}");
        }
        assert_eq!(verify(&[], &t, 1), Err(TicketError::NoKey));
    }
}
