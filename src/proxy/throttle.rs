//! Failed authentications per client, so credentials cannot be guessed at speed: once a client
//! (an IPv4 address or an IPv6 /64, as the per-client tunnel limit counts) has made `max`
//! failed attempts within `window` of its first, it is refused for `window` whatever it
//! presents. squid and HAProxy leave this to fail2ban or stick tables; here it is on by default.
//!
//! Only failures that guessing produces count: a wrong Basic password, a forged or mangled
//! ticket. An expired ticket was signed by us (a stale console file), and a client that asks
//! without credentials first is no attack; neither counts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Clients tracked at most: a bound on memory (about 64 bytes each) however many addresses an
/// attacker holds. When full, entries whose window passed go first, then unlocked ones.
pub const MAX_TRACKED: usize = 65_536;
/// What a full table is cut down to, so the pass over it (4.8 ms in a release build here, under
/// the lock every authentication takes) comes once per `MAX_TRACKED / 4` new clients, not for
/// each.
const AFTER_EVICTION: usize = MAX_TRACKED * 3 / 4;

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The first failure of the current window.
    since: Instant,
    failures: u32,
    /// Set once `failures` reached the limit: refused until then.
    locked_until: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant, window: Duration) -> bool {
        self.locked_until.map_or(now < self.since + window, |until| now < until)
    }
}

pub struct AuthThrottle {
    /// 0: off.
    max: AtomicU32,
    /// The window in milliseconds (both change with the proxy's live limits).
    window_ms: AtomicU64,
    clients: Mutex<HashMap<IpAddr, Entry>>,
}

impl AuthThrottle {
    pub fn new(max: u32, window: Duration) -> Self {
        let t = Self { max: AtomicU32::new(0), window_ms: AtomicU64::new(0), clients: Mutex::new(HashMap::new()) };
        t.set_limits(max, window);
        t
    }

    /// New limits for the failures counted from now on; a client locked out stays locked for
    /// the time it was given.
    pub fn set_limits(&self, max: u32, window: Duration) {
        self.max.store(max, Ordering::Relaxed);
        self.window_ms.store(window.as_millis() as u64, Ordering::Relaxed);
    }

    fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms.load(Ordering::Relaxed))
    }

    /// How long `client` is still refused, if it is.
    pub fn locked(&self, client: IpAddr, now: Instant) -> Option<Duration> {
        if self.max.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut clients = self.clients.lock().expect("throttle lock");
        let until = clients.get(&client)?.locked_until?;
        if now < until {
            return Some(until - now);
        }
        clients.remove(&client); // served its time: a fresh count
        None
    }

    /// Counts a failed attempt; true when it locks the client out.
    pub fn failed(&self, client: IpAddr, now: Instant) -> bool {
        let (max, window) = (self.max.load(Ordering::Relaxed), self.window());
        if max == 0 {
            return false;
        }
        let mut clients = self.clients.lock().expect("throttle lock");
        if !clients.contains_key(&client) && clients.len() >= MAX_TRACKED {
            make_room(&mut clients, now, window);
            if clients.len() >= MAX_TRACKED {
                return false; // every tracked client is locked out: this one goes uncounted
            }
        }
        let fresh = Entry { since: now, failures: 0, locked_until: None };
        let e = clients.entry(client).or_insert(fresh);
        if !e.live(now, window) {
            *e = fresh; // the window (or the lock) passed: counting starts again
        }
        e.failures = e.failures.saturating_add(1);
        if e.failures >= max && e.locked_until.is_none() {
            e.locked_until = Some(now + window);
            return true;
        }
        false
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.clients.lock().unwrap().len()
    }
}

/// Drops the entries whose window passed; if that is not enough, unlocked entries until a
/// quarter of the table is free. Which unlocked ones does not matter much (a client forgotten
/// starts counting afresh, whichever it is); the map's order is random per process, so an
/// attacker cannot choose which are kept. Locked clients stay locked.
fn make_room(clients: &mut HashMap<IpAddr, Entry>, now: Instant, window: Duration) {
    clients.retain(|_, e| e.live(now, window));
    let mut excess = clients.len().saturating_sub(AFTER_EVICTION - 1);
    if clients.len() < MAX_TRACKED || excess == 0 {
        return;
    }
    clients.retain(|_, e| {
        if excess > 0 && e.locked_until.is_none() {
            excess -= 1;
            return false;
        }
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(300);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn reaching_the_limit_locks_the_client_for_the_window_and_no_one_else() {
        let t = AuthThrottle::new(3, WINDOW);
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let t0 = Instant::now();
        assert!(!t.failed(a, t0));
        assert!(!t.failed(a, t0 + Duration::from_secs(1)));
        assert_eq!(t.locked(a, t0 + Duration::from_secs(2)), None, "two failures of three: still allowed");
        assert!(t.failed(a, t0 + Duration::from_secs(10)), "the third locks");
        assert_eq!(t.locked(a, t0 + Duration::from_secs(10)), Some(WINDOW));
        assert_eq!(t.locked(a, t0 + Duration::from_secs(110)), Some(Duration::from_secs(200)), "the lock counts from the failure that set it");
        assert_eq!(t.locked(b, t0 + Duration::from_secs(10)), None, "another client is not affected");
        // Further failures while locked do not extend the lock.
        assert!(!t.failed(a, t0 + Duration::from_secs(200)));
        assert_eq!(t.locked(a, t0 + Duration::from_secs(309)), Some(Duration::from_secs(1)));
        assert_eq!(t.locked(a, t0 + Duration::from_secs(310)), None, "lifted after the window");
        assert_eq!(t.tracked(), 0, "a lifted lock leaves nothing behind");
        assert!(!t.failed(a, t0 + Duration::from_secs(311)), "counting starts again from one");
    }

    #[test]
    fn failures_spread_wider_than_the_window_never_lock() {
        let t = AuthThrottle::new(3, WINDOW);
        let a = ip("2001:db8::");
        let t0 = Instant::now();
        for i in 0..10 {
            // Two failures per window, the window starting at the first of them.
            let start = t0 + WINDOW * i;
            assert!(!t.failed(a, start));
            assert!(!t.failed(a, start + WINDOW - Duration::from_secs(1)));
            assert_eq!(t.locked(a, start + WINDOW - Duration::from_secs(1)), None);
        }
    }

    #[test]
    fn zero_turns_it_off() {
        let t = AuthThrottle::new(0, WINDOW);
        let now = Instant::now();
        for _ in 0..100 {
            assert!(!t.failed(ip("192.0.2.1"), now));
        }
        assert_eq!(t.locked(ip("192.0.2.1"), now), None);
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn new_limits_apply_to_the_failures_counted_next_and_a_lockout_keeps_its_time() {
        let t = AuthThrottle::new(3, WINDOW);
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let t0 = Instant::now();
        assert!(!t.failed(a, t0));
        t.set_limits(2, Duration::from_secs(60));
        assert!(t.failed(a, t0), "the second failure reaches the new limit");
        assert_eq!(t.locked(a, t0), Some(Duration::from_secs(60)), "locked for the new window");
        t.set_limits(0, WINDOW);
        for _ in 0..10 {
            assert!(!t.failed(b, t0), "off: never locks");
        }
        assert_eq!(t.locked(a, t0), None, "off: no one is refused");
        t.set_limits(2, WINDOW);
        assert_eq!(t.locked(a, t0 + Duration::from_secs(59)), Some(Duration::from_secs(1)), "turned on again, the lockout keeps its end");
    }

    #[test]
    fn memory_is_bounded_and_locked_clients_are_the_last_forgotten() {
        let t = AuthThrottle::new(2, WINDOW);
        let t0 = Instant::now();
        let locked = ip("198.51.100.1");
        t.failed(locked, t0);
        assert!(t.failed(locked, t0));
        // A client per address of a /112 fills the table, one failure each.
        for i in 0..MAX_TRACKED as u128 - 1 {
            t.failed(IpAddr::V6((0x2001_0db8_u128 << 96 | i).into()), t0 + Duration::from_millis(1));
        }
        assert_eq!(t.tracked(), MAX_TRACKED);
        // One more: unlocked entries make room down to three quarters, the locked one stays.
        let newcomer = ip("203.0.113.9");
        t.failed(newcomer, t0 + Duration::from_secs(1));
        assert_eq!(t.tracked(), AFTER_EVICTION);
        // The next quarter of newcomers is counted without another pass.
        for i in 0..(MAX_TRACKED - AFTER_EVICTION) as u32 {
            t.failed(IpAddr::V4((0x0a00_0000 | i).into()), t0 + Duration::from_secs(1));
        }
        assert_eq!(t.tracked(), MAX_TRACKED);
        assert!(t.locked(locked, t0 + Duration::from_secs(1)).is_some(), "the locked client was kept");
        assert!(t.failed(newcomer, t0 + Duration::from_secs(2)), "the newcomer is counted: its second failure locks it");
        // Once their windows passed, the whole table is room.
        let later = t0 + WINDOW + Duration::from_secs(3);
        t.failed(ip("203.0.113.10"), later);
        assert_eq!(t.tracked(), 1, "expired entries were dropped");
    }
}
