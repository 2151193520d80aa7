//! Parking of idle client connections: a connection nobody has used for a while leaves the
//! runtime (no task, no reactor registration of its own) and waits in one epoll set, which
//! the runtime's reactor watches as a single descriptor, until one of its sockets is readable
//! (its client, or a session-mode client's server, sent something or hung up).
//!
//! An idle transaction-mode client otherwise costs a tokio task (256 bytes) and a reactor
//! registration (256 bytes) besides its own state: a third of what dbproxy kept per idle
//! client; an idle session costs the task, two registrations and its forwarding loop's state,
//! more than half. A parked one costs its state and a slab slot here; the kernel keeps the
//! epoll entries. A round trip through the parker is two `epoll_ctl` calls per socket, a
//! reactor registration per socket and a task spawn, so clients are parked only after
//! `--client-park-after-ms` of silence.
//!
//! A parked client keeps its state by value in the parker's slab, nothing of its own in the
//! heap: what its task, registration and boxes used is free. glibc does not hand free memory
//! in the middle of its heap back to the system by itself, and after a burst of logins those
//! pages sit among long-lived allocations where only later allocations of the right size can
//! reuse them; so parking counts as freed memory that [`crate::memory`] hands back.
//!
//! Who is idle for how long is counted in ticks of one sweeper task rather than with a timer
//! per client: a timer per client costs a runtime wake-up per parked client, the sweeper one
//! per tick for all of them. A client registers its waker in the idle list the first time it
//! waits idle and stays there until it parks or ends; when it speaks it only notes the tick
//! (with a period under a second it also leaves the list, see [`IdleWait::spoke`]). Each tick
//! wakes the clients on the list, and one silent since the tick before the last parks (if it
//! is at a point where it can).

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Context;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::shutdown::Shutdown;
use crate::wake::{WakerList, WakerSlot};

/// A connection that can wait out of the runtime: the sockets it waits on (taken out of the
/// runtime's reactor before it is parked) and how it goes back.
pub trait Parkable: Send + 'static {
    /// The sockets whose readiness (bytes, a FIN, a reset) resumes it: a client's, and a
    /// session's server connection's when it has one.
    fn sockets(&self) -> [Option<RawFd>; 2];

    /// Back in the runtime: puts its sockets back in the reactor and spawns its task.
    /// Called inside the runtime's context.
    fn resume(self);
}

/// Idle connections out of the runtime, each with the state its task needs to resume.
pub struct Parker<T> {
    registry: mio::Registry,
    parked: Mutex<Parked<T>>,
    idle: Arc<IdleClock>,
}

/// Who is idle, and for how long: the sweeper's ticks and the idle list.
#[derive(Default)]
struct IdleClock {
    /// Sweeper ticks so far (one per `--client-park-after-ms`).
    tick: AtomicU64,
    /// The clients waiting idle, woken at each tick.
    list: WakerList,
    /// A client joined an empty idle list: the sweeper, asleep while it is empty, ticks again.
    first_idle: Notify,
    /// Whether a client that speaks stays on the list (see [`IdleWait::spoke`]).
    busy_stay_listed: bool,
}

/// The shortest period at which clients stay on the idle list while busy.
const STAY_LISTED_FROM: Duration = Duration::from_secs(1);

/// What parking a client frees, roughly: its task (256 bytes), its reactor registration (256
/// per socket) and the boxes its state lived in.
const FREED_BY_PARKING: usize = 1024;

/// A client's place among the idle ones while its task lives; leaves the list when dropped.
pub struct IdleWait {
    clock: Arc<IdleClock>,
    slot: WakerSlot,
    /// The tick at which the client last spoke.
    seen: u64,
}

impl IdleWait {
    /// Called while the client waits idle: whether it has been silent since before the last
    /// tick (time to park); if not, it stays listed for the next tick.
    pub fn poll_park(&mut self, cx: &Context<'_>) -> bool {
        if self.clock.tick.load(Ordering::Relaxed) >= self.seen + 2 {
            return true;
        }
        if self.clock.list.register(&mut self.slot, cx.waker()) {
            self.clock.first_idle.notify_one();
        }
        false
    }

    /// The client starts waiting idle (after its login or a transaction): silent from now.
    pub fn quiet_from_now(&mut self) {
        self.seen = self.clock.tick.load(Ordering::Relaxed);
    }

    /// The client (or its server) spoke: silent from now. With a period of a second or more
    /// (the default is 10 s) it stays on the idle list, and a tick wakes it for nothing if it
    /// is busy: leaving and joining the list at each message took two locks and about 250
    /// instructions per transaction. With a shorter period it leaves the list, so ticks do
    /// not wake every busy client many times a second.
    pub fn spoke(&mut self) {
        if !self.clock.busy_stay_listed {
            self.clock.list.remove(&mut self.slot);
        }
        self.quiet_from_now();
    }
}

impl Drop for IdleWait {
    fn drop(&mut self) {
        self.clock.list.remove(&mut self.slot);
    }
}

struct Parked<T> {
    entries: Slab<T>,
    /// Shutdown started: nothing is parked any more, every connection goes back to its task.
    closed: bool,
    /// How many times every parked connection was resumed at once ([`Parker::resume_all`]).
    epoch: u64,
}

impl<T: Parkable> Parker<T> {
    /// Starts a parker: its epoll set, the task that watches it (which resumes every parked
    /// connection when shutdown starts; their tasks then see the shutdown) and the sweeper
    /// ticking every `period`. Must be called inside the runtime.
    pub fn start(period: Duration, shutdown: Shutdown) -> io::Result<Arc<Self>> {
        let poll = Poll::new()?;
        let parker = Arc::new(Parker {
            registry: poll.registry().try_clone()?,
            parked: Mutex::new(Parked {
                entries: Slab::new(),
                closed: false,
                epoch: 0,
            }),
            idle: Arc::new(IdleClock {
                busy_stay_listed: period >= STAY_LISTED_FROM,
                ..IdleClock::default()
            }),
        });
        // SAFETY: `poll` owns its epoll descriptor, which stays open and the same for as
        // long as `poll` lives, and `poll` lives inside the `AsyncFd` until it is dropped.
        let set = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        tokio::spawn(parker.clone().watch(set, shutdown.clone()));
        tokio::spawn(sweep(parker.idle.clone(), period, shutdown));
        Ok(parker)
    }

    /// A client's place among the idle ones, for the life of its task.
    pub fn idle_wait(&self) -> IdleWait {
        IdleWait {
            clock: self.idle.clone(),
            slot: WakerSlot::default(),
            seen: self.idle.tick.load(Ordering::Relaxed),
        }
    }

    /// The number of [`Parker::resume_all`] calls so far; see [`Parker::park`].
    pub fn epoch(&self) -> u64 {
        crate::lock(&self.parked).epoch
    }

    /// Parks `state`, whose sockets are out of the runtime's reactor already. It comes back
    /// through [`Parkable::resume`] as soon as one of them is readable. It comes back at
    /// once if shutdown started, if the kernel refuses the registration, or if
    /// [`Parker::resume_all`] ran since `epoch` was read from [`Parker::epoch`] (a caller
    /// that reads the epoch before it last looks for a reason to stay awake misses none).
    pub fn park(&self, state: T, epoch: u64) {
        let mut parked = crate::lock(&self.parked);
        if parked.closed || parked.epoch != epoch {
            drop(parked);
            state.resume();
            return;
        }
        let sockets = state.sockets();
        let key = parked.entries.insert(state);
        // Registering a socket that is readable already reports it at once (epoll checks
        // readiness when an entry is added), so bytes that arrived while the connection
        // left the reactor are not missed.
        for (registered, fd) in sockets.iter().flatten().enumerate() {
            if let Err(e) =
                self.registry
                    .register(&mut SourceFd(fd), Token(key), Interest::READABLE)
            {
                tracing::warn!(
                    error = %e,
                    "cannot park an idle client; it keeps its task (the kernel refused the registration: check fs.epoll.max_user_watches and the open-files limit)"
                );
                for fd in sockets.iter().flatten().take(registered) {
                    let _ = self.registry.deregister(&mut SourceFd(fd));
                }
                let state = parked.entries.remove(key);
                drop(parked);
                state.resume();
                return;
            }
        }
        drop(parked);
        crate::memory::freed(FREED_BY_PARKING);
    }

    /// How many connections are parked now.
    pub fn len(&self) -> usize {
        crate::lock(&self.parked).entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the connection of `key` out of the set and resumes it.
    fn unpark(&self, key: usize) {
        let mut parked = crate::lock(&self.parked);
        // Both sockets of a session may report: the first report resumes it.
        let Some(state) = parked.entries.try_remove(key) else {
            return;
        };
        self.deregister(&state);
        drop(parked);
        state.resume();
    }

    fn deregister(&self, state: &T) {
        for fd in state.sockets().iter().flatten() {
            let _ = self.registry.deregister(&mut SourceFd(fd));
        }
    }

    /// Resumes every parked connection now, and every one parked with an older epoch when it
    /// tries.
    pub fn resume_all(&self) {
        self.resume_if(|_| true);
    }

    /// Resumes the parked connections `wanted` picks (those a rotation moves), and every one
    /// parked with an older epoch when it tries (it may not have seen the rotation).
    pub fn resume_if(&self, wanted: impl Fn(&T) -> bool) {
        let resumed: Vec<T> = {
            let mut parked = crate::lock(&self.parked);
            parked.epoch += 1;
            let keys: Vec<usize> = parked
                .entries
                .iter()
                .filter(|(_, state)| wanted(state))
                .map(|(key, _)| key)
                .collect();
            keys.into_iter()
                .map(|key| parked.entries.remove(key))
                .collect()
        };
        for state in resumed {
            self.deregister(&state);
            state.resume();
        }
    }

    /// Resumes every parked connection and parks no more (shutdown).
    fn close(&self) {
        crate::lock(&self.parked).closed = true;
        self.resume_all();
    }

    /// Resumes each connection that becomes readable, until shutdown; then resumes them
    /// all.
    async fn watch(self: Arc<Self>, mut set: AsyncFd<Poll>, mut shutdown: Shutdown) {
        let mut events = Events::with_capacity(256);
        let mut stop = shutdown.recv();
        loop {
            let mut ready = tokio::select! {
                ready = set.readable_mut() => match ready {
                    Ok(ready) => ready,
                    Err(e) => {
                        tracing::error!(error = %e, "watching parked clients failed: every parked client is resumed and parking stays off until dbproxy restarts (with --client-park-after-ms 0 it never starts)");
                        break;
                    }
                },
                () = &mut stop => break,
            };
            // The reactor reports the set's descriptor edge-triggered: take events until
            // none is left, then clear its readiness (kept if it became readable again
            // meanwhile).
            loop {
                match ready
                    .get_inner_mut()
                    .poll(&mut events, Some(Duration::ZERO))
                {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "polling parked clients failed");
                        break;
                    }
                }
                if events.is_empty() {
                    ready.clear_ready();
                    break;
                }
                for event in events.iter() {
                    self.unpark(event.token().0);
                }
            }
        }
        self.close();
    }
}

/// Ticks every `period` until shutdown, waking the idle clients (each checks whether it has
/// been idle long enough to park). Asleep while no client is on the idle list.
async fn sweep(clock: Arc<IdleClock>, period: Duration, mut shutdown: Shutdown) {
    let mut stop = shutdown.recv();
    loop {
        if clock.list.is_empty() {
            tokio::select! {
                () = clock.first_idle.notified() => {}
                () = &mut stop => return,
            }
        }
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = &mut stop => return,
        }
        clock.tick.fetch_add(1, Ordering::Relaxed);
        clock.list.wake_all();
    }
}

/// Puts a parked socket back in the runtime's reactor; a socket the reactor refuses is
/// closed by the caller dropping it (its client sees the connection end, as when a proxy runs
/// out of file descriptors).
pub fn to_runtime(socket: std::net::TcpStream) -> Option<tokio::net::TcpStream> {
    match tokio::net::TcpStream::from_std(socket) {
        Ok(socket) => Some(socket),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot put a parked client's socket back in the runtime; closing it (the kernel refused the registration: check fs.epoll.max_user_watches and the open-files limit)"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpStream as StdTcpStream;
    use std::os::fd::AsRawFd;
    use tokio::io::AsyncReadExt;
    use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

    /// A parked test connection: its number, its socket and where to report its resumption.
    struct Tag(
        u32,
        UnboundedSender<(u32, tokio::net::TcpStream)>,
        StdTcpStream,
    );

    impl Parkable for Tag {
        fn sockets(&self) -> [Option<RawFd>; 2] {
            [Some(self.2.as_raw_fd()), None]
        }

        fn resume(self) {
            let socket = to_runtime(self.2).unwrap();
            let _ = self.1.send((self.0, socket));
        }
    }

    /// A connected pair: the client end (blocking) and the proxy end, non-blocking as the
    /// runtime leaves it.
    fn pair(listener: &std::net::TcpListener) -> (std::net::TcpStream, StdTcpStream) {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, server)
    }

    async fn resumed(
        rx: &mut UnboundedReceiver<(u32, tokio::net::TcpStream)>,
    ) -> (u32, tokio::net::TcpStream) {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a parked connection was not resumed within 5 s")
            .expect("channel closed")
    }

    /// A parker that never ticks (the tests park by hand), where resumed connections are
    /// reported, and a listener to make connections with.
    struct Setup {
        parker: Arc<Parker<Tag>>,
        tx: UnboundedSender<(u32, tokio::net::TcpStream)>,
        rx: UnboundedReceiver<(u32, tokio::net::TcpStream)>,
        listener: std::net::TcpListener,
    }

    fn setup(shutdown: Shutdown) -> Setup {
        let (tx, rx) = unbounded_channel();
        Setup {
            parker: Parker::start(Duration::from_secs(3600), shutdown).unwrap(),
            tx,
            rx,
            listener: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        }
    }

    /// The numbers of the next `n` connections resumed, in order.
    async fn resumed_ids(
        rx: &mut UnboundedReceiver<(u32, tokio::net::TcpStream)>,
        n: usize,
    ) -> Vec<u32> {
        let mut ids = Vec::new();
        for _ in 0..n {
            ids.push(resumed(rx).await.0);
        }
        ids.sort();
        ids
    }

    /// Parks connections 0, 1 and 2; returns their client ends (dropping one hangs it up).
    fn park_three(
        parker: &Parker<Tag>,
        tx: &UnboundedSender<(u32, tokio::net::TcpStream)>,
        listener: &std::net::TcpListener,
    ) -> Vec<std::net::TcpStream> {
        (0..3)
            .map(|id| {
                let (client, server) = pair(listener);
                parker.park(Tag(id, tx.clone(), server), parker.epoch());
                client
            })
            .collect()
    }

    #[tokio::test]
    async fn a_parked_connection_comes_back_when_readable_with_its_bytes() {
        let (_trigger, shutdown) = Shutdown::new();
        let Setup {
            parker,
            tx,
            mut rx,
            listener,
        } = setup(shutdown);
        let (mut quiet_client, quiet) = pair(&listener);
        let (mut client, server) = pair(&listener);
        parker.park(Tag(1, tx.clone(), quiet), parker.epoch());
        parker.park(Tag(2, tx.clone(), server), parker.epoch());
        assert_eq!(parker.len(), 2);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_err(), "resumed with nothing to read");

        client.write_all(b"hello").unwrap();
        let (id, mut socket) = resumed(&mut rx).await;
        assert_eq!(id, 2);
        let mut buf = [0u8; 5];
        socket.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(parker.len(), 1, "the quiet connection must stay parked");

        // Parked again with bytes already waiting: back at once.
        client.write_all(b"again").unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        parker.park(
            Tag(3, tx.clone(), socket.into_std().unwrap()),
            parker.epoch(),
        );
        let (id, mut socket) = resumed(&mut rx).await;
        assert_eq!(id, 3);
        socket.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"again");

        // A hang-up is readable too: the task resumes and reads the end.
        parker.park(
            Tag(4, tx.clone(), socket.into_std().unwrap()),
            parker.epoch(),
        );
        drop(client);
        let (id, mut socket) = resumed(&mut rx).await;
        assert_eq!(id, 4);
        assert_eq!(socket.read(&mut buf).await.unwrap(), 0);

        quiet_client.write_all(b"x").unwrap();
        assert_eq!(resumed(&mut rx).await.0, 1);
        assert!(parker.is_empty());
    }

    #[tokio::test]
    async fn shutdown_resumes_every_parked_connection_and_parks_no_more() {
        let (trigger, shutdown) = Shutdown::new();
        let Setup {
            parker,
            tx,
            mut rx,
            listener,
        } = setup(shutdown);
        let _clients = park_three(&parker, &tx, &listener);
        assert_eq!(parker.len(), 3);
        trigger.trigger();
        assert_eq!(resumed_ids(&mut rx, 3).await, [0, 1, 2]);
        assert!(parker.is_empty());
        let (_client, server) = pair(&listener);
        parker.park(Tag(9, tx.clone(), server), parker.epoch());
        assert_eq!(resumed(&mut rx).await.0, 9, "parked after shutdown");
        assert!(parker.is_empty());
    }

    /// A parked pair (a session's client and server sockets) under one entry.
    struct Pair(u32, UnboundedSender<u32>, StdTcpStream, StdTcpStream);

    impl Parkable for Pair {
        fn sockets(&self) -> [Option<RawFd>; 2] {
            [Some(self.2.as_raw_fd()), Some(self.3.as_raw_fd())]
        }

        fn resume(self) {
            let _ = self.1.send(self.0);
        }
    }

    #[tokio::test]
    async fn either_socket_of_a_pair_resumes_it_once() {
        let (_trigger, shutdown) = Shutdown::new();
        let parker = Parker::<Pair>::start(Duration::from_secs(3600), shutdown).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx, mut rx) = unbounded_channel();
        let (_client_a, proxy_a) = pair(&listener);
        let (mut server_a, proxy_sa) = pair(&listener);
        let (mut client_b, proxy_b) = pair(&listener);
        let (mut server_b, proxy_sb) = pair(&listener);
        parker.park(Pair(1, tx.clone(), proxy_a, proxy_sa), parker.epoch());
        parker.park(Pair(2, tx.clone(), proxy_b, proxy_sb), parker.epoch());
        // The server side speaks first (a notification): the pair comes back.
        server_a.write_all(b"A").unwrap();
        let id = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(id.unwrap(), Some(1));
        // Both sides of the other pair at once: resumed once.
        client_b.write_all(b"q").unwrap();
        server_b.write_all(b"n").unwrap();
        let id = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(id.unwrap(), Some(2));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_err(), "a pair was resumed twice");
        assert!(parker.is_empty());
    }

    #[tokio::test]
    async fn a_rotation_resumes_whom_it_moves_and_a_park_from_before_it_comes_back_at_once() {
        let (_trigger, shutdown) = Shutdown::new();
        let Setup {
            parker,
            tx,
            mut rx,
            listener,
        } = setup(shutdown);
        let mut clients = park_three(&parker, &tx, &listener);
        // A rotation that moves only some: the others stay parked.
        parker.resume_if(|tag| tag.0 == 1);
        assert_eq!(resumed(&mut rx).await.0, 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            rx.try_recv().is_err(),
            "resumed one the rotation does not move"
        );
        assert_eq!(parker.len(), 2);
        let (client, server) = pair(&listener);
        clients.push(client);
        parker.park(Tag(1, tx.clone(), server), parker.epoch());
        // Read before a rotation that a session has not seen yet.
        let stale = parker.epoch();
        parker.resume_all();
        assert_eq!(resumed_ids(&mut rx, 3).await, [0, 1, 2]);
        let (_client, server) = pair(&listener);
        parker.park(Tag(7, tx.clone(), server), stale);
        assert_eq!(
            resumed(&mut rx).await.0,
            7,
            "parked with an epoch from before resume_all"
        );
        // With the current epoch it stays, and parking goes on as before.
        let (_client, server) = pair(&listener);
        parker.park(Tag(8, tx.clone(), server), parker.epoch());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_err());
        assert_eq!(parker.len(), 1);
    }

    #[tokio::test]
    async fn an_idle_client_parks_after_two_ticks_and_the_sweeper_sleeps_without_one() {
        let (_trigger, shutdown) = Shutdown::new();
        let period = Duration::from_millis(20);
        let parker = Parker::<Tag>::start(period, shutdown).unwrap();
        let mut wait = parker.idle_wait();
        let started = std::time::Instant::now();
        let park = std::future::poll_fn(|cx| {
            if wait.poll_park(cx) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        });
        tokio::time::timeout(Duration::from_secs(5), park)
            .await
            .expect("an idle client was never told to park");
        assert!(
            started.elapsed() >= 2 * period,
            "parked after {:?}, before two ticks",
            started.elapsed()
        );
        // Speaking, then waiting again, makes it silent from now: no park at the next poll.
        wait.spoke();
        wait.quiet_from_now();
        let waker = std::task::Waker::noop();
        assert!(!wait.poll_park(&Context::from_waker(waker)));
        drop(wait);
        // Nobody idle: the sweeper stops ticking (after the tick it was waiting for).
        tokio::time::sleep(10 * period).await;
        let tick = parker.idle.tick.load(Ordering::Relaxed);
        tokio::time::sleep(5 * period).await;
        assert_eq!(parker.idle.tick.load(Ordering::Relaxed), tick);
    }

    /// A client that speaks stays on the idle list with a period of a second or more (no
    /// locks per message), and leaves it with a shorter one (no wake-ups of every busy client
    /// many times a second).
    #[test]
    fn a_speaking_client_stays_listed_only_with_long_periods() {
        let waker = std::task::Waker::noop();
        let cx = Context::from_waker(waker);
        for (stay, listed_after_speaking) in [(true, 1), (false, 0)] {
            let clock = Arc::new(IdleClock {
                busy_stay_listed: stay,
                ..IdleClock::default()
            });
            let mut wait = IdleWait {
                clock: clock.clone(),
                slot: WakerSlot::default(),
                seen: 0,
            };
            assert!(!wait.poll_park(&cx), "silent for no tick yet");
            assert_eq!(clock.list.len(), 1);
            wait.spoke();
            assert_eq!(
                clock.list.len(),
                listed_after_speaking,
                "stay_listed = {stay}"
            );
            // Two ticks of silence later it parks either way.
            clock.tick.fetch_add(2, Ordering::Relaxed);
            assert!(wait.poll_park(&cx));
            drop(wait);
            assert_eq!(clock.list.len(), 0, "a parked client leaves the list");
        }
    }
}
