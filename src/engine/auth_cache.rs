//! What the Kubernetes API said about the engine API's callers, kept briefly. The consoles of a
//! login storm come from one engine account, and without this each one cost the API server a
//! TokenReview and one or two SubjectAccessReviews. Only yes is kept, for `ttl`
//! (`--api-auth-cache-seconds`, default 10): a revoked token or binding stops working within it
//! (the API server's own webhook authenticator keeps answers for 2 minutes). A no is asked again
//! the next time, so a permission just granted works at once. Tokens are kept as SHA-256
//! digests, never in clear.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::UserInfo;
use sha2::{Digest, Sha256};

/// Entries per map before expired ones are dropped (and, if none has expired, all of them):
/// a bound on memory whatever callers send.
const MAX_ENTRIES: usize = 10_000;

/// A bearer token's SHA-256.
pub type TokenDigest = [u8; 32];

pub fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// One access a SubjectAccessReview allowed: what the token may do to which object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub verb: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
}

/// A token and an access as one SHA-256: looked up without copying the access, and 32 bytes
/// an entry whatever the names' lengths.
type GrantKey = [u8; 32];

fn grant_key(token: &TokenDigest, access: &Access) -> GrantKey {
    let mut hash = Sha256::new();
    hash.update(token);
    let Access { verb, resource, subresource, namespace, name } = access;
    // Each field length-prefixed, and a missing one apart from an empty one, so no two
    // different accesses hash the same input.
    for field in [Some(verb), Some(resource), subresource.as_ref(), namespace.as_ref(), Some(name)] {
        match field {
            Some(text) => {
                hash.update([1]);
                hash.update((text.len() as u64).to_le_bytes());
                hash.update(text.as_bytes());
            }
            None => hash.update([0]),
        }
    }
    hash.finalize().into()
}

pub struct AuthCache {
    ttl: Duration,
    users: Mutex<HashMap<TokenDigest, (Instant, UserInfo)>>,
    grants: Mutex<HashMap<GrantKey, Instant>>,
}

impl AuthCache {
    /// Keeps each yes for `ttl`; zero keeps nothing (every request asks the API server).
    pub fn new(ttl: Duration) -> AuthCache {
        AuthCache { ttl, users: Mutex::default(), grants: Mutex::default() }
    }

    /// Who the token belongs to, if the API server said so less than `ttl` ago.
    pub fn user(&self, token: &TokenDigest, now: Instant) -> Option<UserInfo> {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        users.get(token).filter(|(until, _)| now < *until).map(|(_, user)| user.clone())
    }

    pub fn remember_user(&self, token: TokenDigest, user: &UserInfo, now: Instant) {
        if !self.ttl.is_zero() {
            let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
            make_room(&mut users, now, |(until, _)| *until);
            users.insert(token, (now + self.ttl, user.clone()));
        }
    }

    /// Whether the API server allowed this token's caller `access` less than `ttl` ago.
    pub fn granted(&self, token: &TokenDigest, access: &Access, now: Instant) -> bool {
        let grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        grants.get(&grant_key(token, access)).is_some_and(|until| now < *until)
    }

    pub fn remember_grant(&self, token: &TokenDigest, access: &Access, now: Instant) {
        if !self.ttl.is_zero() {
            let key = grant_key(token, access);
            let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
            make_room(&mut grants, now, |until| *until);
            grants.insert(key, now + self.ttl);
        }
    }
}

/// At the bound, drops what has expired, and everything if that was nothing.
fn make_room<K, V>(map: &mut HashMap<K, V>, now: Instant, until: impl Fn(&V) -> Instant) {
    if map.len() >= MAX_ENTRIES {
        map.retain(|_, v| now < until(v));
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserInfo {
        UserInfo { username: Some(name.into()), ..Default::default() }
    }

    fn get_policy(name: &str) -> Access {
        Access { verb: "get".into(), resource: "clusterconsolepolicies".into(), subresource: None, namespace: None, name: name.into() }
    }

    #[test]
    fn a_yes_is_kept_for_the_ttl_for_that_token_and_that_access_only() {
        let cache = AuthCache::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let (engine, other) = (digest("engine-token"), digest("other-token"));
        assert_eq!(cache.user(&engine, t0), None);
        cache.remember_user(engine, &user("system:serviceaccount:ovirt:engine"), t0);
        assert_eq!(cache.user(&engine, t0 + Duration::from_secs(9)).and_then(|u| u.username).as_deref(), Some("system:serviceaccount:ovirt:engine"));
        assert_eq!(cache.user(&engine, t0 + Duration::from_secs(10)), None, "expired at the ttl");
        assert_eq!(cache.user(&other, t0), None);

        cache.remember_grant(&engine, &get_policy("prod"), t0);
        assert!(cache.granted(&engine, &get_policy("prod"), t0 + Duration::from_secs(9)));
        assert!(!cache.granted(&engine, &get_policy("prod"), t0 + Duration::from_secs(10)));
        assert!(!cache.granted(&engine, &get_policy("lab"), t0), "another object");
        assert!(!cache.granted(&other, &get_policy("prod"), t0), "another caller");
        let ticket = Access { verb: "create".into(), resource: "spiceproxies".into(), subresource: Some("tickets".into()), namespace: Some("vdi".into()), name: "prod".into() };
        assert!(!cache.granted(&engine, &ticket, t0), "another resource of the same name");
        // Field boundaries count: "ab"+"c" is not "a"+"bc", and no namespace is not "".
        let split = |verb: &str, resource: &str, namespace: Option<&str>| Access { verb: verb.into(), resource: resource.into(), subresource: None, namespace: namespace.map(Into::into), name: "x".into() };
        cache.remember_grant(&engine, &split("ab", "c", None), t0);
        assert!(cache.granted(&engine, &split("ab", "c", None), t0));
        assert!(!cache.granted(&engine, &split("a", "bc", None), t0));
        assert!(!cache.granted(&engine, &split("ab", "c", Some("")), t0));
    }

    #[test]
    fn a_zero_ttl_keeps_nothing() {
        let cache = AuthCache::new(Duration::ZERO);
        let t0 = Instant::now();
        cache.remember_user(digest("t"), &user("u"), t0);
        cache.remember_grant(&digest("t"), &get_policy("p"), t0);
        assert_eq!(cache.user(&digest("t"), t0), None);
        assert!(!cache.granted(&digest("t"), &get_policy("p"), t0));
    }

    #[test]
    fn memory_is_bounded_whatever_callers_send() {
        let cache = AuthCache::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..MAX_ENTRIES + 5 {
            cache.remember_grant(&digest("t"), &get_policy(&i.to_string()), t0);
        }
        assert!(cache.grants.lock().unwrap().len() <= MAX_ENTRIES);
        // The newest is kept after the purge.
        assert!(cache.granted(&digest("t"), &get_policy(&(MAX_ENTRIES + 4).to_string()), t0));
        // Expired entries go first: one live entry among expired ones survives a purge.
        let cache = AuthCache::new(Duration::from_secs(10));
        for i in 0..MAX_ENTRIES - 1 {
            cache.remember_user(digest(&i.to_string()), &user("old"), t0);
        }
        let later = t0 + Duration::from_secs(5);
        cache.remember_user(digest("live"), &user("live"), later);
        cache.remember_user(digest("newest"), &user("newest"), t0 + Duration::from_secs(11));
        assert_eq!(cache.users.lock().unwrap().len(), 2);
        assert!(cache.user(&digest("live"), t0 + Duration::from_secs(11)).is_some());
    }
}
