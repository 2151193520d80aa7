//! Synthetic cancel keys: each client gets its own (pid, key) and a CancelRequest is routed to
//! whichever backend serves that client now, with the backend's real key.

use std::collections::HashMap;
use std::net::SocketAddr;
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

#[derive(Default)]
pub struct CancelMap {
    entries: Mutex<HashMap<(i32, i32), Option<CancelTarget>>>,
    /// Cancels being forwarded right now, per backend: a backend is not handed to another
    /// client until they are through (pgbouncer#717).
    in_flight: Mutex<HashMap<(SocketAddr, i32), usize>>,
}

/// Marks a cancel as in flight until dropped.
pub struct InFlightCancel<'a> {
    map: &'a CancelMap,
    backend: (SocketAddr, i32),
}

impl Drop for InFlightCancel<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.in_flight.lock()
            && let Some(n) = m.get_mut(&self.backend)
        {
            *n -= 1;
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

    /// A fresh random key for a new client.
    pub fn register(self: &Arc<Self>) -> CancelKey {
        let mut rng = rand::rng();
        loop {
            let pid = rng.random_range(1..i32::MAX);
            let key = rng.random::<i32>();
            if let Ok(mut entries) = self.entries.lock()
                && !entries.contains_key(&(pid, key))
            {
                entries.insert((pid, key), None);
                return CancelKey {
                    map: self.clone(),
                    pid,
                    key,
                };
            }
        }
    }

    /// Where a cancel for this key goes, if the client is connected and has a backend; the
    /// returned guard keeps the backend from being reused until the cancel is sent.
    pub fn lookup(&self, pid: i32, key: i32) -> Option<(CancelTarget, InFlightCancel<'_>)> {
        let entries = self.entries.lock().ok()?;
        let target = entries.get(&(pid, key)).cloned().flatten()?;
        let backend = (target.addr(), target.pid);
        *self.in_flight.lock().ok()?.entry(backend).or_insert(0) += 1;
        drop(entries);
        Some((target, InFlightCancel { map: self, backend }))
    }

    fn cancel_in_flight(&self, addr: SocketAddr, pid: i32) -> bool {
        self.in_flight
            .lock()
            .map(|m| m.contains_key(&(addr, pid)))
            .unwrap_or(false)
    }

    /// Waits (briefly) until no cancel for this backend is being forwarded, so a late cancel
    /// cannot hit the next client's query.
    pub async fn wait_no_cancel_in_flight(&self, addr: SocketAddr, pid: i32) {
        for _ in 0..200 {
            if !self.cancel_in_flight(addr, pid) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CancelKey {
    /// Points this client's cancels at a backend (or at none between backends).
    pub fn set_target(&self, target: Option<CancelTarget>) {
        if let Ok(mut entries) = self.map.entries.lock()
            && let Some(slot) = entries.get_mut(&(self.pid, self.key))
        {
            *slot = target;
        }
    }
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        if let Ok(mut entries) = self.map.entries.lock() {
            entries.remove(&(self.pid, self.key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_route_until_dropped() {
        let map = CancelMap::new();
        let a = map.register();
        let b = map.register();
        assert_ne!((a.pid, a.key), (b.pid, b.key));
        assert!(map.lookup(a.pid, a.key).is_none());
        let dsn = dbcred::Dsn::parse("host=127.0.0.1 user=u sslmode=disable").unwrap();
        let route = Arc::new(CancelRoute {
            addr: "127.0.0.1:5432".parse().unwrap(),
            host: "127.0.0.1".into(),
            policy: dbcred::ServerTlsPolicy::from_dsn(&dsn).unwrap(),
            tls: false,
        });
        let addr = route.addr;
        a.set_target(Some(CancelTarget {
            route: route.clone(),
            pid: 77,
            key: 88,
        }));
        {
            let (found, _guard) = map.lookup(a.pid, a.key).unwrap();
            assert!(Arc::ptr_eq(&found.route, &route));
            assert_eq!((found.pid, found.key), (77, 88));
            assert!(map.cancel_in_flight(addr, 77));
        }
        assert!(!map.cancel_in_flight(addr, 77));
        assert!(map.lookup(a.pid, a.key.wrapping_add(1)).is_none());
        let (pid, key) = (a.pid, a.key);
        drop(a);
        assert!(map.lookup(pid, key).is_none());
        assert_eq!(map.len(), 1);
        drop(b);
        assert!(map.is_empty());
    }
}
