//! Synthetic cancel keys: each client gets its own (pid, key) and a CancelRequest is routed to
//! whichever backend serves that client now, with the backend's real key. Which backend that
//! is, the registry says ([`crate::stats::ClientGuard::link`]): assigning a server costs the
//! cancel map nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rand::Rng;

use crate::server::CancelRoute;

/// Where a client's cancel should go right now: the backend's route (shared with its server
/// connection) and its real pid and key.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub route: Arc<CancelRoute>,
    pub pid: i32,
    pub key: i32,
}

impl CancelTarget {
    pub fn addr(&self) -> SocketAddr {
        self.route.addr
    }
}

/// The clients' keys, in a slab: a synthetic pid holds its entry's index (low
/// [`INDEX_BITS`] bits, plus one) under random high bits, so routing a key is an index and two
/// comparisons, no hashing. The random 32-bit key is what makes a cancel hard to forge.
#[derive(Default)]
pub struct CancelMap {
    entries: Mutex<slab::Slab<Entry>>,
    /// Cancels being forwarded right now, per backend: a backend is not handed to another
    /// client until they are through (pgbouncer#717).
    in_flight: Mutex<HashMap<(SocketAddr, i32), usize>>,
    /// Sum of `in_flight`'s counts, so the common case (none) needs no lock.
    in_flight_total: AtomicUsize,
}

struct Entry {
    pid: i32,
    key: i32,
    /// The client's registry id.
    client: u64,
}

/// Bits of a synthetic pid that hold the entry's index plus one (up to ~2 million clients;
/// `--max-clients` allows one million); the rest above them, below the sign bit, are random.
const INDEX_BITS: u32 = 21;
const INDEX_MASK: i32 = (1 << INDEX_BITS) - 1;

/// Marks a cancel as in flight until dropped.
pub struct InFlightCancel<'a> {
    map: &'a CancelMap,
    backend: (SocketAddr, i32),
}

impl Drop for InFlightCancel<'_> {
    fn drop(&mut self) {
        let mut m = crate::lock(&self.map.in_flight);
        if let Some(n) = m.get_mut(&self.backend) {
            *n -= 1;
            self.map.in_flight_total.fetch_sub(1, Ordering::SeqCst);
            if *n == 0 {
                m.remove(&self.backend);
            }
        }
    }
}

/// A client's registered key; dropping it unregisters, so a cancel that arrives after the
/// client left (and its backend moved on) is dropped instead of hitting someone else.
pub struct CancelKey {
    map: Arc<CancelMap>,
    pub pid: i32,
    pub key: i32,
}

impl CancelMap {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A fresh key for a new client (`client`: its registry id).
    pub fn register(self: &Arc<Self>, client: u64) -> CancelKey {
        let mut rng = rand::rng();
        let high: i32 = rng.random_range(0..(1 << (31 - INDEX_BITS)));
        let key = rng.random::<i32>();
        let mut entries = crate::lock(&self.entries);
        let entry = entries.vacant_entry();
        let index = entry.key();
        if index >= INDEX_MASK as usize {
            // More live clients than a pid can index (far above --max-clients' limit): this
            // one's cancels are not routed.
            return CancelKey {
                map: self.clone(),
                pid: 0,
                key,
            };
        }
        let pid = (high << INDEX_BITS) | (index as i32 + 1);
        entry.insert(Entry { pid, key, client });
        CancelKey {
            map: self.clone(),
            pid,
            key,
        }
    }

    /// Where a cancel for this key goes, if the client is connected and has a backend; the
    /// returned guard keeps the backend from being reused until the cancel is sent.
    pub fn lookup(
        &self,
        pid: i32,
        key: i32,
        registry: &crate::stats::Registry,
    ) -> Option<(CancelTarget, InFlightCancel<'_>)> {
        let client = Self::entry(&crate::lock(&self.entries), pid, key)?.client;
        let (target, live) = registry.cancel_target(client)?;
        let backend = (target.addr(), target.pid);
        *crate::lock(&self.in_flight).entry(backend).or_insert(0) += 1;
        self.in_flight_total.fetch_add(1, Ordering::SeqCst);
        let guard = InFlightCancel { map: self, backend };
        // Marked in flight first, then the link checked again: if the client left the backend
        // in between, its release may not have seen the mark (see ClientGuard::unlink).
        live.serves(client).then_some((target, guard))
    }

    /// The live entry `pid` and `key` name, if any.
    fn entry(entries: &slab::Slab<Entry>, pid: i32, key: i32) -> Option<&Entry> {
        let index = usize::try_from((pid & INDEX_MASK) - 1).ok()?;
        entries
            .get(index)
            .filter(|e| pid > 0 && e.pid == pid && e.key == key)
    }

    /// Whether a cancel for this backend is being forwarded now (one atomic load when none
    /// is anywhere).
    pub fn cancel_in_flight(&self, addr: SocketAddr, pid: i32) -> bool {
        if self.in_flight_total.load(Ordering::SeqCst) == 0 {
            return false;
        }
        crate::lock(&self.in_flight).contains_key(&(addr, pid))
    }

    /// Waits until no cancel for this backend is being forwarded, so a late cancel cannot hit
    /// the next client's query. False if one still is after the longest a forward may take
    /// (it cannot, unless the forwarding task is stuck): the backend must not be reused then.
    pub async fn wait_no_cancel_in_flight(&self, addr: SocketAddr, pid: i32) -> bool {
        let give_up = tokio::time::Instant::now()
            + crate::server::CANCEL_TIMEOUT
            + std::time::Duration::from_secs(1);
        while self.cancel_in_flight(addr, pid) {
            if tokio::time::Instant::now() >= give_up {
                tracing::warn!(
                    backend_pid = pid,
                    "PostgreSQL has not answered a cancel request to this backend within the forwarding timeout (10 s); its server connection is closed instead of reused (check the server's load and the network to it)"
                );
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        true
    }

    pub fn len(&self) -> usize {
        crate::lock(&self.entries).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        if self.pid <= 0 {
            return;
        }
        let mut entries = crate::lock(&self.map.entries);
        let index = ((self.pid & INDEX_MASK) - 1) as usize;
        if entries.get(index).is_some_and(|e| e.pid == self.pid) {
            entries.remove(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{
        ClientEntry, ClientGuard, ClientState, Names, ServerEntry, ServerHandle, ServerState,
        Stamp, Stats,
    };

    fn route() -> Arc<CancelRoute> {
        let dsn = dbcred::Dsn::parse("host=127.0.0.1 user=u sslmode=disable").unwrap();
        Arc::new(CancelRoute {
            addr: "127.0.0.1:5432".parse().unwrap(),
            host: "127.0.0.1".into(),
            policy: dbcred::ServerTlsPolicy::from_dsn(&dsn).unwrap(),
            tls: false,
        })
    }

    fn client(stats: &Arc<Stats>) -> ClientGuard {
        stats.add_client(ClientEntry {
            id: stats.registry.next_id(),
            names: Names::new("u", "d", ""),
            addr: "127.0.0.1:40000".parse().unwrap(),
            state: ClientState::Active,
            connect_time: Stamp::now(),
            request_time: Stamp::now(),
        })
    }

    /// A server connection in the registry, backend `pid` with cancel key `key`.
    fn server(stats: &Stats, route: &Arc<CancelRoute>, pid: i32, key: i32) -> ServerHandle {
        let mut handle = ServerHandle::default();
        handle.slot = stats.registry.add_server(
            ServerEntry {
                id: stats.registry.next_id(),
                generation: 1,
                names: Names::new("u", "d", ""),
                addr: route.addr,
                backend_pid: pid,
                state: ServerState::Active,
                connect_time: Stamp::now(),
                request_time: Stamp::now(),
                client: None,
            },
            CancelTarget {
                route: route.clone(),
                pid,
                key,
            },
            handle.live.clone(),
        );
        handle
    }

    #[test]
    fn keys_route_to_the_linked_backend_until_dropped() {
        let stats = Arc::new(Stats::new());
        let registry = &stats.registry;
        let map = CancelMap::new();
        let (ca, cb) = (client(&stats), client(&stats));
        let a = map.register(ca.id());
        let b = map.register(cb.id());
        assert_ne!((a.pid, a.key), (b.pid, b.key));
        let route = route();
        let addr = route.addr;
        let s77 = server(&stats, &route, 77, 88);
        let s78 = server(&stats, &route, 78, 89);
        assert!(
            map.lookup(a.pid, a.key, registry).is_none(),
            "no backend yet"
        );
        ca.link(&s77);
        cb.link(&s78);
        {
            let (found, _guard) = map.lookup(a.pid, a.key, registry).unwrap();
            assert!(Arc::ptr_eq(&found.route, &route));
            assert_eq!((found.pid, found.key), (77, 88));
            assert!(map.cancel_in_flight(addr, 77));
            assert!(!map.cancel_in_flight(addr, 78));
        }
        assert!(!map.cancel_in_flight(addr, 77));
        assert_eq!(map.lookup(b.pid, b.key, registry).unwrap().0.pid, 78);
        assert!(map.lookup(a.pid, a.key.wrapping_add(1), registry).is_none());
        // SHOW SERVERS links them too.
        let listed = registry.servers();
        assert_eq!(listed[0].client, Some(ca.id()));
        assert_eq!(listed[0].state, ServerState::Active);
        // Between backends: no route, and the server is active with no client.
        ca.unlink(&s77);
        assert!(map.lookup(a.pid, a.key, registry).is_none());
        assert_eq!(registry.servers()[0].client, None);
        s77.live.release();
        assert_eq!(registry.servers()[0].state, ServerState::Idle);
        // Client a takes the other backend (b left it).
        cb.unlink(&s78);
        ca.link(&s78);
        assert_eq!(map.lookup(a.pid, a.key, registry).unwrap().0.pid, 78);
        assert!(map.lookup(b.pid, b.key, registry).is_none());
        let (pid, key) = (a.pid, a.key);
        drop(a);
        assert!(map.lookup(pid, key, registry).is_none());
        assert_eq!(map.len(), 1);
        drop(b);
        assert!(map.is_empty());
    }

    /// The release of a backend checks for cancels in flight after the unlink; a cancel
    /// marked before it is seen, one looked up after it finds nothing and leaves no mark.
    #[test]
    fn a_cancel_in_flight_holds_the_backend_and_none_starts_after_the_unlink() {
        let stats = Arc::new(Stats::new());
        let registry = &stats.registry;
        let map = CancelMap::new();
        let c = client(&stats);
        let key = map.register(c.id());
        let route = route();
        let s = server(&stats, &route, 5, 6);
        c.link(&s);
        let (_, in_flight) = map.lookup(key.pid, key.key, registry).unwrap();
        c.unlink(&s);
        assert!(map.cancel_in_flight(route.addr, 5), "the release must wait");
        drop(in_flight);
        assert!(!map.cancel_in_flight(route.addr, 5));
        assert!(map.lookup(key.pid, key.key, registry).is_none());
        assert!(!map.cancel_in_flight(route.addr, 5));
        assert_eq!(map.in_flight_total.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_reused_slot_does_not_route_the_old_key() {
        let stats = Arc::new(Stats::new());
        let registry = &stats.registry;
        let map = CancelMap::new();
        let route = route();
        let c = client(&stats);
        let old = map.register(c.id());
        let (old_pid, old_key) = (old.pid, old.key);
        drop(old);
        let new = map.register(c.id());
        // The slab hands out the freed slot again: same index, new random bits and key.
        assert_eq!(new.pid & INDEX_MASK, old_pid & INDEX_MASK);
        let s = server(&stats, &route, 5, 1);
        c.link(&s);
        assert!(map.lookup(old_pid, old_key, registry).is_none());
        assert_eq!(map.lookup(new.pid, new.key, registry).unwrap().0.pid, 5);
        // Made-up pids (zero, negative, an index never handed out) find nothing.
        assert!(map.lookup(0, new.key, registry).is_none());
        assert!(map.lookup(-1, new.key, registry).is_none());
        assert!(map.lookup(new.pid + 1, new.key, registry).is_none());
        let many: Vec<_> = (0..100).map(|i| map.register(i)).collect();
        assert!(many.iter().all(|k| k.pid > 0));
        let mut pids: Vec<_> = many.iter().map(|k| k.pid & INDEX_MASK).collect();
        pids.sort_unstable();
        pids.dedup();
        assert_eq!(pids.len(), 100, "each live key has its own slot");
    }
}
