//! The session lane: established plaintext session-mode sessions are forwarded by a thread
//! of their own, with one epoll set and plain non-blocking reads and writes, out of the
//! tokio runtime.
//!
//! Forwarding a select-only transaction through a task costs the runtime about 3000
//! instructions (readiness bookkeeping and waker registration per read and write, the
//! scheduler, the timer wheel and clock reads at each park), more than everything pgbouncer
//! does for it. Here a transaction costs its four system calls, the message walk and an
//! `epoll_wait` shared by the events of one wakeup.
//!
//! The lane forwards only what needs no decision: bytes walked by the same
//! [`inspect_client`]/[`inspect_server`] as the runtime's [`crate::proxy::Pump`], with
//! backpressure (what a socket does not take waits, and its source is not read meanwhile).
//! Anything else gives the session back to the runtime with its whole forwarding state (a
//! [`Carry`]): the end of a session (Terminate, a closed or broken socket, a malformed or
//! oversized message), a rotation that moves it, shutdown. The runtime's pump goes on from
//! exactly there, so what a client sees does not depend on where its session was
//! forwarded. Sessions enter at a safe point (the server idle outside a transaction,
//! nothing in flight): after their login, and after a move.
//!
//! An idle session in the lane has no task and no reactor registration: it costs its state
//! in the lane's slab, as a parked one does (see [`crate::park`]), from its first idle
//! moment instead of after `--client-park-after-ms`.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::client::ParkedSession;
use crate::proxy::{Carry, SessionEnd, inspect_client, inspect_server};
use crate::shutdown::Shutdown;
use crate::stats::hot;

/// The token of the lane's waker; session tokens are `key << 1 | side`.
const WAKE: Token = Token(usize::MAX);

/// Size of the lane's read buffer (one for all sessions, as the pump's stack buffer).
const CHUNK: usize = 16 * 1024;

/// Reads per direction and wakeup before a busy session lets the others go first.
const ROUNDS: usize = 8;

/// What parking frees, roughly, counted the same way for a session entering the lane: its
/// task, its two reactor registrations and the boxes its state lived in.
const FREED_ON_ENTRY: usize = 1024;

/// Shared between the lane thread and the runtime.
pub struct Lane {
    waker: Waker,
    inbox: Mutex<Inbox>,
    /// Sessions in the lane now (for the gauge).
    count: AtomicUsize,
    /// False once shutdown started or the lane thread stopped: sessions stay in the runtime.
    /// Cleared under the inbox's lock, so that [`Lane::enter`] sees it with the epoch; read
    /// without it by sessions deciding whether to try.
    open: AtomicBool,
    runtime: tokio::runtime::Handle,
}

#[derive(Default)]
struct Inbox {
    messages: Vec<Message>,
    /// Bumped by every [`Lane::resume_if`]: a session whose task last looked for a rotation
    /// before that goes back at once (it may not have seen the rotation).
    epoch: u64,
}

enum Message {
    Enter(Box<ParkedSession>),
    ResumeIf(Box<dyn Fn(&ParkedSession) -> bool + Send>),
    Close,
}

/// A session in the lane.
struct Entry {
    session: Box<ParkedSession>,
    carry: Carry,
    /// The client's (server's) socket may have bytes to read: it reported readiness and no
    /// read since found it drained.
    client_ready: bool,
    server_ready: bool,
    /// The socket reported its peer's FIN (or an error): it stays ready until a read says
    /// so, since no new event comes after a short read drained the bytes before it.
    client_hup: bool,
    server_hup: bool,
    /// Custom settings are tracked (`--migrate` is on).
    track_custom: bool,
    max_client_message: usize,
}

/// What [`drive`] leaves to do.
enum Driven {
    /// Waiting for readiness.
    Idle,
    /// Its sockets may have more: drive it again after the others had their turn.
    More,
    /// Back to the runtime.
    GiveBack,
}

impl Lane {
    /// Starts the lane thread. Must be called inside the runtime, which resumed sessions
    /// go back to.
    pub fn start(shutdown: Shutdown) -> io::Result<Arc<Self>> {
        let poll = Poll::new()?;
        let lane = Arc::new(Lane {
            waker: Waker::new(poll.registry(), WAKE)?,
            inbox: Mutex::new(Inbox::default()),
            count: AtomicUsize::new(0),
            open: AtomicBool::new(true),
            runtime: tokio::runtime::Handle::current(),
        });
        let thread = lane.clone();
        std::thread::Builder::new()
            .name("dbproxy-lane".into())
            .spawn(move || thread.run(poll))?;
        let closing = lane.clone();
        let mut shutdown = shutdown;
        tokio::spawn(async move {
            shutdown.recv().await;
            closing.close();
        });
        Ok(lane)
    }

    /// The number of [`Lane::resume_if`] calls so far; see [`Lane::enter`].
    pub fn epoch(&self) -> u64 {
        crate::lock(&self.inbox).epoch
    }

    /// Whether the lane takes sessions (not after shutdown started or the lane stopped): a
    /// session that would enter a closed lane stays on the runtime, or it would bounce
    /// between [`Lane::enter`] and its task.
    pub fn is_open(&self) -> bool {
        self.open.load(Relaxed)
    }

    /// How many sessions the lane forwards now.
    pub fn len(&self) -> usize {
        self.count.load(Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hands a session at a safe point to the lane, its sockets out of the runtime's
    /// reactor. It goes back at once if the lane is closed or [`Lane::resume_if`] ran since
    /// `epoch` was read (a caller that reads the epoch before it last looks for a rotation
    /// misses none). Called inside the runtime.
    pub fn enter(&self, session: Box<ParkedSession>, epoch: u64) {
        let mut inbox = crate::lock(&self.inbox);
        if !self.is_open() || inbox.epoch != epoch {
            drop(inbox);
            session.resume_from(None);
            return;
        }
        inbox.messages.push(Message::Enter(session));
        self.count.fetch_add(1, Relaxed);
        drop(inbox);
        self.wake();
    }

    /// Gives back the sessions `wanted` picks (those a rotation moves), and every session
    /// entering later with an older epoch.
    pub fn resume_if(&self, wanted: impl Fn(&ParkedSession) -> bool + Send + 'static) {
        let mut inbox = crate::lock(&self.inbox);
        inbox.epoch += 1;
        inbox.messages.push(Message::ResumeIf(Box::new(wanted)));
        drop(inbox);
        self.wake();
    }

    /// Gives every session back and takes no more (shutdown: their tasks see it).
    fn close(&self) {
        let mut inbox = crate::lock(&self.inbox);
        self.open.store(false, Relaxed);
        inbox.messages.push(Message::Close);
        drop(inbox);
        self.wake();
    }

    fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            tracing::error!(error = %e, "cannot wake the session lane (its eventfd refused a write): sessions waiting to enter or to be given back are served at its next wakeup; if this repeats, restart with --session-lane false");
        }
    }

    /// Back to the runtime, on a task of its own, with where its forwarding stands.
    fn give_back(&self, poll: &Poll, entry: Entry) {
        let Entry {
            session, mut carry, ..
        } = entry;
        for fd in session.lane_sockets() {
            let _ = poll.registry().deregister(&mut SourceFd(&fd.as_raw_fd()));
        }
        self.count.fetch_sub(1, Relaxed);
        // What the pump's own writes would show: a direction with bytes waiting is writing.
        let state = &carry.state;
        state
            .c2s_writing
            .store(!carry.to_server.bytes.is_empty(), Relaxed);
        state
            .s2c_writing
            .store(!carry.to_client.bytes.is_empty(), Relaxed);
        carry.to_server.flush = !carry.to_server.bytes.is_empty();
        carry.to_client.flush = !carry.to_client.bytes.is_empty();
        self.runtime.spawn(session.resumed(Some(Box::new(carry))));
    }

    /// The lane thread: forwards until the epoll set fails (then every session goes back
    /// and the lane takes no more).
    fn run(self: Arc<Self>, mut poll: Poll) {
        // Declared first, dropped last: after the sessions, should a bug panic here.
        let _exit = Exit(&self);
        let mut events = Events::with_capacity(1024);
        let mut sessions: Slab<Entry> = Slab::new();
        let mut buf = vec![0u8; CHUNK].into_boxed_slice();
        // Sessions with more to read than one turn took, driven again after the others.
        let mut again: Vec<usize> = Vec::new();
        let mut later: Vec<usize> = Vec::new();
        loop {
            let timeout = (!again.is_empty()).then_some(Duration::ZERO);
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "the session lane's epoll set failed: its sessions go back to the runtime, and new ones stay there");
                self.shut(&poll, &mut sessions);
                return;
            }
            for event in events.iter() {
                if event.token() == WAKE {
                    if self.take_messages(&poll, &mut sessions, &mut later) {
                        return;
                    }
                    continue;
                }
                let key = event.token().0 >> 1;
                let Some(entry) = sessions.get_mut(key) else {
                    continue;
                };
                // Bytes, a FIN, a reset or an error: a read says which. Writability needs
                // no flag: every turn retries what waits to be written.
                let hup = event.is_read_closed() || event.is_error();
                if event.is_readable() || hup {
                    if event.token().0 & 1 == 0 {
                        entry.client_ready = true;
                        entry.client_hup |= hup;
                    } else {
                        entry.server_ready = true;
                        entry.server_hup |= hup;
                    }
                }
                self.turn(&poll, &mut sessions, key, &mut buf, &mut later);
            }
            for key in std::mem::take(&mut again) {
                self.turn(&poll, &mut sessions, key, &mut buf, &mut later);
            }
            std::mem::swap(&mut again, &mut later);
        }
    }

    /// One turn of a session: forward what is ready, then give it back or queue it again.
    fn turn(
        &self,
        poll: &Poll,
        sessions: &mut Slab<Entry>,
        key: usize,
        buf: &mut [u8],
        later: &mut Vec<usize>,
    ) {
        let Some(entry) = sessions.get_mut(key) else {
            return;
        };
        match drive(entry, buf) {
            Driven::Idle => {}
            Driven::More => later.push(key),
            Driven::GiveBack => {
                let entry = sessions.remove(key);
                self.give_back(poll, entry);
            }
        }
    }

    /// Takes the runtime's messages in order. True when the lane closed.
    fn take_messages(
        &self,
        poll: &Poll,
        sessions: &mut Slab<Entry>,
        later: &mut Vec<usize>,
    ) -> bool {
        let messages = std::mem::take(&mut crate::lock(&self.inbox).messages);
        for message in messages {
            match message {
                Message::Enter(session) => self.admit(poll, sessions, session, later),
                Message::ResumeIf(wanted) => {
                    let keys: Vec<usize> = sessions
                        .iter()
                        .filter(|(_, e)| wanted(&e.session))
                        .map(|(key, _)| key)
                        .collect();
                    for key in keys {
                        let entry = sessions.remove(key);
                        self.give_back(poll, entry);
                    }
                }
                Message::Close => {
                    self.shut(poll, sessions);
                    return true;
                }
            }
        }
        false
    }

    /// A new session: registered for both sockets (a socket readable already reports at
    /// once), with the bytes its client sent behind its startup packet forwarded first.
    fn admit(
        &self,
        poll: &Poll,
        sessions: &mut Slab<Entry>,
        mut session: Box<ParkedSession>,
        later: &mut Vec<usize>,
    ) {
        let (max_client_message, track_custom) = session.lane_settings();
        let initial = session.take_initial();
        let key = sessions.vacant_key();
        let mut registered = 0;
        let mut failed = None;
        for (side, fd) in session.lane_sockets().iter().enumerate() {
            match poll.registry().register(
                &mut SourceFd(&fd.as_raw_fd()),
                Token(key << 1 | side),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                Ok(()) => registered += 1,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let mut entry = Entry {
            session,
            carry: Carry::new(),
            client_ready: false,
            server_ready: false,
            client_hup: false,
            server_hup: false,
            track_custom,
            max_client_message,
        };
        if let Some(e) = failed {
            tracing::warn!(error = %e, "cannot add a session to the session lane; the runtime forwards it (check fs.epoll.max_user_watches and the open-files limit)");
            for fd in entry.session.lane_sockets().iter().take(registered) {
                let _ = poll.registry().deregister(&mut SourceFd(&fd.as_raw_fd()));
            }
            self.count.fetch_sub(1, Relaxed);
            self.runtime.spawn(entry.session.resumed(None));
            return;
        }
        crate::memory::freed(FREED_ON_ENTRY);
        if !initial.is_empty() && client_bytes(&mut entry, &initial).is_err() {
            // The session ended behind its startup packet: the runtime finishes it.
            self.give_back(poll, entry);
            return;
        }
        let inserted = sessions.insert(entry);
        debug_assert_eq!(inserted, key);
        // The registration reports readiness already there; a session whose initial bytes
        // are still being written is driven with the others.
        if !sessions[key].carry.to_server.bytes.is_empty() {
            later.push(key);
        }
    }

    /// Every session back to the runtime; the lane takes no more.
    fn shut(&self, poll: &Poll, sessions: &mut Slab<Entry>) {
        {
            let _inbox = crate::lock(&self.inbox);
            self.open.store(false, Relaxed);
        }
        for entry in sessions.drain() {
            self.give_back(poll, entry);
        }
        // Sessions that entered after the last look at the inbox.
        let messages = std::mem::take(&mut crate::lock(&self.inbox).messages);
        for message in messages {
            if let Message::Enter(session) = message {
                self.count.fetch_sub(1, Relaxed);
                self.runtime.spawn(session.resumed(None));
            }
        }
    }
}

/// Should the lane thread panic (a bug), its sessions are lost (their sockets close, their
/// pool slots go back), but the lane closes: sessions waiting to enter and every later one
/// stay on the runtime.
struct Exit<'a>(&'a Lane);

impl Drop for Exit<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        tracing::error!(
            "the session lane thread panicked: its sessions were closed; the runtime forwards every session from now on"
        );
        let messages = {
            let mut inbox = crate::lock(&self.0.inbox);
            self.0.open.store(false, Relaxed);
            std::mem::take(&mut inbox.messages)
        };
        for message in messages {
            if let Message::Enter(session) = message {
                self.0.runtime.spawn(session.resumed(None));
            }
        }
        self.0.count.store(0, Relaxed);
    }
}

/// Why a step stopped forwarding.
struct Stop;

/// Forwards what both sockets have, each direction up to [`ROUNDS`] reads.
fn drive(entry: &mut Entry, buf: &mut [u8]) -> Driven {
    let mut rounds = 0;
    loop {
        let mut progressed = false;
        match to_server(entry, buf) {
            Ok(p) => progressed |= p,
            Err(Stop) => return Driven::GiveBack,
        }
        match to_client(entry, buf) {
            Ok(p) => progressed |= p,
            Err(Stop) => return Driven::GiveBack,
        }
        if !progressed {
            return Driven::Idle;
        }
        rounds += 1;
        if rounds == ROUNDS {
            return Driven::More;
        }
    }
}

/// Client to server: what waits for the server first, then one read. Ok(true) when bytes
/// moved; Err when the session goes back (its carry says why).
fn to_server(entry: &mut Entry, buf: &mut [u8]) -> Result<bool, Stop> {
    let mut moved = false;
    if !entry.carry.to_server.bytes.is_empty() {
        match deliver(
            entry.session.lane_server(),
            &mut entry.carry.to_server.bytes,
        ) {
            Ok(true) => moved = true,
            Ok(false) => return Ok(false),
            Err(()) => return end(entry, SessionEnd::ServerGone),
        }
    }
    if !entry.client_ready {
        return Ok(moved);
    }
    let n = match read(entry.session.lane_client(), buf) {
        Ok(Some(0)) | Err(()) => return end(entry, SessionEnd::ClientGone),
        Ok(Some(n)) => n,
        Ok(None) => {
            entry.client_ready = false;
            return Ok(moved);
        }
    };
    if n < buf.len() && !entry.client_hup {
        // Edge-triggered: a short read drained the socket; bytes arriving later report.
        entry.client_ready = false;
    }
    client_bytes(entry, &buf[..n])?;
    Ok(true)
}

/// Client bytes read (or sent behind the startup packet): walked, then written to the
/// server as far as it takes them.
fn client_bytes(entry: &mut Entry, data: &[u8]) -> Result<(), Stop> {
    let Carry {
        state,
        client_walker,
        verdict,
        to_server,
        ..
    } = &mut entry.carry;
    let custom = entry.track_custom.then(|| entry.session.lane_custom());
    let inspected = inspect_client(
        client_walker,
        state,
        entry.max_client_message,
        verdict,
        custom,
        data,
    );
    state
        .client_partial
        .store(!client_walker.at_boundary(), Relaxed);
    let (forward, stop) = match inspected {
        Ok(v) => v,
        Err(e) => return end(entry, SessionEnd::ClientProtocol(e)),
    };
    if write_or_keep(
        entry.session.lane_server(),
        &data[..forward],
        &mut to_server.bytes,
    )
    .is_err()
    {
        return end(entry, SessionEnd::ServerGone);
    }
    if stop {
        // Terminate or an oversized message: the pump delivers what waits, then ends the
        // session (after the replies still owed, for a Terminate behind queries).
        entry.carry.client_done = true;
        return Err(Stop);
    }
    Ok(())
}

/// Server to client: what waits for the client first, then one read.
fn to_client(entry: &mut Entry, buf: &mut [u8]) -> Result<bool, Stop> {
    let mut moved = false;
    if !entry.carry.to_client.bytes.is_empty() {
        match deliver(
            entry.session.lane_client(),
            &mut entry.carry.to_client.bytes,
        ) {
            Ok(true) => moved = true,
            Ok(false) => return Ok(false),
            Err(()) => return end(entry, SessionEnd::ClientGone),
        }
    }
    if !entry.server_ready {
        return Ok(moved);
    }
    let n = match read(entry.session.lane_server(), buf) {
        Ok(Some(0)) | Err(()) => return end(entry, SessionEnd::ServerGone),
        Ok(Some(n)) => n,
        Ok(None) => {
            entry.server_ready = false;
            return Ok(moved);
        }
    };
    if n < buf.len() && !entry.server_hup {
        entry.server_ready = false;
    }
    let data = &buf[..n];
    let Carry {
        state,
        server_walker,
        to_client,
        ..
    } = &mut entry.carry;
    let inspected = inspect_server(server_walker, state, hot(), data);
    state
        .server_partial
        .store(!server_walker.at_boundary(), Relaxed);
    if inspected.is_err() {
        return end(entry, SessionEnd::ServerGone);
    }
    if write_or_keep(entry.session.lane_client(), data, &mut to_client.bytes).is_err() {
        return end(entry, SessionEnd::ClientGone);
    }
    Ok(true)
}

/// The session ended as `how`: back to the runtime, which finishes it.
fn end<T>(entry: &mut Entry, how: SessionEnd) -> Result<T, Stop> {
    entry.carry.early_end = Some(how);
    Err(Stop)
}

/// One read. Ok(None): nothing to read now.
fn read(mut socket: &TcpStream, buf: &mut [u8]) -> Result<Option<usize>, ()> {
    loop {
        match socket.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(()),
        }
    }
}

/// Writes `data`; what the socket does not take waits in `rest` (empty before the call).
fn write_or_keep(mut socket: &TcpStream, data: &[u8], rest: &mut Vec<u8>) -> Result<(), ()> {
    let mut written = 0;
    while written < data.len() {
        match socket.write(&data[written..]) {
            Ok(0) => return Err(()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
    rest.extend_from_slice(&data[written..]);
    Ok(())
}

/// Writes what waits in `out`. Ok(true): all of it went (its allocation too).
fn deliver(mut socket: &TcpStream, out: &mut Vec<u8>) -> Result<bool, ()> {
    let mut written = 0;
    let result = loop {
        if written == out.len() {
            break Ok(true);
        }
        match socket.write(&out[written..]) {
            Ok(0) => break Err(()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break Err(()),
        }
    };
    out.drain(..written);
    if out.is_empty() {
        *out = Vec::new();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_or_keep_keeps_what_a_full_socket_refuses() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let writer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (reader, _) = listener.accept().unwrap();
        writer.set_nonblocking(true).unwrap();
        let data = vec![7u8; 32 * 1024 * 1024];
        let mut rest = Vec::new();
        write_or_keep(&writer, &data, &mut rest).unwrap();
        assert!(!rest.is_empty(), "a socket nobody reads took 32 MiB");
        assert!(rest.len() < data.len());
        // Nothing more goes while the reader does not read; all of it once it does.
        assert!(!deliver(&writer, &mut rest).unwrap());
        let taken = data.len() - rest.len();
        let drain = std::thread::spawn(move || {
            let mut reader = reader;
            let mut total = 0;
            let mut chunk = vec![0u8; 64 * 1024];
            while total < data.len() {
                let n = reader.read(&mut chunk).unwrap();
                assert!(chunk[..n].iter().all(|&b| b == 7));
                total += n;
            }
            total
        });
        let mut spins = 0;
        while !deliver(&writer, &mut rest).unwrap() {
            spins += 1;
            assert!(spins < 1_000_000, "the writes never completed");
            std::thread::sleep(Duration::from_micros(100));
        }
        assert_eq!(
            rest.capacity(),
            0,
            "a delivered backlog keeps its allocation"
        );
        assert_eq!(drain.join().unwrap(), 32 * 1024 * 1024);
        assert!(taken > 0);
    }
}
