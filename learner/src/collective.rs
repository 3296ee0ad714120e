//! Collectives for data-parallel learners: every rank sums its gradients with
//! the others' and steps the same optimizer on the same result.
//!
//! [`Collective`] is the one interface; backends:
//! * [`Single`] — world size 1, every call is a no-op;
//! * [`TcpCollective`] — CPU collective between processes over TCP (a star
//!   through rank 0, which sums in rank order, so every rank gets bit-identical
//!   results); runs on any machine and is what multi-rank tests use;
//! * `NcclCollective` (feature `nccl`) — NCCL on CUDA tensors.
//!
//! Every call must be made by every rank in the same order with the same
//! tensor shapes; a mismatch is detected (op tag and byte count travel with each
//! frame) and reported as an error instead of summing garbage.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

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

const MAGIC: &[u8; 8] = b"SLUICE01";
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
    Error::Collective(what.to_string())
}

impl TcpCollective {
    /// Forms the group. Blocks until all `world` ranks have joined or `timeout` passes.
    pub fn connect(rank: usize, world: usize, rendezvous: &str, timeout: Duration) -> Result<Self> {
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
                        s.set_read_timeout(Some(Duration::from_secs(10))).map_err(comm_err)?;
                        let mut hello = [0u8; 16];
                        if s.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                            tracing::warn!(%from, "ignoring a connection that is not a sluice rank");
                            continue;
                        }
                        let r = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize;
                        let w = u32::from_le_bytes(hello[12..16].try_into().expect("4 bytes")) as usize;
                        if w != world || r == 0 || r >= world || slots[r - 1].is_some() {
                            return Err(comm_err(format!(
                                "rank {r} of world {w} joined a world of size {world} (duplicate or out of range)"
                            )));
                        }
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
            let mut hello = MAGIC.to_vec();
            hello.extend((rank as u32).to_le_bytes());
            hello.extend((world as u32).to_le_bytes());
            s.write_all(&hello).map_err(comm_err)?;
            s.set_nodelay(true).map_err(comm_err)?;
            peers.push(s);
        }
        tracing::info!(rank, world, rendezvous, "collective group formed");
        Ok(TcpCollective { rank, world, peers })
    }
}

fn send(s: &mut TcpStream, op: u8, bytes: &[u8]) -> Result<()> {
    let mut header = [0u8; 9];
    header[0] = op;
    header[1..].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    s.write_all(&header).and_then(|_| s.write_all(bytes)).map_err(|e| comm_err(format!("send to peer: {e}")))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn free_addr() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    #[test]
    fn three_ranks_sum_and_broadcast() {
        let addr = free_addr();
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c = TcpCollective::connect(rank, 3, &addr, Duration::from_secs(20)).unwrap();
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

    #[test]
    fn mismatched_calls_are_an_error_not_garbage() {
        let addr = free_addr();
        let a2 = addr.clone();
        let peer = std::thread::spawn(move || {
            let mut c = TcpCollective::connect(1, 2, &a2, Duration::from_secs(20)).unwrap();
            let _ = c.all_reduce_sum(&mut [Tensor::from_slice(&[1.0f32, 2.0, 3.0])]);
        });
        let mut c = TcpCollective::connect(0, 2, &addr, Duration::from_secs(20)).unwrap();
        let err = c.all_reduce_sum(&mut [Tensor::from_slice(&[1.0f32])]).unwrap_err().to_string();
        assert!(err.contains("disagree"), "{err}");
        drop(c);
        peer.join().unwrap();
    }
}
