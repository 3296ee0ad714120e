//! The weights broadcast group: a learner's rank 0 (the [`Root`]) and the
//! actors that joined it ([`Member`]s) form a communicator of their own, and
//! each new policy version reaches all of them with one `broadcast_from_root`:
//! over the TCP collective when the root's tensors are on the CPU, over NCCL
//! when they are on CUDA (the members' staging tensors must then be on CUDA too).
//!
//! Membership changes while a job runs: actors join, leave and restart.
//! The root accepts joiners in the background and authenticates them with the
//! same HMAC hello as the learner ranks' rendezvous, over the group
//! `<job>/weights` (so a learner rank's hello cannot join it, nor a member's a
//! rank's). When anyone joined since the last version, or the last version
//! failed, the next version starts a new *generation* of the group: rank 0 is
//! the root, ranks 1.. the members in join order. Every version begins with a
//! [`Header`] the root writes on each member's stream (generation, world, rank,
//! version, incarnation, layout, bytes, transport); a member that reads a new
//! generation builds its communicator first (for NCCL it takes part in the
//! unique-id exchange over its stream), then every member receives the payload.
//!
//! Once authenticated, a joiner is told where it comes in: the root's
//! incarnation and the last version it broadcast before the joiner was
//! admitted (a *welcome*), with the root's own proof of the token over a nonce
//! the joiner sent (a member never takes weights from a root that cannot
//! prove it). The joiner receives every later version for as long
//! as its connection lasts, so an actor waits for the broadcast only for a
//! version it will get, and downloads any other at once.
//!
//! Any failure during a version (a member gone, a stalled reader past the
//! write timeout) ends the generation: the root closes every stream and the
//! members reconnect and join the next one. Nobody is told what they missed: a
//! member just holds an older version, and the actor falls back to fetching
//! the newest over gRPC when the broadcast has not brought what it needs.
//!
//! The layout (names, shapes, dtype of every tensor) is fingerprinted: a
//! joiner sends its own, and the root refuses (a header saying so, no payload)
//! a member whose layout is not the version's before any communicator
//! includes it; the header carries the root's too, checked again by the member.
//! A refused member leaves the group for good ([`Member::failed`] says why).
//!
//! Wire per member stream: the root's nonce, the member's hello, nonce and
//! layout fingerprint, the
//! welcome (magic, incarnation, last version broadcast or `u64::MAX` for none,
//! the root's MAC over the member's nonce); per version a `Header`, then (new generation,
//! NCCL only) the unique-id frame of the TCP collective, then the payload
//! (TCP: one broadcast frame of the flattened tensors; NCCL: on the device).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::{Device, Tensor};

use crate::nccl::NcclCollective;
use crate::{comm_err, Collective, GroupAuth, Result, TcpCollective, MAC, NONCE};

const HEADER_MAGIC: &[u8; 8] = b"SLUICEW1";
const WELCOME_MAGIC: &[u8; 8] = b"SLUICEW0";
const WELCOME_BYTES: usize = 8 + 2 * 8 + MAC;
/// Joiners whose hello may be pending at once; more connections are dropped
/// (each pending hello holds a thread for at most `HELLO_TIMEOUT`).
const MAX_PENDING_HELLOS: usize = 64;
const HEADER_BYTES: usize = 8 + 6 * 8 + 3 * 4;
/// How long the root waits on one member's socket before it gives up on the
/// generation (a member that stopped reading cannot stall the learner longer).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a member waits in the middle of a version for the rest of it.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a joiner has to answer the challenge.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How the payload travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp = 0,
    Nccl = 1,
    /// No payload: the root refuses this member (its layout is not the root's).
    Refused = 2,
}

/// What the root writes on a member's stream before each version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub generation: u64,
    pub version: u64,
    pub incarnation: u64,
    /// FNV-1a of every tensor's name, shape and dtype ([`layout`]).
    pub layout: u64,
    pub bytes: u64,
    pub world: u32,
    pub rank: u32,
    pub transport: Transport,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[..8].copy_from_slice(HEADER_MAGIC);
        let words = [self.generation, self.version, self.incarnation, self.layout, self.bytes];
        for (i, w) in words.iter().enumerate() {
            out[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        // One u64 slot kept for later use (zero).
        let small = [self.world, self.rank, self.transport as u32];
        for (i, w) in small.iter().enumerate() {
            out[56 + 4 * i..60 + 4 * i].copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    fn decode(b: &[u8; HEADER_BYTES]) -> Result<Header> {
        if &b[..8] != HEADER_MAGIC {
            return Err(comm_err("weights broadcast: not a version header (protocol mismatch)"));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[56 + 4 * i..60 + 4 * i].try_into().expect("4 bytes"));
        let transport = match u32_at(2) {
            0 => Transport::Tcp,
            1 => Transport::Nccl,
            2 => Transport::Refused,
            t => return Err(comm_err(format!("weights broadcast: unknown transport {t}"))),
        };
        let (world, rank) = (u32_at(0), u32_at(1));
        if transport != Transport::Refused && (rank == 0 || rank >= world) {
            return Err(comm_err(format!("weights broadcast: rank {rank} in a group of {world}")));
        }
        Ok(Header {
            generation: u64_at(0),
            version: u64_at(1),
            incarnation: u64_at(2),
            layout: u64_at(3),
            bytes: u64_at(4),
            world,
            rank,
            transport,
        })
    }
}

/// The layout fingerprint: FNV-1a over each tensor's name, dimensions and dtype, in order.
pub fn layout(tensors: &[(String, Tensor)]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (name, t) in tensors {
        eat(name.as_bytes());
        eat(&[0]);
        for d in t.size() {
            eat(&d.to_le_bytes());
        }
        eat(format!("{:?}", t.kind()).as_bytes());
        eat(&[0xff]);
    }
    h
}

fn payload_bytes(tensors: &[(String, Tensor)]) -> u64 {
    tensors.iter().map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum()
}

fn weights_auth(auth: &GroupAuth) -> GroupAuth {
    GroupAuth { key: auth.key.clone(), group: format!("{}/weights", auth.group) }
}

/// What one [`Root::broadcast`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sent {
    /// Members that received the version (0: nobody had joined).
    pub members: usize,
    pub generation: u64,
    /// Payload bytes per member.
    pub bytes: u64,
    pub seconds: f64,
}

/// What a joiner says of its staging tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Joiner {
    /// Their [`layout`] fingerprint.
    layout: u64,
    /// On CUDA: it can take an NCCL payload.
    on_cuda: bool,
}

/// Joiners admitted since the last version, and that version (under one lock:
/// a joiner's welcome names exactly the last version it will not get).
#[derive(Default)]
struct Pending {
    /// Each joiner's stream and the layout its staging tensors have.
    streams: Vec<(TcpStream, Joiner)>,
    last: Option<u64>,
}

/// The learner's side: accepts members and broadcasts each version to them.
pub struct Root {
    local: SocketAddr,
    incarnation: u64,
    pending: Arc<Mutex<Pending>>,
    /// The members' streams and layouts, in rank order.
    members: Vec<(TcpStream, Joiner)>,
    comm: Option<Box<dyn Collective>>,
    generation: u64,
    stop: Arc<AtomicBool>,
}

impl Root {
    /// Listens on `addr` (port 0 picks one: [`Root::local_addr`]) and accepts
    /// members proving `auth` (the job's token and id) in the background;
    /// `incarnation` is the learner process's (its versions are comparable).
    pub fn bind(addr: &str, auth: &GroupAuth, incarnation: u64) -> Result<Root> {
        let listener = TcpListener::bind(addr).map_err(|e| comm_err(format!("weights broadcast cannot listen on {addr}: {e}")))?;
        let local = listener.local_addr().map_err(comm_err)?;
        listener.set_nonblocking(true).map_err(comm_err)?;
        let pending = Arc::new(Mutex::new(Pending::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s, auth) = (pending.clone(), stop.clone(), weights_auth(auth));
        std::thread::Builder::new()
            .name("weights-accept".into())
            .spawn(move || accept_loop(listener, auth, incarnation, p, s))
            .map_err(comm_err)?;
        tracing::info!(%local, "weights broadcast group listening");
        Ok(Root { local, incarnation, pending, members: Vec::new(), comm: None, generation: 0, stop })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Members of the current generation.
    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// Sends `tensors` (all of one dtype, all on the CPU or all on one CUDA
    /// device) as `version` to every member, forming a new generation first
    /// when anyone joined or the last version failed. On error the generation
    /// is over (every member reconnects); the caller goes on training.
    pub fn broadcast(&mut self, version: u64, tensors: &[(String, Tensor)]) -> Result<Sent> {
        let t0 = Instant::now();
        let joined = {
            let mut p = self.pending.lock().expect("pending lock");
            p.last = Some(version);
            std::mem::take(&mut p.streams)
        };
        if !joined.is_empty() {
            self.members.extend(joined);
            self.comm = None;
        }
        // A member that could not hold this version is refused before any
        // communicator includes it (an NCCL rank that left would hang the rest).
        let layout = layout(tensors);
        let transport = match tensors.first().map(|(_, t)| t.device()) {
            Some(Device::Cuda(_)) => Transport::Nccl,
            _ => Transport::Tcp,
        };
        let fits = |j: &Joiner| j.layout == layout && (j.on_cuda || transport != Transport::Nccl);
        if self.members.iter().any(|m| !fits(&m.1)) {
            let (fit, misfits): (Vec<_>, Vec<_>) = std::mem::take(&mut self.members).into_iter().partition(|m| fits(&m.1));
            for (mut s, _) in misfits {
                let refusal = Header { generation: 0, version, incarnation: self.incarnation, layout, bytes: 0, world: 0, rank: 0, transport: Transport::Refused };
                let _ = s.write_all(&refusal.encode());
                tracing::warn!("refused a weights broadcast member: its parameters (names, shapes, dtype) are not this learner's, or NCCL needs them on CUDA");
            }
            self.members = fit;
            self.comm = None;
        }
        let bytes = payload_bytes(tensors);
        if self.members.is_empty() {
            return Ok(Sent { members: 0, generation: self.generation, bytes, seconds: 0.0 });
        }
        if self.comm.is_none() {
            self.generation += 1;
        }
        let result = self.send(Header { generation: self.generation, version, incarnation: self.incarnation, layout, bytes, world: 0, rank: 0, transport }, tensors);
        if let Err(e) = result {
            tracing::warn!(error = %e, generation = self.generation, members = self.members.len(), "weights broadcast failed; the members rejoin");
            self.comm = None;
            for (s, _) in self.members.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            return Err(e);
        }
        Ok(Sent { members: self.members.len(), generation: self.generation, bytes, seconds: t0.elapsed().as_secs_f64() })
    }

    /// Writes `header` (with each member's rank and the world) on every
    /// member's stream, forms the communicator if this is a new generation,
    /// and broadcasts the payload.
    fn send(&mut self, header: Header, tensors: &[(String, Tensor)]) -> Result<()> {
        let world = self.members.len() + 1;
        for (i, (s, _)) in self.members.iter_mut().enumerate() {
            let h = Header { world: world as u32, rank: i as u32 + 1, ..header };
            s.write_all(&h.encode()).map_err(|e| comm_err(format!("weights header to member {}: {e}", i + 1)))?;
        }
        if self.comm.is_none() {
            let streams = self.members.iter().map(|m| m.0.try_clone()).collect::<std::io::Result<Vec<_>>>().map_err(comm_err)?;
            let tcp = TcpCollective::from_streams(0, world, streams);
            self.comm = Some(match tensors.first().map(|(_, t)| t.device()) {
                Some(Device::Cuda(d)) => Box::new(NcclCollective::new(tcp, d)?),
                _ => Box::new(tcp),
            });
            tracing::info!(generation = header.generation, members = world - 1, transport = ?header.transport, "weights broadcast group formed");
        }
        let mut ts: Vec<Tensor> = tensors.iter().map(|(_, t)| t.shallow_clone()).collect();
        self.comm.as_mut().expect("formed above").broadcast_from_root(&mut ts)
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn accept_loop(listener: TcpListener, auth: GroupAuth, incarnation: u64, pending: Arc<Mutex<Pending>>, stop: Arc<AtomicBool>) {
    let hellos = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((s, from)) => {
                if hellos.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING_HELLOS {
                    hellos.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!(%from, "too many weights broadcast hellos pending; connection dropped");
                    continue;
                }
                let (auth, pending, count) = (auth.clone(), pending.clone(), hellos.clone());
                // One thread per joiner: a slow or silent one holds up nobody.
                let spawned = std::thread::Builder::new().name("weights-hello".into()).spawn(move || {
                    match challenge(s, &auth) {
                        Ok((mut s, theirs, joiner)) => {
                            let mut p = pending.lock().expect("pending lock");
                            let mut w = WELCOME_MAGIC.to_vec();
                            w.extend(incarnation.to_le_bytes());
                            w.extend(p.last.unwrap_or(u64::MAX).to_le_bytes());
                            w.extend(auth.root_proof(&theirs));
                            // Written under the lock: no header can come before it.
                            match s.write_all(&w) {
                                Ok(()) => {
                                    tracing::info!(%from, after = ?p.last, "a member joined the weights broadcast group");
                                    p.streams.push((s, joiner));
                                }
                                Err(e) => tracing::warn!(%from, error = %e, "a joiner left before its welcome"),
                            }
                        }
                        Err(e) => tracing::warn!(%from, error = %e, "dropping a weights broadcast connection"),
                    }
                    count.fetch_sub(1, Ordering::SeqCst);
                });
                if spawned.is_err() {
                    hellos.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                tracing::warn!(error = %e, "weights broadcast accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The root's half of the hello: a nonce out, a member's proof and its own
/// nonce back (which the welcome answers with the root's proof).
fn challenge(mut s: TcpStream, auth: &GroupAuth) -> Result<(TcpStream, [u8; NONCE], Joiner)> {
    s.set_nonblocking(false).map_err(comm_err)?;
    s.set_read_timeout(Some(HELLO_TIMEOUT)).map_err(comm_err)?;
    let nonce: [u8; NONCE] = rand::random();
    let mut hello = [0u8; 16 + MAC];
    let mut theirs = [0u8; NONCE];
    let mut layout = [0u8; 9];
    s.write_all(&nonce)
        .and_then(|()| s.read_exact(&mut hello))
        .and_then(|()| s.read_exact(&mut theirs))
        .and_then(|()| s.read_exact(&mut layout))
        .map_err(comm_err)?;
    match auth.verify(&hello, &nonce) {
        Some((0, 0)) => {}
        _ => return Err(comm_err("the hello did not prove the job token")),
    }
    s.set_read_timeout(None).map_err(comm_err)?;
    s.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(comm_err)?;
    s.set_nodelay(true).map_err(comm_err)?;
    Ok((s, theirs, Joiner { layout: u64::from_le_bytes(layout[..8].try_into().expect("8 bytes")), on_cuda: layout[8] == 1 }))
}

/// What a member holds.
pub struct Staged {
    /// The staging tensors, in the root's order; what they hold is `version`.
    pub tensors: Vec<(String, Tensor)>,
    /// `(version, incarnation)` of the complete version in `tensors`; `None`
    /// before the first and while one is being received.
    pub version: Option<(u64, u64)>,
    /// Versions received in this process.
    pub received: u64,
    /// In the group: `(incarnation, last version it will not get)` from the
    /// root's welcome; every later version of that incarnation reaches it
    /// while it stays connected. `None` while out of the group.
    pub member_of: Option<(u64, Option<u64>)>,
    /// Connected to the root and waiting for its welcome (a pull waits: the
    /// root may already count this member in the version it just sent).
    pub connecting: bool,
    /// The member left for good, and why (e.g. its layout is not the root's).
    pub failed: Option<String>,
}

struct Slot {
    state: Mutex<Staged>,
    changed: Condvar,
}

/// An actor's side: a background thread that joins the root at `addr`
/// (reconnecting with backoff) and receives every version into the staging
/// tensors; [`Member::with_version`] reads them.
pub struct Member {
    addr: String,
    slot: Arc<Slot>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Member {
    /// Joins the group at `addr` with `staging`: tensors of the root's names,
    /// shapes and dtype, on the CPU (TCP payloads) or on CUDA (either).
    pub fn join(addr: &str, auth: &GroupAuth, staging: Vec<(String, Tensor)>) -> Result<Member> {
        let slot = Arc::new(Slot {
            state: Mutex::new(Staged { tensors: staging, version: None, received: 0, member_of: None, connecting: false, failed: None }),
            changed: Condvar::new(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (a, au, sl, st) = (addr.to_string(), weights_auth(auth), slot.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("weights-member".into())
            .spawn(move || member_loop(&a, &au, &sl, &st))
            .map_err(comm_err)?;
        Ok(Member { addr: addr.to_string(), slot, stop, thread: Some(thread) })
    }

    /// The root's address this member joins.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// A snapshot: in the group, versions received, the staged version, why it left.
    pub fn status(&self) -> (bool, u64, Option<(u64, u64)>, Option<String>) {
        let s = self.slot.state.lock().expect("staging lock");
        (s.member_of.is_some(), s.received, s.version, s.failed.clone())
    }

    /// Why the member left for good, if it did.
    pub fn failed(&self) -> Option<String> {
        self.slot.state.lock().expect("staging lock").failed.clone()
    }

    /// Runs `f` on the staged tensors once they hold a complete version of
    /// `incarnation` no older than `at_least`. Waits for it (at most `wait`,
    /// longer only while a version is being received, which holds the lock)
    /// only while the member is in the group and that version will reach it;
    /// `None` when it did not come.
    pub fn with_version<R>(&self, at_least: u64, incarnation: u64, wait: Duration, f: impl FnOnce(u64, u64, &[(String, Tensor)]) -> R) -> Option<R> {
        let deadline = Instant::now() + wait;
        let mut s = self.slot.state.lock().expect("staging lock");
        loop {
            if let Some((v, inc)) = s.version.filter(|&(v, inc)| inc == incarnation && v >= at_least) {
                return Some(f(v, inc, &s.tensors));
            }
            let coming = s.connecting
                || matches!(s.member_of, Some((inc, last)) if inc == incarnation && last.is_none_or(|l| at_least > l));
            let now = Instant::now();
            if !coming || now >= deadline {
                return None;
            }
            s = self.slot.changed.wait_timeout(s, deadline - now).expect("staging lock").0;
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum End {
    /// Stop was asked for.
    Stopped,
    /// Leave for good.
    Leave(String),
    /// Reconnect.
    Retry(crate::Error),
}

impl From<crate::Error> for End {
    fn from(e: crate::Error) -> Self {
        End::Retry(e)
    }
}

/// First wait before reconnecting; it doubles (up to 2 s) while attempts fail
/// and starts over once a version came through: a member rejoins a re-formed
/// group in time for the next version or the one after.
const REJOIN_FIRST: Duration = Duration::from_millis(20);

fn member_loop(addr: &str, auth: &GroupAuth, slot: &Slot, stop: &AtomicBool) {
    let mut backoff = REJOIN_FIRST;
    let mut received = 0;
    while !stop.load(Ordering::SeqCst) {
        let end = session(addr, auth, slot, stop);
        let mut s = slot.state.lock().expect("staging lock");
        s.member_of = None;
        s.connecting = false;
        if s.received > received {
            received = s.received;
            backoff = REJOIN_FIRST;
        }
        slot.changed.notify_all();
        match end {
            End::Stopped => break,
            End::Leave(why) => {
                tracing::warn!(%addr, reason = %why, "left the weights broadcast group; weights come over gRPC");
                s.failed = Some(why);
                break;
            }
            End::Retry(e) => {
                drop(s);
                tracing::debug!(%addr, error = %e, "weights broadcast connection ended; rejoining");
                let until = Instant::now() + backoff;
                while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn lock(slot: &Slot) -> MutexGuard<'_, Staged> {
    slot.state.lock().expect("staging lock")
}

/// One connection to the root: hello, then versions until it ends.
fn session(addr: &str, auth: &GroupAuth, slot: &Slot, stop: &AtomicBool) -> End {
    let target = match addr.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        Ok(None) => return End::Leave(format!("{addr} resolves to nothing")),
        Err(e) => return End::Retry(comm_err(format!("resolve {addr}: {e}"))),
    };
    let mut s = match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => return End::Retry(comm_err(format!("connect {addr}: {e}"))),
    };
    lock(slot).connecting = true;
    let mine: [u8; NONCE] = rand::random();
    let hello = (|| -> std::io::Result<()> {
        s.set_read_timeout(Some(HELLO_TIMEOUT))?;
        let mut nonce = [0u8; NONCE];
        s.read_exact(&mut nonce)?;
        let mut out = auth.hello(0, 0, &nonce);
        out.extend(mine);
        let (fingerprint, on_cuda) = {
            let st = lock(slot);
            (layout(&st.tensors), st.tensors.first().is_some_and(|(_, t)| t.device().is_cuda()))
        };
        out.extend(fingerprint.to_le_bytes());
        out.push(u8::from(on_cuda));
        s.write_all(&out)?;
        s.set_nodelay(true)
    })();
    if let Err(e) = hello {
        return End::Retry(comm_err(format!("hello to {addr}: {e}")));
    }
    // The welcome: the root admitted us (a refused hello is a closed connection).
    let mut w = [0u8; WELCOME_BYTES];
    if let Err(e) = s.read_exact(&mut w) {
        return End::Retry(comm_err(format!("no welcome from {addr} (is the job token right?): {e}")));
    }
    if &w[..8] != WELCOME_MAGIC {
        return End::Leave(format!("{addr} is not a weights broadcast group (protocol mismatch)"));
    }
    if !auth.check_root_proof(&mine, &w[24..]) {
        return End::Leave(format!("{addr} did not prove the job token; no weights are taken from it"));
    }
    let incarnation = u64::from_le_bytes(w[8..16].try_into().expect("8 bytes"));
    let last = u64::from_le_bytes(w[16..24].try_into().expect("8 bytes"));
    {
        let mut st = lock(slot);
        st.member_of = Some((incarnation, (last != u64::MAX).then_some(last)));
        st.connecting = false;
        slot.changed.notify_all();
    }
    match receive(&mut s, slot, stop) {
        Ok(never) => match never {},
        Err(end) => end,
    }
}

fn receive(s: &mut TcpStream, slot: &Slot, stop: &AtomicBool) -> Result<std::convert::Infallible, End> {
    let mut comm: Option<(u64, Box<dyn Collective>)> = None;
    let (mine, device) = {
        let st = lock(slot);
        (layout(&st.tensors), st.tensors.first().map_or(Device::Cpu, |(_, t)| t.device()))
    };
    loop {
        // Idle between versions: look for the next header, a stop, or the end.
        s.set_read_timeout(Some(Duration::from_millis(200))).map_err(comm_err)?;
        loop {
            if stop.load(Ordering::SeqCst) {
                return Err(End::Stopped);
            }
            match s.peek(&mut [0u8; 1]) {
                Ok(0) => return Err(End::Retry(comm_err("the root closed the connection"))),
                Ok(_) => break,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
                Err(e) => return Err(End::Retry(comm_err(e))),
            }
        }
        s.set_read_timeout(Some(READ_TIMEOUT)).map_err(comm_err)?;
        let mut b = [0u8; HEADER_BYTES];
        s.read_exact(&mut b).map_err(|e| comm_err(format!("version header: {e}")))?;
        let h = Header::decode(&b)?;
        if h.transport == Transport::Refused {
            return Err(End::Leave(
                "the root refused this member: its parameters (names, shapes or dtype) are not the learner's, or the root sends over NCCL and they are not on CUDA".into(),
            ));
        }
        if comm.as_ref().is_none_or(|(g, _)| *g != h.generation) {
            // An NCCL communicator is destroyed before the next is made.
            drop(comm.take());
            let tcp = TcpCollective::from_streams(h.rank as usize, h.world as usize, vec![s.try_clone().map_err(comm_err)?]);
            let c: Box<dyn Collective> = match (h.transport, device) {
                (Transport::Tcp, _) => Box::new(tcp),
                (Transport::Nccl, Device::Cuda(d)) => Box::new(NcclCollective::new(tcp, d)?),
                (Transport::Nccl, other) => {
                    return Err(End::Leave(format!("the root broadcasts over NCCL and this member's weights are on {other:?}")))
                }
                (Transport::Refused, _) => unreachable!("refusals end the session above"),
            };
            comm = Some((h.generation, c));
            tracing::info!(generation = h.generation, rank = h.rank, world = h.world, "joined a weights broadcast generation");
        }
        if h.layout != mine {
            return Err(End::Leave(format!(
                "version {} has another layout (names, shapes or dtype) than this member's policy",
                h.version
            )));
        }
        let mut st = lock(slot);
        st.version = None;
        let mut ts: Vec<Tensor> = st.tensors.iter().map(|(_, t)| t.shallow_clone()).collect();
        comm.as_mut().expect("formed above").1.broadcast_from_root(&mut ts)?;
        st.version = Some((h.version, h.incarnation));
        st.received += 1;
        slot.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> GroupAuth {
        GroupAuth::new(Some("job-token"), "job-1")
    }

    fn params(seed: f32) -> Vec<(String, Tensor)> {
        vec![
            ("a.weight".to_string(), Tensor::from_slice(&[seed, seed + 1.0, seed + 2.0, seed + 3.0]).view([2, 2])),
            ("b.bias".to_string(), Tensor::from_slice(&[seed * 10.0])),
        ]
    }

    fn zeros() -> Vec<(String, Tensor)> {
        params(0.0).into_iter().map(|(n, t)| (n, t.zeros_like())).collect()
    }

    fn values(ts: &[(String, Tensor)]) -> Vec<f32> {
        ts.iter().flat_map(|(_, t)| Vec::<f32>::try_from(&t.reshape([-1])).unwrap()).collect()
    }

    /// Broadcasts `version` until `n` members got it (joiners appear in the next version).
    fn until_members(root: &mut Root, n: usize, mut version: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            version += 1;
            // A version fails when a member left during it; the rest rejoin.
            let sent = root.broadcast(version, &params(version as f32)).map_or(0, |s| s.members);
            if sent == n {
                return version;
            }
            assert!(Instant::now() < deadline, "{n} members never joined ({sent} did)");
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// The member's values once it holds version `v` or newer (polled: a
    /// member that just rejoined waits only for versions after its welcome).
    fn got(m: &Member, v: u64) -> Option<Vec<f32>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = m.with_version(v, 7, Duration::from_millis(200), |_, _, ts| values(ts));
            if r.is_some() || Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn members_join_leave_and_rejoin_and_always_hold_the_roots_exact_values() {
        let mut root = Root::bind("127.0.0.1:0", &auth(), 7).unwrap();
        let addr = root.local_addr().to_string();
        assert_eq!(root.broadcast(1, &params(1.0)).unwrap().members, 0);
        let a = Member::join(&addr, &auth(), zeros()).unwrap();
        let b = Member::join(&addr, &auth(), zeros()).unwrap();
        let v = until_members(&mut root, 2, 1);
        assert_eq!(root.broadcast(v + 1, &params(42.5)).unwrap().members, 2);
        for m in [&a, &b] {
            assert_eq!(got(m, v + 1).unwrap(), vec![42.5, 43.5, 44.5, 45.5, 425.0]);
        }
        let generation = root.broadcast(v + 2, &params(0.25)).unwrap().generation;
        // One member leaves: the next version fails or reaches only the other;
        // either way the survivor is back in a later generation.
        drop(b);
        let mut v = v + 2;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            v += 1;
            if let Ok(s) = root.broadcast(v, &params(v as f32)) {
                if s.members == 1 && s.generation > generation {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "the group never re-formed without the member that left");
            std::thread::sleep(Duration::from_millis(30));
        }
        assert_eq!(got(&a, v).unwrap(), values(&params(v as f32)));
        // A new member (an actor restarted) joins the running group.
        let c = Member::join(&addr, &auth(), zeros()).unwrap();
        let v = until_members(&mut root, 2, v);
        for m in [&a, &c] {
            assert_eq!(got(m, v).unwrap(), values(&params(v as f32)));
            assert!(m.failed().is_none());
        }
        // A version the members never got is not waited for past `wait` once out of the group.
        drop(root);
        let t0 = Instant::now();
        assert!(c.with_version(v + 1, 7, Duration::from_millis(300), |_, _, _| ()).is_none());
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_wrong_token_never_joins_and_a_wrong_layout_leaves_for_good() {
        let mut root = Root::bind("127.0.0.1:0", &auth(), 7).unwrap();
        let addr = root.local_addr().to_string();
        let intruder = Member::join(&addr, &GroupAuth::new(Some("guess"), "job-1"), zeros()).unwrap();
        let other_job = Member::join(&addr, &GroupAuth::new(Some("job-token"), "job-2"), zeros()).unwrap();
        let shape: Vec<(String, Tensor)> = vec![("a.weight".into(), Tensor::zeros([4], (tch::Kind::Float, Device::Cpu))), ("b.bias".into(), Tensor::zeros([1], (tch::Kind::Float, Device::Cpu)))];
        let misfit = Member::join(&addr, &auth(), shape).unwrap();
        let good = Member::join(&addr, &auth(), zeros()).unwrap();
        // The misfit joins, refuses its first version and leaves; the good member stays.
        let mut v = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while misfit.failed().is_none() {
            v += 1;
            let _ = root.broadcast(v, &params(v as f32));
            assert!(Instant::now() < deadline, "misfit: {:?}, good: {:?}", misfit.status(), good.status());
            std::thread::sleep(Duration::from_millis(30));
        }
        assert!(misfit.failed().unwrap().contains("refused"), "{:?}", misfit.failed());
        let v = until_members(&mut root, 1, v);
        assert_eq!(got(&good, v).unwrap(), values(&params(v as f32)));
        for m in [&intruder, &other_job] {
            let (joined, received, version, _) = m.status();
            assert!(!joined && received == 0 && version.is_none(), "an unauthenticated member got weights");
        }
    }

    /// NCCL between two ranks needs two GPUs (NCCL refuses two ranks on one device).
    #[test]
    fn nccl_weights_broadcast_reaches_a_member_on_another_gpu() {
        if tch::Cuda::device_count() < 2 {
            // To stderr, which the test harness does not capture: a skip is always seen.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED nccl_weights_broadcast_reaches_a_member_on_another_gpu: {} CUDA device(s), needs 2", tch::Cuda::device_count());
            return;
        }
        let on = |d: usize, ts: Vec<(String, Tensor)>| -> Vec<(String, Tensor)> {
            ts.into_iter().map(|(n, t)| (n, t.to_kind(tch::Kind::BFloat16).to_device(Device::Cuda(d)))).collect()
        };
        let mut root = Root::bind("127.0.0.1:0", &auth(), 7).unwrap();
        let m = Member::join(&root.local_addr().to_string(), &auth(), on(1, zeros())).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut v = 0;
        loop {
            v += 1;
            let sent = root.broadcast(v, &on(0, params(v as f32))).map_or(0, |s| s.members);
            if sent == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "the member never joined: {:?}", m.status());
            std::thread::sleep(Duration::from_millis(50));
        }
        let want = values(&on(0, params(v as f32)).into_iter().map(|(n, t)| (n, t.to_kind(tch::Kind::Float))).collect::<Vec<_>>());
        let held = m.with_version(v, 7, Duration::from_secs(30), |_, _, ts| {
            ts.iter().map(|(n, t)| (n.clone(), t.to_kind(tch::Kind::Float).to_device(Device::Cpu))).collect::<Vec<_>>()
        });
        assert_eq!(values(&held.expect("version received")), want);
        eprintln!("nccl weights broadcast: bit-exact bf16 from cuda:0 to cuda:1");
    }

    /// A server at the group's address that answers the hello but cannot prove
    /// the token (it does not hold it) is left for good; nothing is staged.
    #[test]
    fn a_root_that_cannot_prove_the_token_is_left() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let fake = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(&[3u8; NONCE]).unwrap();
            let mut hello = [0u8; 16 + MAC + NONCE + 9];
            s.read_exact(&mut hello).unwrap();
            let mut w = WELCOME_MAGIC.to_vec();
            w.extend(7u64.to_le_bytes());
            w.extend(u64::MAX.to_le_bytes());
            w.extend([0u8; MAC]);
            s.write_all(&w).unwrap();
            let h = Header { generation: 1, version: 1, incarnation: 7, layout: layout(&zeros()), bytes: 20, world: 2, rank: 1, transport: Transport::Tcp };
            let _ = s.write_all(&h.encode());
            std::thread::sleep(Duration::from_millis(500));
        });
        let m = Member::join(&addr, &auth(), zeros()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while m.failed().is_none() {
            assert!(Instant::now() < deadline, "{:?}", m.status());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(m.failed().unwrap().contains("did not prove"), "{:?}", m.failed());
        assert_eq!(m.status().1, 0);
        fake.join().unwrap();
    }

    #[test]
    fn headers_round_trip_and_garbage_is_refused() {
        let h = Header { generation: 3, version: u64::MAX, incarnation: 9, layout: 0xdead, bytes: 1 << 40, world: 5, rank: 4, transport: Transport::Nccl };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        assert!(Header::decode(&[0u8; HEADER_BYTES]).is_err());
        let refusal = Header { world: 0, rank: 0, transport: Transport::Refused, ..h };
        assert_eq!(Header::decode(&refusal.encode()).unwrap(), refusal);
        let bad_rank = Header { rank: 5, ..h };
        assert!(Header::decode(&bad_rank.encode()).is_err());
        assert_ne!(layout(&params(1.0)), layout(&[("a.weight".into(), Tensor::zeros([4], (tch::Kind::Float, Device::Cpu)))]));
        assert_eq!(layout(&params(1.0)), layout(&zeros()));
    }
}
