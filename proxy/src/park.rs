//! Parking of idle client connections: a connection nobody has used for a while leaves the
//! runtime (no task, no reactor registration of its own) and waits in one epoll set, which
//! the runtime's reactor watches as a single descriptor, until its client sends something or
//! hangs up.
//!
//! An idle transaction-mode client otherwise costs a tokio task (256 bytes) and a reactor
//! registration (256 bytes) besides its own state: a third of what dbproxy kept per idle
//! client. A parked one costs its state and a slab slot here; the kernel keeps the epoll
//! entry. A round trip through the parker is four `epoll_ctl` calls and a task spawn, so
//! clients are parked only after `--client-park-after-ms` of silence.
//!
//! Who is idle for how long is counted in ticks of one sweeper task rather than with a timer
//! per client: a timer per client costs a runtime wake-up per parked client, the sweeper one
//! per tick for all of them. A client registers its waker in the idle list when it starts
//! waiting and leaves it when it speaks; each tick wakes the clients on the list, and one
//! idle since the tick before the last parks.

use std::io;
use std::net::TcpStream as StdTcpStream;
use std::os::fd::AsRawFd;
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

/// What resumes a parked connection, back in the runtime's reactor: spawns its task. Called
/// inside the runtime's context.
pub type Resume<T> = fn(T, tokio::net::TcpStream);

/// Idle connections out of the runtime, each with the state `T` its task needs to resume.
pub struct Parker<T> {
    registry: mio::Registry,
    parked: Mutex<Parked<T>>,
    resume: Resume<T>,
    /// Sweeper ticks so far (one per `--client-park-after-ms`).
    tick: AtomicU64,
    /// The clients waiting idle, woken at each tick.
    idle: WakerList,
    /// A client joined an empty idle list: the sweeper, asleep while it is empty, ticks again.
    first_idle: Notify,
}

/// A client's place among the idle ones while its task lives; leaves the list when dropped.
pub struct IdleWait<'a> {
    tick: &'a AtomicU64,
    idle: &'a WakerList,
    first_idle: &'a Notify,
    slot: WakerSlot,
    /// The tick at which the client last spoke.
    seen: u64,
}

impl IdleWait<'_> {
    /// Called while the client waits idle: whether it has been silent since before the last
    /// tick (time to park); if not, it stays listed for the next tick.
    pub fn poll_park(&mut self, cx: &Context<'_>) -> bool {
        if self.tick.load(Ordering::Relaxed) >= self.seen + 2 {
            return true;
        }
        if self.idle.register(&mut self.slot, cx.waker()) {
            self.first_idle.notify_one();
        }
        false
    }

    /// The client starts waiting idle (after its login or a transaction): silent from now.
    pub fn quiet_from_now(&mut self) {
        self.seen = self.tick.load(Ordering::Relaxed);
    }

    /// The client spoke: off the idle list (no tick wakes it during its transaction).
    pub fn spoke(&mut self) {
        self.idle.remove(&mut self.slot);
    }
}

impl Drop for IdleWait<'_> {
    fn drop(&mut self) {
        self.idle.remove(&mut self.slot);
    }
}

struct Parked<T> {
    entries: Slab<(T, StdTcpStream)>,
    /// Shutdown started: nothing is parked any more, every connection goes back to its task.
    closed: bool,
}

impl<T: Send + 'static> Parker<T> {
    /// Starts a parker: its epoll set, the task that watches it (which resumes every parked
    /// connection when shutdown starts; their tasks then see the shutdown) and the sweeper
    /// ticking every `period`. Must be called inside the runtime.
    pub fn start(resume: Resume<T>, period: Duration, shutdown: Shutdown) -> io::Result<Arc<Self>> {
        let poll = Poll::new()?;
        let parker = Arc::new(Parker {
            registry: poll.registry().try_clone()?,
            parked: Mutex::new(Parked {
                entries: Slab::new(),
                closed: false,
            }),
            resume,
            tick: AtomicU64::new(0),
            idle: WakerList::default(),
            first_idle: Notify::new(),
        });
        // SAFETY: `poll` owns its epoll descriptor, which stays open and the same for as
        // long as `poll` lives, and `poll` lives inside the `AsyncFd` until it is dropped.
        let set = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        tokio::spawn(parker.clone().watch(set, shutdown.clone()));
        tokio::spawn(parker.clone().sweep(period, shutdown));
        Ok(parker)
    }

    /// A client's place among the idle ones, for the life of its task.
    pub fn idle_wait(&self) -> IdleWait<'_> {
        IdleWait {
            tick: &self.tick,
            idle: &self.idle,
            first_idle: &self.first_idle,
            slot: WakerSlot::default(),
            seen: self.tick.load(Ordering::Relaxed),
        }
    }

    /// Ticks every `period` until shutdown, waking the idle clients (each checks whether it
    /// has been idle long enough to park). Asleep while no client waits idle.
    async fn sweep(self: Arc<Self>, period: Duration, mut shutdown: Shutdown) {
        let mut stop = shutdown.recv();
        loop {
            if self.idle.is_empty() {
                tokio::select! {
                    () = self.first_idle.notified() => {}
                    () = &mut stop => return,
                }
            }
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = &mut stop => return,
            }
            self.tick.fetch_add(1, Ordering::Relaxed);
            self.idle.wake_all();
        }
    }

    /// Parks `socket` (taken out of the runtime's reactor already) with `state`. It comes
    /// back through `resume` as soon as it is readable: bytes from the client, its FIN or a
    /// reset. Once shutdown started, or if the kernel refuses the registration, it comes back
    /// at once.
    pub fn park(&self, state: T, socket: StdTcpStream) {
        let mut parked = crate::lock(&self.parked);
        if parked.closed {
            drop(parked);
            resume_std(self.resume, state, socket);
            return;
        }
        let fd = socket.as_raw_fd();
        let key = parked.entries.insert((state, socket));
        // Registering a socket that is readable already reports it at once (epoll checks
        // readiness when an entry is added), so bytes that arrived while the connection
        // left the reactor are not missed.
        if let Err(e) = self
            .registry
            .register(&mut SourceFd(&fd), Token(key), Interest::READABLE)
        {
            tracing::warn!(error = %e, "cannot park an idle client; it keeps its task");
            let (state, socket) = parked.entries.remove(key);
            drop(parked);
            resume_std(self.resume, state, socket);
        }
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
        let Some((state, socket)) = parked.entries.try_remove(key) else {
            return;
        };
        let _ = self.registry.deregister(&mut SourceFd(&socket.as_raw_fd()));
        drop(parked);
        resume_std(self.resume, state, socket);
    }

    /// Resumes every parked connection and parks no more (shutdown).
    fn close(&self) {
        let entries = {
            let mut parked = crate::lock(&self.parked);
            parked.closed = true;
            std::mem::take(&mut parked.entries)
        };
        for (_, (state, socket)) in entries {
            let _ = self.registry.deregister(&mut SourceFd(&socket.as_raw_fd()));
            resume_std(self.resume, state, socket);
        }
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
                        tracing::error!(error = %e, "watching parked clients failed; parking is off");
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

/// Puts `socket` back in the runtime's reactor and resumes its task; a socket the reactor
/// refuses is closed (its client sees the connection end, as when a proxy runs out of file
/// descriptors).
fn resume_std<T>(resume: Resume<T>, state: T, socket: StdTcpStream) {
    match tokio::net::TcpStream::from_std(socket) {
        Ok(socket) => resume(state, socket),
        Err(e) => tracing::warn!(error = %e, "cannot resume a parked client; closing it"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::io::AsyncReadExt;
    use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

    /// A parked test connection: its number and where to report its resumption.
    type Tag = (u32, UnboundedSender<(u32, tokio::net::TcpStream)>);

    fn report(tag: Tag, socket: tokio::net::TcpStream) {
        let _ = tag.1.send((tag.0, socket));
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
            parker: Parker::start(report, Duration::from_secs(3600), shutdown).unwrap(),
            tx,
            rx,
            listener: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        }
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
        parker.park((1, tx.clone()), quiet);
        parker.park((2, tx.clone()), server);
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
        parker.park((3, tx.clone()), socket.into_std().unwrap());
        let (id, mut socket) = resumed(&mut rx).await;
        assert_eq!(id, 3);
        socket.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"again");

        // A hang-up is readable too: the task resumes and reads the end.
        parker.park((4, tx.clone()), socket.into_std().unwrap());
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
        let mut clients = Vec::new();
        for id in 0..3 {
            let (client, server) = pair(&listener);
            clients.push(client);
            parker.park((id, tx.clone()), server);
        }
        assert_eq!(parker.len(), 3);
        trigger.trigger();
        let mut ids: Vec<u32> = Vec::new();
        for _ in 0..3 {
            ids.push(resumed(&mut rx).await.0);
        }
        ids.sort();
        assert_eq!(ids, [0, 1, 2]);
        assert!(parker.is_empty());
        let (_client, server) = pair(&listener);
        parker.park((9, tx.clone()), server);
        assert_eq!(resumed(&mut rx).await.0, 9, "parked after shutdown");
        assert!(parker.is_empty());
    }

    #[tokio::test]
    async fn an_idle_client_parks_after_two_ticks_and_the_sweeper_sleeps_without_one() {
        let (_trigger, shutdown) = Shutdown::new();
        let period = Duration::from_millis(20);
        let parker = Parker::<Tag>::start(report, period, shutdown).unwrap();
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
        let tick = parker.tick.load(Ordering::Relaxed);
        tokio::time::sleep(5 * period).await;
        assert_eq!(parker.tick.load(Ordering::Relaxed), tick);
    }
}
