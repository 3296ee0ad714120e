//! `sluice-collective`: collectives between processes. Data-parallel learners
//! sum their gradients with them, and a learner's rank 0 broadcasts each new
//! policy version to its actors with them ([`weights`]).
//!
//! [`Collective`] is the one interface; backends:
//! * [`Single`] — world size 1, every call is a no-op;
//! * [`TcpCollective`] — CPU collective between processes over TCP (a star
//!   through rank 0, which sums in rank order, so every rank gets bit-identical
//!   results); runs on any machine and is what multi-rank tests use;
//! * [`nccl::NcclCollective`] — NCCL on CUDA tensors (the unique id and CPU
//!   tensors go over a `TcpCollective`).
//!
//! Joining is authenticated: rank 0 sends each connection a fresh nonce, and a
//! rank answers with an HMAC-SHA256, keyed by the job's bearer token, over the
//! group (the job id), the world size, its rank and the nonce ([`GroupAuth`]).
//! A connection that cannot prove it is dropped and rank 0 keeps waiting; only
//! an authenticated rank that disagrees (world size, duplicate rank) is an error.
//! The proof goes both ways: each rank sends a nonce of its own, and rank 0
//! answers it with its HMAC, so a rank never joins a rank 0 without the token.
//!
//! Every call must be made by every rank in the same order with the same
//! tensor shapes; a mismatch is detected (op tag and byte count travel with each
//! frame) and reported as an error instead of summing garbage.

pub mod error;
pub mod nccl;
pub mod weights;

pub use error::{Error, Result};

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};


pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sums every tensor element-wise over all ranks, in place. All tensors of
    /// one call must have the same kind.
    fn all_reduce_sum(&mut self, tensors: &mut [Tensor]) -> Result<()>;
    /// Overwrites every rank's tensors with rank 0's, in place.
    fn broadcast_from_root(&mut self, tensors: &mut [Tensor]) -> Result<()>;
}

/// The collective of a single process.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _: &mut [Tensor]) -> Result<()> {
        Ok(())
    }
    fn broadcast_from_root(&mut self, _: &mut [Tensor]) -> Result<()> {
        Ok(())
    }
}

const MAGIC: &[u8; 8] = b"SLUICE02";
const NONCE: usize = 16;
const MAC: usize = 32;

/// What a rank proves when it joins: that it holds `key` (the job's bearer
/// token; empty when the servers run without one) and belongs to `group`.
#[derive(Debug, Clone, Default)]
pub struct GroupAuth {
    pub key: Vec<u8>,
    pub group: String,
}

impl GroupAuth {
    pub fn new(token: Option<&str>, group: &str) -> Self {
        GroupAuth { key: token.unwrap_or_default().as_bytes().to_vec(), group: group.to_string() }
    }

    fn mac(&self, world: u32, rank: u32, nonce: &[u8]) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(b"sluice collective hello\0");
        m.update(&(self.group.len() as u64).to_le_bytes());
        m.update(self.group.as_bytes());
        m.update(&world.to_le_bytes());
        m.update(&rank.to_le_bytes());
        m.update(nonce);
        m
    }

    /// The hello a rank sends in answer to `nonce`.
    fn hello(&self, world: u32, rank: u32, nonce: &[u8]) -> Vec<u8> {
        use hmac::Mac;
        let mut out = MAGIC.to_vec();
        out.extend(rank.to_le_bytes());
        out.extend(world.to_le_bytes());
        out.extend(self.mac(world, rank, nonce).finalize().into_bytes());
        out
    }

    /// Rank 0's (or a weights root's) answer to a joiner's own nonce: proof
    /// that the side being joined holds the key too. Keyed with a (world,
    /// rank) no joiner's hello uses.
    fn root_proof(&self, nonce: &[u8]) -> [u8; MAC] {
        use hmac::Mac;
        self.mac(u32::MAX, u32::MAX, nonce).finalize().into_bytes().into()
    }

    /// Whether `proof` is [`GroupAuth::root_proof`] of `nonce` (constant time).
    fn check_root_proof(&self, nonce: &[u8], proof: &[u8]) -> bool {
        use hmac::Mac;
        self.mac(u32::MAX, u32::MAX, nonce).verify_slice(proof).is_ok()
    }

    /// The (rank, world) a hello proves, or `None` (constant-time comparison).
    fn verify(&self, hello: &[u8; 16 + MAC], nonce: &[u8]) -> Option<(u32, u32)> {
        use hmac::Mac;
        if &hello[..8] != MAGIC {
            return None;
        }
        let r = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes"));
        let w = u32::from_le_bytes(hello[12..16].try_into().expect("4 bytes"));
        self.mac(w, r, nonce).verify_slice(&hello[16..]).ok().map(|()| (r, w))
    }
}
const OP_ALL_REDUCE: u8 = 1;
const OP_BROADCAST: u8 = 2;

/// CPU collective over TCP. Rank 0 listens on the rendezvous address; the
/// other ranks connect to it (retrying until `timeout`).
#[derive(Debug)]
pub struct TcpCollective {
    rank: usize,
    world: usize,
    /// Rank 0: the streams of ranks 1..world, in rank order. Others: the stream to rank 0.
    peers: Vec<TcpStream>,
}

fn comm_err(what: impl std::fmt::Display) -> Error {
    Error::Comm(what.to_string())
}

impl TcpCollective {
    /// Forms the group. Blocks until all `world` ranks have joined or `timeout` passes.
    pub fn connect(rank: usize, world: usize, rendezvous: &str, auth: &GroupAuth, timeout: Duration) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(comm_err(format!("rank {rank} is not in a world of size {world}")));
        }
        let deadline = Instant::now() + timeout;
        let mut peers = Vec::new();
        if rank == 0 {
            let listener = TcpListener::bind(rendezvous)
                .map_err(|e| comm_err(format!("rank 0 cannot listen on {rendezvous}: {e}")))?;
            listener.set_nonblocking(true).map_err(comm_err)?;
            let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            while slots.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut s, from)) => {
                        s.set_nonblocking(false).map_err(comm_err)?;
                        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(comm_err)?;
                        let nonce: [u8; NONCE] = rand::random();
                        // The rank's hello, then its own nonce for rank 0 to answer.
                        let mut hello = [0u8; 16 + MAC + NONCE];
                        let proven = s
                            .write_all(&nonce)
                            .and_then(|()| s.read_exact(&mut hello))
                            .ok()
                            .and_then(|()| auth.verify(hello[..16 + MAC].try_into().expect("hello bytes"), &nonce));
                        let Some((r, w)) = proven else {
                            tracing::warn!(%from, "dropping a collective connection that did not prove the job token");
                            continue;
                        };
                        let (r, w) = (r as usize, w as usize);
                        if w != world || r == 0 || r >= world || slots[r - 1].is_some() {
                            return Err(comm_err(format!(
                                "rank {r} of world {w} joined a world of size {world} (duplicate or out of range)"
                            )));
                        }
                        s.write_all(&auth.root_proof(&hello[16 + MAC..])).map_err(comm_err)?;
                        s.set_read_timeout(None).map_err(comm_err)?;
                        s.set_nodelay(true).map_err(comm_err)?;
                        slots[r - 1] = Some(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<usize> =
                                slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| i + 1).collect();
                            return Err(comm_err(format!("ranks {missing:?} did not join {rendezvous} in time")));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(comm_err(e)),
                }
            }
            peers = slots.into_iter().map(|s| s.expect("all joined")).collect();
        } else {
            let addr = rendezvous
                .to_socket_addrs()
                .map_err(|e| comm_err(format!("bad rendezvous address {rendezvous}: {e}")))?
                .next()
                .ok_or_else(|| comm_err(format!("rendezvous address {rendezvous} resolves to nothing")))?;
            let mut s = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!(error = %e, "rank 0 not reachable yet");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => return Err(comm_err(format!("rank {rank} cannot reach rank 0 at {rendezvous}: {e}"))),
                }
            };
            s.set_read_timeout(Some(Duration::from_secs(30))).map_err(comm_err)?;
            let mut nonce = [0u8; NONCE];
            s.read_exact(&mut nonce).map_err(|e| comm_err(format!("rank 0 at {rendezvous} sent no challenge: {e}")))?;
            let mine: [u8; NONCE] = rand::random();
            let mut hello = auth.hello(world as u32, rank as u32, &nonce);
            hello.extend(mine);
            s.write_all(&hello).map_err(comm_err)?;
            let mut proof = [0u8; MAC];
            s.read_exact(&mut proof).map_err(|e| comm_err(format!("rank 0 at {rendezvous} did not answer the hello: {e}")))?;
            if !auth.check_root_proof(&mine, &proof) {
                return Err(comm_err(format!("rank 0 at {rendezvous} did not prove the job token")));
            }
            s.set_read_timeout(None).map_err(comm_err)?;
            s.set_nodelay(true).map_err(comm_err)?;
            peers.push(s);
        }
        tracing::info!(rank, world, rendezvous, "collective group formed");
        Ok(TcpCollective { rank, world, peers })
    }
}

impl TcpCollective {
    /// A group over streams already connected and authenticated (rank 0: the
    /// streams of ranks 1..world in rank order; others: the stream to rank 0).
    pub(crate) fn from_streams(rank: usize, world: usize, peers: Vec<TcpStream>) -> Self {
        for s in &peers {
            let _ = s.set_nodelay(true);
        }
        TcpCollective { rank, world, peers }
    }
}

/// A frame's header: the op tag and the payload's byte count.
fn frame_header(op: u8, len: usize) -> [u8; 9] {
    let mut header = [0u8; 9];
    header[0] = op;
    header[1..].copy_from_slice(&(len as u64).to_le_bytes());
    header
}

fn send(s: &mut TcpStream, op: u8, bytes: &[u8]) -> Result<()> {
    s.write_all(&frame_header(op, bytes.len())).and_then(|_| s.write_all(bytes)).map_err(|e| comm_err(format!("send to peer: {e}")))
}

fn recv(s: &mut TcpStream, op: u8, expected_len: usize) -> Result<Vec<u8>> {
    let mut header = [0u8; 9];
    s.read_exact(&mut header).map_err(|e| comm_err(format!("receive from peer: {e}")))?;
    let len = u64::from_le_bytes(header[1..].try_into().expect("8 bytes")) as usize;
    if header[0] != op || len != expected_len {
        return Err(comm_err(format!(
            "ranks disagree: expected op {op} with {expected_len} bytes, peer sent op {} with {len} bytes",
            header[0]
        )));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).map_err(|e| comm_err(format!("receive from peer: {e}")))?;
    Ok(buf)
}

/// The tensors flattened into one contiguous CPU tensor, and its bytes.
fn flatten(tensors: &[Tensor]) -> Result<(Tensor, Kind)> {
    let kind = tensors.first().map(Tensor::kind).unwrap_or(Kind::Float);
    if tensors.iter().any(|t| t.kind() != kind) {
        return Err(comm_err("all tensors of one collective call must have the same dtype"));
    }
    let flat: Vec<Tensor> = tensors.iter().map(|t| t.detach().to_device(Device::Cpu).reshape([-1])).collect();
    Ok((Tensor::cat(&flat, 0), kind))
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    let n = t.numel();
    let mut out = vec![0u8; n * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut out, n);
    out
}

/// Copies the flat result back into the (possibly non-CPU) tensors.
fn unflatten(flat: &Tensor, tensors: &mut [Tensor]) {
    tch::no_grad(|| {
        let mut start = 0;
        for t in tensors.iter_mut() {
            let n = t.numel() as i64;
            let part = flat.narrow(0, start, n).view(t.size().as_slice()).to_device(t.device());
            t.copy_(&part);
            start += n;
        }
    });
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, tensors: &mut [Tensor]) -> Result<()> {
        if tensors.is_empty() {
            return Ok(());
        }
        let (flat, kind) = flatten(tensors)?;
        let n = flat.numel();
        let len = n * kind.elt_size_in_bytes();
        let result = if self.rank == 0 {
            // Sum in rank order: 0 + 1 + 2 + ...; every rank receives these exact bytes.
            let mut acc = flat;
            for peer in &mut self.peers {
                let bytes = recv(peer, OP_ALL_REDUCE, len)?;
                let other = Tensor::from_data_size(&bytes, &[n as i64], kind);
                acc += other;
            }
            let out = bytes_of(&acc);
            for peer in &mut self.peers {
                send(peer, OP_ALL_REDUCE, &out)?;
            }
            acc
        } else {
            let peer = &mut self.peers[0];
            send(peer, OP_ALL_REDUCE, &bytes_of(&flat))?;
            let bytes = recv(peer, OP_ALL_REDUCE, len)?;
            Tensor::from_data_size(&bytes, &[n as i64], kind)
        };
        unflatten(&result, tensors);
        Ok(())
    }

    fn broadcast_from_root(&mut self, tensors: &mut [Tensor]) -> Result<()> {
        if tensors.is_empty() {
            return Ok(());
        }
        if tensors.iter().all(|t| t.device() == Device::Cpu && t.is_contiguous()) {
            return self.broadcast_in_place(tensors);
        }
        let (flat, kind) = flatten(tensors)?;
        let n = flat.numel();
        if self.rank == 0 {
            let out = bytes_of(&flat);
            for peer in &mut self.peers {
                send(peer, OP_BROADCAST, &out)?;
            }
        } else {
            let bytes = recv(&mut self.peers[0], OP_BROADCAST, n * kind.elt_size_in_bytes())?;
            unflatten(&Tensor::from_data_size(&bytes, &[n as i64], kind), tensors);
        }
        Ok(())
    }
}

impl TcpCollective {
    /// [`Collective::broadcast_from_root`] for contiguous CPU tensors: the same
    /// frame (one op tag, the total byte count, the tensors' bytes in order),
    /// written from and read into the tensors' own memory, with no flattened
    /// copy on either side (a weights broadcast moves a whole model this way).
    fn broadcast_in_place(&mut self, tensors: &mut [Tensor]) -> Result<()> {
        let kind = tensors[0].kind();
        if tensors.iter().any(|t| t.kind() != kind) {
            return Err(comm_err("all tensors of one collective call must have the same dtype"));
        }
        let len: usize = tensors.iter().map(|t| t.numel() * kind.elt_size_in_bytes()).sum();
        let header = frame_header(OP_BROADCAST, len);
        if self.rank == 0 {
            // Every peer at once, each from the same memory (one thread per peer
            // beyond the first): N peers take about as long as the slowest one.
            let parts: Vec<&[u8]> = tensors.iter().map(host_bytes).collect();
            let send = |peer: &mut TcpStream| -> Result<()> {
                peer.write_all(&header).map_err(|e| comm_err(format!("send to peer: {e}")))?;
                for part in &parts {
                    peer.write_all(part).map_err(|e| comm_err(format!("send to peer: {e}")))?;
                }
                Ok(())
            };
            if let Some((first, rest)) = self.peers.split_first_mut() {
                std::thread::scope(|sc| {
                    let others: Vec<_> = rest.iter_mut().map(|p| sc.spawn(|| send(p))).collect();
                    let mine = send(first);
                    others.into_iter().map(|h| h.join().expect("send thread")).chain([mine]).collect::<Result<Vec<()>>>()
                })?;
            }
        } else {
            let peer = &mut self.peers[0];
            let mut got = [0u8; 9];
            peer.read_exact(&mut got).map_err(|e| comm_err(format!("receive from peer: {e}")))?;
            if got != header {
                let sent = u64::from_le_bytes(got[1..].try_into().expect("8 bytes"));
                return Err(comm_err(format!(
                    "ranks disagree: expected op {OP_BROADCAST} with {len} bytes, peer sent op {} with {sent} bytes",
                    got[0]
                )));
            }
            for t in tensors.iter_mut() {
                peer.read_exact(host_bytes_mut(t)).map_err(|e| comm_err(format!("receive from peer: {e}")))?;
            }
        }
        Ok(())
    }
}

/// The memory of a contiguous CPU tensor.
#[allow(unsafe_code)]
fn host_bytes(t: &Tensor) -> &[u8] {
    debug_assert!(t.device() == Device::Cpu && t.is_contiguous());
    let n = t.numel() * t.kind().elt_size_in_bytes();
    if n == 0 {
        return &[];
    }
    // SAFETY: a contiguous CPU tensor's data pointer (storage offset included)
    // addresses `numel * element size` initialised bytes, alive while `t` is
    // borrowed; nothing writes them during the borrow (the collective's
    // callers own these tensors for the call).
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) }
}

/// The memory of a contiguous CPU tensor, to overwrite.
#[allow(unsafe_code)]
fn host_bytes_mut(t: &mut Tensor) -> &mut [u8] {
    debug_assert!(t.device() == Device::Cpu && t.is_contiguous());
    let n = t.numel() * t.kind().elt_size_in_bytes();
    if n == 0 {
        return &mut [];
    }
    // SAFETY: as in `host_bytes`; the exclusive borrow of the tensor handle is
    // the caller's promise that no one reads or writes this storage meanwhile
    // (the weights member holds its staging lock), and any byte pattern is a
    // valid value of the numeric dtypes broadcast here.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, n) }
}

/// Sums plain numbers over all ranks (metrics, loss denominators).
pub fn all_reduce_f64(comm: &mut dyn Collective, values: &mut [f64]) -> Result<()> {
    if comm.world_size() == 1 || values.is_empty() {
        return Ok(());
    }
    let mut t = [Tensor::from_slice(values)];
    comm.all_reduce_sum(&mut t)?;
    values.copy_from_slice(&Vec::<f64>::try_from(&t[0]).map_err(comm_err)?);
    Ok(())
}

/// Every rank's `mine`, concatenated in rank order, on every rank (two sums:
/// the lengths, then the values each in its rank's slot; exact for any u64).
pub fn all_gather_u64(comm: &mut dyn Collective, mine: &[u64]) -> Result<Vec<u64>> {
    let (rank, world) = (comm.rank(), comm.world_size());
    if world == 1 {
        return Ok(mine.to_vec());
    }
    let mut lens = vec![0i64; world];
    lens[rank] = mine.len() as i64;
    let mut t = [Tensor::from_slice(&lens)];
    comm.all_reduce_sum(&mut t)?;
    let lens = Vec::<i64>::try_from(&t[0]).map_err(comm_err)?;
    let total: i64 = lens.iter().sum();
    if total == 0 {
        return Ok(Vec::new());
    }
    let offset: i64 = lens[..rank].iter().sum();
    let mut slots = vec![0i64; total as usize];
    for (i, &v) in mine.iter().enumerate() {
        slots[offset as usize + i] = v as i64;
    }
    let mut t = [Tensor::from_slice(&slots)];
    comm.all_reduce_sum(&mut t)?;
    Ok(Vec::<i64>::try_from(&t[0]).map_err(comm_err)?.into_iter().map(|v| v as u64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_addr() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    fn auth() -> GroupAuth {
        GroupAuth::new(Some("job-token"), "job-1")
    }

    #[test]
    fn forged_and_garbage_hellos_are_dropped_and_the_group_still_forms() {
        use std::io::{Read, Write};
        let addr = free_addr();
        let a0 = addr.clone();
        let root = std::thread::spawn(move || {
            let mut c = TcpCollective::connect(0, 2, &a0, &auth(), Duration::from_secs(30)).unwrap();
            let mut t = [Tensor::from_slice(&[1.0f32])];
            c.all_reduce_sum(&mut t).unwrap();
            Vec::<f32>::try_from(&t[0]).unwrap()
        });
        let connect = || loop {
            if let Ok(s) = TcpStream::connect(&addr) {
                break s;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The old unauthenticated hello of rank 1 (this made rank 0 exit before).
        let mut s = connect();
        let mut nonce = [0u8; NONCE];
        s.read_exact(&mut nonce).unwrap();
        let mut old = b"SLUICE01".to_vec();
        old.extend(1u32.to_le_bytes());
        old.extend(2u32.to_le_bytes());
        let _ = s.write_all(&old);
        drop(s);
        // A rank with the wrong token, and one for another job, with a valid shape.
        for wrong in [GroupAuth::new(Some("guess"), "job-1"), GroupAuth::new(Some("job-token"), "job-2")] {
            let mut s = connect();
            s.read_exact(&mut nonce).unwrap();
            let mut hello = wrong.hello(2, 1, &nonce);
            hello.extend([9u8; NONCE]);
            s.write_all(&hello).unwrap();
            // Dropped: the next read sees the connection closed.
            let mut b = [0u8; 1];
            assert_eq!(s.read(&mut b).unwrap_or(0), 0);
        }
        // Random bytes.
        let mut s = connect();
        s.read_exact(&mut nonce).unwrap();
        let _ = s.write_all(&[7u8; 16 + MAC + NONCE]);
        drop(s);
        let mut c = TcpCollective::connect(1, 2, &addr, &auth(), Duration::from_secs(30)).unwrap();
        let mut t = [Tensor::from_slice(&[2.0f32])];
        c.all_reduce_sum(&mut t).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t[0]).unwrap(), vec![3.0]);
        assert_eq!(root.join().unwrap(), vec![3.0]);
    }

    /// A listener at the rendezvous that reads the hello but does not hold the
    /// token: the rank refuses to form a group with it.
    #[test]
    fn a_rank_never_joins_a_rank_0_without_the_token() {
        use std::io::{Read, Write};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let impostor = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let nonce = [1u8; NONCE];
            s.write_all(&nonce).unwrap();
            let mut hello = [0u8; 16 + MAC + NONCE];
            s.read_exact(&mut hello).unwrap();
            // The hello is genuine (so the impostor learns the rank's claim), but
            // it cannot answer the rank's nonce without the key.
            assert_eq!(auth().verify(hello[..16 + MAC].try_into().unwrap(), &nonce), Some((1, 2)));
            s.write_all(&GroupAuth::new(Some("guess"), "job-1").root_proof(&hello[16 + MAC..])).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        let err = TcpCollective::connect(1, 2, &addr, &auth(), Duration::from_secs(10)).unwrap_err().to_string();
        assert!(err.contains("did not prove the job token"), "{err}");
        impostor.join().unwrap();
    }

    #[test]
    fn three_ranks_sum_and_broadcast() {
        let addr = free_addr();
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c = TcpCollective::connect(rank, 3, &addr, &auth(), Duration::from_secs(20)).unwrap();
                    let r = rank as f32;
                    let mut ts = [Tensor::from_slice(&[r, 2.0 * r]), Tensor::from_slice(&[1.0f32, r, r * r]).view([3, 1])];
                    c.all_reduce_sum(&mut ts).unwrap();
                    let a = Vec::<f32>::try_from(&ts[0]).unwrap();
                    let b = Vec::<f32>::try_from(&ts[1].reshape([-1])).unwrap();
                    assert_eq!(a, vec![3.0, 6.0]);
                    assert_eq!(b, vec![3.0, 3.0, 5.0]);
                    assert_eq!(ts[1].size(), vec![3, 1]);
                    let mut v = [rank as f64 + 0.5];
                    all_reduce_f64(&mut c, &mut v).unwrap();
                    assert_eq!(v, [4.5]);
                    let mine: Vec<u64> = (0..rank as u64).map(|i| u64::MAX - i * 10 - rank as u64).collect();
                    let all = all_gather_u64(&mut c, &mine).unwrap();
                    assert_eq!(all, vec![u64::MAX - 1, u64::MAX - 2, u64::MAX - 12]);
                    let mut bt = [Tensor::from_slice(&[r + 10.0])];
                    c.broadcast_from_root(&mut bt).unwrap();
                    assert_eq!(Vec::<f32>::try_from(&bt[0]).unwrap(), vec![10.0]);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    /// A broadcast from tensors that are not contiguous (flattened copy) and
    /// into ones that are (read in place) carry the same frame.
    #[test]
    fn in_place_and_flattened_broadcasts_interoperate() {
        let addr = free_addr();
        let a2 = addr.clone();
        let peer = std::thread::spawn(move || {
            let mut c = TcpCollective::connect(1, 2, &a2, &auth(), Duration::from_secs(20)).unwrap();
            let mut ts = [Tensor::zeros([2, 3], (Kind::BFloat16, Device::Cpu)), Tensor::zeros([0], (Kind::BFloat16, Device::Cpu))];
            c.broadcast_from_root(&mut ts).unwrap();
            Vec::<f32>::try_from(&ts[0].to_kind(Kind::Float).reshape([-1])).unwrap()
        });
        let mut c = TcpCollective::connect(0, 2, &addr, &auth(), Duration::from_secs(20)).unwrap();
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).view([3, 2]).to_kind(Kind::BFloat16).transpose(0, 1);
        assert!(!t.is_contiguous());
        let want = Vec::<f32>::try_from(&t.to_kind(Kind::Float).reshape([-1])).unwrap();
        c.broadcast_from_root(&mut [t, Tensor::zeros([0], (Kind::BFloat16, Device::Cpu))]).unwrap();
        assert_eq!(peer.join().unwrap(), want);
        assert_eq!(want, vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
    }

    #[test]
    fn mismatched_calls_are_an_error_not_garbage() {
        let addr = free_addr();
        let a2 = addr.clone();
        let peer = std::thread::spawn(move || {
            let mut c = TcpCollective::connect(1, 2, &a2, &auth(), Duration::from_secs(20)).unwrap();
            let _ = c.all_reduce_sum(&mut [Tensor::from_slice(&[1.0f32, 2.0, 3.0])]);
        });
        let mut c = TcpCollective::connect(0, 2, &addr, &auth(), Duration::from_secs(20)).unwrap();
        let err = c.all_reduce_sum(&mut [Tensor::from_slice(&[1.0f32])]).unwrap_err().to_string();
        assert!(err.contains("disagree"), "{err}");
        drop(c);
        peer.join().unwrap();
    }
}
