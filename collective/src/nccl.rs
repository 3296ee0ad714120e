//! NCCL collective for CUDA tensors.
//!
//! NCCL is called through the copy libtorch already loaded: every entry point
//! is looked up with `dlsym(RTLD_DEFAULT, ..)`, so this process can never map a
//! second, different `libnccl` (two copies interpose each other's symbols and
//! fail with "corrupted comm object"; see ../shared/BUILD.md). After the
//! communicator is created, `/proc/self/maps` is checked and more than one
//! NCCL library is an error.
//!
//! Ranks agree on the NCCL unique id through the TCP collective, which also
//! carries the small CPU reductions (loss denominators, metrics). NCCL runs on
//! the legacy default stream, which is libtorch's default stream too; the
//! device is synchronised around each call so ordering never depends on it.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use tch::{Device, Kind, Tensor};

use crate::{Collective, Error, Result, TcpCollective};

type NcclComm = *mut c_void;
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut NcclComm, c_int, UniqueId, c_int) -> c_int;
type CommDestroy = unsafe extern "C" fn(NcclComm) -> c_int;
type AllReduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, NcclComm, *mut c_void) -> c_int;
type Broadcast = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, NcclComm, *mut c_void) -> c_int;
type GroupCall = unsafe extern "C" fn() -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type SetDevice = unsafe extern "C" fn(c_int) -> c_int;

/// NCCL entry points resolved in the process's global symbol scope.
struct Api {
    get_version: GetVersion,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    comm_destroy: CommDestroy,
    all_reduce: AllReduce,
    broadcast: Broadcast,
    group_start: GroupCall,
    group_end: GroupCall,
    error_string: ErrorString,
    cuda_set_device: SetDevice,
}

fn nccl_err(what: impl std::fmt::Display) -> Error {
    Error::Comm(format!("nccl: {what}"))
}

/// Looks `name` up among the libraries already loaded (libtorch_cuda's NCCL and cudart).
fn symbol<T: Copy>(name: &str) -> Result<T> {
    let c = CString::new(name).expect("no NUL in symbol names");
    // SAFETY: dlsym with RTLD_DEFAULT only searches already-loaded objects; the
    // returned pointer is checked for null and cast to the function type that
    // NCCL's and CUDA's public headers declare for `name`.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) };
    if p.is_null() {
        return Err(nccl_err(format!(
            "`{name}` is not loaded in this process (is libtorch built with CUDA, and libtorch_cuda linked?)"
        )));
    }
    assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: T is a function-pointer type of pointer size (asserted above).
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

impl Api {
    fn load() -> Result<Api> {
        Ok(Api {
            get_version: symbol("ncclGetVersion")?,
            get_unique_id: symbol("ncclGetUniqueId")?,
            comm_init_rank: symbol("ncclCommInitRank")?,
            comm_destroy: symbol("ncclCommDestroy")?,
            all_reduce: symbol("ncclAllReduce")?,
            broadcast: symbol("ncclBroadcast")?,
            group_start: symbol("ncclGroupStart")?,
            group_end: symbol("ncclGroupEnd")?,
            error_string: symbol("ncclGetErrorString")?,
            cuda_set_device: symbol("cudaSetDevice")?,
        })
    }

    fn check(&self, what: &str, code: c_int) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let msg = unsafe { CStr::from_ptr((self.error_string)(code)) }.to_string_lossy().into_owned();
        Err(nccl_err(format!("{what} failed with code {code}: {msg}")))
    }
}

/// The distinct NCCL library files mapped into this process.
pub fn loaded_nccl_libraries() -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut libs: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.rsplit('/').next().is_some_and(|f| f.starts_with("libnccl")))
        .map(|p| std::fs::canonicalize(p).map_or(p.to_string(), |c| c.display().to_string()))
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

fn nccl_type(kind: Kind) -> Result<c_int> {
    Ok(match kind {
        Kind::Uint8 => 1,
        Kind::Int => 2,
        Kind::Int64 => 4,
        Kind::Half => 6,
        Kind::Float => 7,
        Kind::Double => 8,
        Kind::BFloat16 => 9,
        other => return Err(nccl_err(format!("no NCCL type for {other:?}"))),
    })
}

/// NCCL on one CUDA device per rank; CPU tensors go through the TCP collective.
pub struct NcclCollective {
    api: Api,
    comm: NcclComm,
    device: usize,
    tcp: TcpCollective,
    /// `major.minor.patch` of the NCCL in use.
    pub version: String,
}

// SAFETY: the communicator is used by one thread at a time (the trainer owns
// the collective and calls it from its own thread); NCCL allows moving a
// communicator between threads as long as calls are not concurrent.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Creates the communicator for `device` (a CUDA ordinal), agreeing on the
    /// unique id through `tcp` (already connected, same rank and world size).
    pub fn new(mut tcp: TcpCollective, device: usize) -> Result<Self> {
        if !tch::Cuda::is_available() {
            return Err(nccl_err("CUDA is not available"));
        }
        let api = Api::load()?;
        let mut v: c_int = 0;
        // SAFETY: `v` is a valid out-pointer.
        api.check("ncclGetVersion", unsafe { (api.get_version)(&mut v) })?;
        let version = format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100);
        let mut id = UniqueId { internal: [0; 128] };
        if tcp.rank() == 0 {
            // SAFETY: `id` is a valid out-pointer to a 128-byte ncclUniqueId.
            api.check("ncclGetUniqueId", unsafe { (api.get_unique_id)(&mut id) })?;
        }
        let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        let mut t = [Tensor::from_slice(&bytes)];
        tcp.broadcast_from_root(&mut t)?;
        let shared = Vec::<u8>::try_from(&t[0]).map_err(nccl_err)?;
        for (dst, src) in id.internal.iter_mut().zip(shared) {
            *dst = src as c_char;
        }
        // SAFETY: plain CUDA runtime call with a device ordinal.
        api.check("cudaSetDevice", unsafe { (api.cuda_set_device)(device as c_int) })?;
        let mut comm: NcclComm = std::ptr::null_mut();
        let (rank, world) = (tcp.rank() as c_int, tcp.world_size() as c_int);
        // SAFETY: `comm` is a valid out-pointer; id, world and rank agree across ranks.
        api.check("ncclCommInitRank", unsafe { (api.comm_init_rank)(&mut comm, world, id, rank) })?;
        let libs = loaded_nccl_libraries();
        if libs.len() > 1 {
            return Err(nccl_err(format!(
                "{} NCCL libraries are loaded ({}); they would corrupt each other's communicators",
                libs.len(),
                libs.join(", ")
            )));
        }
        tracing::info!(%version, rank, world, device, library = ?libs, "NCCL communicator ready");
        Ok(NcclCollective { api, comm, device, tcp, version })
    }

    fn cuda_tensors(&self, tensors: &[Tensor]) -> Result<bool> {
        let on_cuda = tensors.iter().filter(|t| t.device() == Device::Cuda(self.device)).count();
        if on_cuda == 0 {
            return Ok(false);
        }
        if on_cuda != tensors.len() || tensors.iter().any(|t| !t.is_contiguous()) {
            return Err(nccl_err(format!("tensors must all be contiguous and on cuda:{}", self.device)));
        }
        Ok(true)
    }

    /// Runs `op` for every tensor inside one NCCL group, with the device
    /// synchronised before and after.
    fn grouped(&self, tensors: &mut [Tensor], mut op: impl FnMut(&Api, &mut Tensor) -> c_int) -> Result<()> {
        tch::Cuda::synchronize(self.device as i64);
        // SAFETY: group calls only batch the collectives issued between them.
        self.api.check("ncclGroupStart", unsafe { (self.api.group_start)() })?;
        let mut first_err = Ok(());
        for t in tensors.iter_mut() {
            let code = op(&self.api, t);
            if first_err.is_ok() {
                first_err = self.api.check("collective", code);
            }
        }
        // SAFETY: closes the group opened above.
        self.api.check("ncclGroupEnd", unsafe { (self.api.group_end)() })?;
        tch::Cuda::synchronize(self.device as i64);
        first_err
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }
    fn world_size(&self) -> usize {
        self.tcp.world_size()
    }

    fn all_reduce_sum(&mut self, tensors: &mut [Tensor]) -> Result<()> {
        if !self.cuda_tensors(tensors)? {
            return self.tcp.all_reduce_sum(tensors);
        }
        let kinds = tensors.iter().map(|t| nccl_type(t.kind())).collect::<Result<Vec<_>>>()?;
        let comm = self.comm;
        let mut k = kinds.into_iter();
        self.grouped(tensors, |api, t| {
            let p = t.data_ptr();
            // SAFETY: in-place all-reduce on a contiguous CUDA buffer of t.numel() elements.
            unsafe { (api.all_reduce)(p, p, t.numel(), k.next().expect("one kind per tensor"), 0, comm, std::ptr::null_mut()) }
        })
    }

    fn broadcast_from_root(&mut self, tensors: &mut [Tensor]) -> Result<()> {
        if !self.cuda_tensors(tensors)? {
            return self.tcp.broadcast_from_root(tensors);
        }
        let kinds = tensors.iter().map(|t| nccl_type(t.kind())).collect::<Result<Vec<_>>>()?;
        let comm = self.comm;
        let mut k = kinds.into_iter();
        self.grouped(tensors, |api, t| {
            let p = t.data_ptr();
            // SAFETY: in-place broadcast from rank 0 on a contiguous CUDA buffer.
            unsafe { (api.broadcast)(p, p, t.numel(), k.next().expect("one kind per tensor"), 0, comm, std::ptr::null_mut()) }
        })
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // SAFETY: the communicator was created by ncclCommInitRank and is destroyed once.
        let _ = unsafe { (self.api.comm_destroy)(self.comm) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GroupAuth;
    use std::time::Duration;

    /// On a GPU machine: a one-rank communicator all-reduces and broadcasts real
    /// CUDA tensors (f32 and bf16) and sees exactly one NCCL library. Elsewhere it
    /// says that it was skipped.
    #[test]
    fn nccl_all_reduce_and_broadcast_on_cuda_tensors() {
        if !tch::Cuda::is_available() {
            // Written past the test harness's capture so every run shows the skip.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED nccl_all_reduce_and_broadcast_on_cuda_tensors: no CUDA device");
            return;
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let tcp = TcpCollective::connect(0, 1, &addr, &GroupAuth::default(), Duration::from_secs(10)).unwrap();
        let mut c = NcclCollective::new(tcp, 0).unwrap();
        eprintln!("NCCL {} from {:?}", c.version, loaded_nccl_libraries());
        let dev = Device::Cuda(0);
        let a = Tensor::arange(1024, (Kind::Float, dev)) * 0.5;
        let b = Tensor::ones([3, 5], (Kind::BFloat16, dev)) * 3.0;
        let mut ts = [a.copy(), b.copy()];
        c.all_reduce_sum(&mut ts).unwrap();
        // One rank: the sum over ranks is the tensor itself.
        assert!(ts[0].equal(&a) && ts[1].equal(&b));
        c.broadcast_from_root(&mut ts).unwrap();
        assert!(ts[0].equal(&a));
        let mut cpu = [Tensor::from_slice(&[2.0f64])];
        c.all_reduce_sum(&mut cpu).unwrap();
        assert_eq!(Vec::<f64>::try_from(&cpu[0]).unwrap(), vec![2.0]);
        assert_eq!(loaded_nccl_libraries().len(), 1);
    }
}

#[cfg(test)]
mod multi_rank {
    use super::*;
    use crate::GroupAuth;
    use std::time::Duration;

    /// On a machine with at least two GPUs: one rank per GPU (threads of this
    /// process, NCCL allows that with one device each), every rank with its
    /// own values, so a sum that is not over both ranks, or a broadcast that
    /// does not come from rank 0, shows. Fewer GPUs: says that it was skipped.
    #[test]
    fn nccl_two_ranks_sum_and_broadcast_across_gpus() {
        let gpus = if tch::Cuda::is_available() { tch::Cuda::device_count() } else { 0 };
        if gpus < 2 {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED nccl_two_ranks_sum_and_broadcast_across_gpus: {gpus} CUDA device(s), needs 2");
            return;
        }
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let world = 2usize;
        let results: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let addr = addr.clone();
                    s.spawn(move || {
                        let tcp = TcpCollective::connect(rank, world, &addr, &GroupAuth::default(), Duration::from_secs(30)).unwrap();
                        let mut c = NcclCollective::new(tcp, rank).unwrap();
                        let dev = Device::Cuda(rank);
                        let scale = (rank + 1) as f64;
                        let a = Tensor::arange(1000, (Kind::Float, dev)) * scale;
                        let b = Tensor::ones([3, 5], (Kind::BFloat16, dev)) * scale;
                        let mut ts = [a, b];
                        c.all_reduce_sum(&mut ts).unwrap();
                        let sum_a = Vec::<f32>::try_from(&ts[0].to_device(Device::Cpu)).unwrap();
                        let sum_b = Vec::<f32>::try_from(&ts[1].to_kind(Kind::Float).to_device(Device::Cpu).view([-1])).unwrap();
                        let mut own = [Tensor::full([7], rank as f64 + 10.0, (Kind::Float, dev))];
                        c.broadcast_from_root(&mut own).unwrap();
                        let bc = Vec::<f32>::try_from(&own[0].to_device(Device::Cpu)).unwrap();
                        (sum_a, sum_b, bc)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (sum_a, sum_b, bc)) in results.iter().enumerate() {
            // Ranks hold 1x and 2x: the sum is 3x on every rank, bit-identical.
            for (i, v) in sum_a.iter().enumerate() {
                assert_eq!(*v, 3.0 * i as f32, "rank {rank}, element {i}");
            }
            assert!(sum_b.iter().all(|&v| v == 3.0), "rank {rank}: bf16 sum {sum_b:?}");
            assert!(bc.iter().all(|&v| v == 10.0), "rank {rank}: broadcast gave {bc:?}, not rank 0's 10");
        }
        assert_eq!(results[0], results[1], "every rank ends with the same bits");
        eprintln!("NCCL two-rank check passed on {gpus} GPUs");
    }
}
