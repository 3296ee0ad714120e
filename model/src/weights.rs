//! Policy weights as one in-memory safetensors blob: what a learner serves and
//! an actor loads. Tensor names are the Hugging Face parameter names, so a blob
//! written to disk is a valid `model.safetensors`.

use std::borrow::Cow;

use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// A tensor copied to host memory in the wire dtype.
struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Serialises named tensors (converted to `kind`: `Float` or `BFloat16`) into
/// safetensors bytes. No gradient is recorded.
pub fn encode(named: &[(String, Tensor)], kind: Kind) -> Result<Vec<u8>> {
    let dtype = match kind {
        Kind::Float => Dtype::F32,
        Kind::BFloat16 => Dtype::BF16,
        other => return Err(Error::Checkpoint { file: "<weights>".into(), reason: format!("wire dtype {other:?}") }),
    };
    let host: Vec<(String, HostTensor)> = tch::no_grad(|| {
        named
            .iter()
            .map(|(name, t)| {
                let t = t.detach().to_device(tch::Device::Cpu).to_kind(kind).contiguous();
                let numel = t.numel();
                let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
                t.copy_data_u8(&mut bytes, numel);
                let shape = t.size().iter().map(|&d| d as usize).collect();
                (name.clone(), HostTensor { dtype, shape, bytes })
            })
            .collect()
    });
    safetensors::tensor::serialize(host.iter().map(|(n, h)| (n.as_str(), h)), &None)
        .map_err(|e| Error::Checkpoint { file: "<weights>".into(), reason: e.to_string() })
}

/// Parses safetensors bytes into named CPU tensors.
pub fn decode(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    let bad = |reason: String| Error::Checkpoint { file: "<weights>".into(), reason };
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a safetensors blob: {e}")))?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| Ok((name, Tensor::try_from(view).map_err(|e| bad(e.to_string()))?)))
        .collect()
}

// ---------------------------------------------------------------------------
// Deltas: version v+1's blob as the elements that changed since version v.
//
// Two blobs of the same policy in the same wire dtype have the same header
// (names, shapes, offsets), so a delta only lists changed data. Elements are
// compared as bit patterns (u16 for bf16, u32 for f32): after a small-LR step
// most bf16 values round to what they were. Each tensor is skipped when
// unchanged, sent sparse (u32 index + value per changed element) when that is
// smaller, else dense. Applying a delta reproduces the new blob byte for byte.
//
// Layout (little endian): "SLDELTA1", u64 length of this delta, u64 length of
// the blob's header (8 + JSON), u64 FNV-1a of that header, u8 element width,
// u32 entries; per entry: u64 first element (in the data section), u64
// elements, u8 mode (0 dense: n values; 1 sparse: u32 k, k u32 indices from
// the first element, k values). Deltas chain: several laid end to end apply
// in order (`apply_deltas`).

const DELTA_MAGIC: &[u8; 8] = b"SLDELTA1";
const DELTA_HEAD: usize = 8 + 8 + 8 + 8 + 1 + 4;
/// Elements compared as one block before looking at single elements.
const DELTA_BLOCK: usize = 256;

fn bad_delta(reason: impl Into<String>) -> Error {
    Error::Checkpoint { file: "<weights delta>".into(), reason: reason.into() }
}

/// Where a blob's tensors lie.
struct Layout {
    /// Header length (8 + JSON): where the data section starts.
    head: usize,
    /// Bytes per element (2 for bf16/f16, 4 for f32).
    width: usize,
    /// Each tensor's `[start, end)` in bytes within the data section, in data order.
    ranges: Vec<(usize, usize)>,
}

fn layout(blob: &[u8]) -> Result<Layout> {
    let (n, meta) = SafeTensors::read_metadata(blob).map_err(|e| bad_delta(format!("not a safetensors blob: {e}")))?;
    let mut width = None;
    let mut ranges = Vec::new();
    for info in meta.tensors().values() {
        let w = match info.dtype {
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
            other => return Err(bad_delta(format!("dtype {other:?} has no delta encoding"))),
        };
        if width.is_some_and(|x| x != w) {
            return Err(bad_delta("tensors of several dtypes"));
        }
        width = Some(w);
        ranges.push(info.data_offsets);
    }
    ranges.sort_unstable();
    Ok(Layout { head: n + 8, width: width.unwrap_or(4), ranges })
}

/// The delta that turns blob `old` into blob `new`; an error when they do
/// not share a header (other tensors, shapes or dtype).
pub fn delta(old: &[u8], new: &[u8]) -> Result<Vec<u8>> {
    let Layout { head, width: w, ranges } = layout(new)?;
    if old.len() != new.len() || old[..head] != new[..head] {
        return Err(bad_delta("the two versions do not hold the same tensors"));
    }
    let (old_data, new_data) = (&old[head..], &new[head..]);
    let mut out = Vec::with_capacity(DELTA_HEAD);
    out.extend_from_slice(DELTA_MAGIC);
    out.extend_from_slice(&0u64.to_le_bytes()); // length, set below
    out.extend_from_slice(&(head as u64).to_le_bytes());
    out.extend_from_slice(&sluice_core::fnv1a(&new[..head]).to_le_bytes());
    out.push(w as u8);
    out.extend_from_slice(&0u32.to_le_bytes()); // entries, set below
    let mut entries = 0u32;
    let mut changed: Vec<u32> = Vec::new();
    for &(start, end) in &ranges {
        let (a, b) = (&old_data[start..end], &new_data[start..end]);
        if a == b {
            continue;
        }
        changed.clear();
        let block = DELTA_BLOCK * w;
        for (k, (x, y)) in a.chunks(block).zip(b.chunks(block)).enumerate() {
            if x == y {
                continue;
            }
            for (i, (p, q)) in x.chunks_exact(w).zip(y.chunks_exact(w)).enumerate() {
                if p != q {
                    changed.push((k * DELTA_BLOCK + i) as u32);
                }
            }
        }
        let n = (end - start) / w;
        entries += 1;
        out.extend_from_slice(&((start / w) as u64).to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
        if changed.len() * (4 + w) < n * w {
            out.push(1);
            out.extend_from_slice(&(changed.len() as u32).to_le_bytes());
            for &i in &changed {
                out.extend_from_slice(&i.to_le_bytes());
            }
            for &i in &changed {
                let at = i as usize * w;
                out.extend_from_slice(&b[at..at + w]);
            }
        } else {
            out.push(0);
            out.extend_from_slice(b);
        }
    }
    let len = out.len() as u64;
    out[8..16].copy_from_slice(&len.to_le_bytes());
    out[DELTA_HEAD - 4..DELTA_HEAD].copy_from_slice(&entries.to_le_bytes());
    Ok(out)
}

/// Reads little-endian fields off the front of a delta.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(bad_delta("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
}

/// Applies one delta or several laid end to end, in order, to `blob` in
/// place. Everything is checked against the blob before a byte changes: a
/// delta of another model, a truncated or a forged one is an error and leaves
/// `blob` as it was.
pub fn apply_deltas(blob: &mut [u8], deltas: &[u8]) -> Result<()> {
    // Two passes: check every delta, then write.
    for write in [false, true] {
        let mut rest = deltas;
        while !rest.is_empty() {
            let mut r = Reader(rest);
            if r.take(8)? != DELTA_MAGIC {
                return Err(bad_delta("not a weights delta"));
            }
            let len = r.u64()? as usize;
            if len < DELTA_HEAD || len > rest.len() {
                return Err(bad_delta(format!("length {len} does not fit the {} bytes left", rest.len())));
            }
            let (this, next) = rest.split_at(len);
            rest = next;
            let mut r = Reader(&this[16..]);
            let head = r.u64()? as usize;
            if head > blob.len() || r.u64()? != sluice_core::fnv1a(&blob[..head]) {
                return Err(bad_delta("made for another set of tensors"));
            }
            let w = r.u8()? as usize;
            if !matches!(w, 2 | 4) {
                return Err(bad_delta(format!("element width {w}")));
            }
            let entries = r.u32()?;
            let data_len = blob.len() - head;
            for _ in 0..entries {
                let (first, n) = (r.u64()? as usize, r.u64()? as usize);
                let in_range = first.checked_add(n).and_then(|e| e.checked_mul(w)).is_some_and(|e| e <= data_len);
                if !in_range {
                    return Err(bad_delta("an entry reaches past the tensors"));
                }
                let base = head + first * w;
                match r.u8()? {
                    0 => {
                        let values = r.take(n * w)?;
                        if write {
                            blob[base..base + n * w].copy_from_slice(values);
                        }
                    }
                    1 => {
                        let k = r.u32()? as usize;
                        let idx = r.take(k.checked_mul(4).ok_or_else(|| bad_delta("count"))?)?;
                        let values = r.take(k.checked_mul(w).ok_or_else(|| bad_delta("count"))?)?;
                        for (j, i) in idx.chunks_exact(4).enumerate() {
                            let i = u32::from_le_bytes(i.try_into().expect("4 bytes")) as usize;
                            if i >= n {
                                return Err(bad_delta("an index reaches past its tensor"));
                            }
                            if write {
                                blob[base + i * w..base + (i + 1) * w].copy_from_slice(&values[j * w..(j + 1) * w]);
                            }
                        }
                    }
                    m => return Err(bad_delta(format!("mode {m}"))),
                }
            }
            if !r.0.is_empty() {
                return Err(bad_delta("bytes after the last entry"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_bit_exact_in_f32_and_rounds_in_bf16() {
        let a = Tensor::randn([3, 4], (Kind::Float, tch::Device::Cpu));
        let b = Tensor::randn([5], (Kind::Float, tch::Device::Cpu));
        let named = vec![("a.weight".to_string(), a.shallow_clone()), ("b.bias".to_string(), b.shallow_clone())];
        let back = decode(&encode(&named, Kind::Float).unwrap()).unwrap();
        let get = |n: &str| back.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
        assert!(get("a.weight").equal(&a) && get("b.bias").equal(&b));
        let half = decode(&encode(&named, Kind::BFloat16).unwrap()).unwrap();
        let a16 = half.iter().find(|(k, _)| k == "a.weight").unwrap().1.shallow_clone();
        assert_eq!(a16.kind(), Kind::BFloat16);
        assert!(a16.equal(&a.to_kind(Kind::BFloat16)));
        assert!(decode(b"not a blob").is_err());
    }

    /// A delta after a small update reproduces the new blob byte for byte, is
    /// far smaller than the blob when few bf16 values moved, chains, and
    /// nothing else applies: another model's delta, a truncated or a forged
    /// one leaves the blob untouched.
    #[test]
    fn deltas_reproduce_the_new_blob_exactly() {
        tch::manual_seed(0);
        let a = Tensor::randn([64, 32], (Kind::Float, tch::Device::Cpu));
        let b = Tensor::randn([300], (Kind::Float, tch::Device::Cpu));
        let c = Tensor::randn([7], (Kind::Float, tch::Device::Cpu));
        let named = |a: &Tensor, b: &Tensor, c: &Tensor| {
            vec![("a".to_string(), a.shallow_clone()), ("b".to_string(), b.shallow_clone()), ("c".to_string(), c.shallow_clone())]
        };
        for kind in [Kind::BFloat16, Kind::Float] {
            let v0 = encode(&named(&a, &b, &c), kind).unwrap();
            // v1: a tiny step on `a` (most bf16 values do not move), `b` rewritten, `c` unchanged.
            let a1 = &a * (1.0 + 1e-4);
            let b1 = Tensor::randn([300], (Kind::Float, tch::Device::Cpu));
            let v1 = encode(&named(&a1, &b1, &c), kind).unwrap();
            let v2 = encode(&named(&(&a1 * 2.0), &b1, &c), kind).unwrap();
            let d01 = delta(&v0, &v1).unwrap();
            let d12 = delta(&v1, &v2).unwrap();
            let mut blob = v0.clone();
            apply_deltas(&mut blob, &d01).unwrap();
            assert!(blob == v1, "{kind:?}: one delta");
            let mut blob = v0.clone();
            apply_deltas(&mut blob, &[d01.clone(), d12.clone()].concat()).unwrap();
            assert!(blob == v2, "{kind:?}: a chain");
            assert_eq!(delta(&v1, &v1).unwrap().len(), DELTA_HEAD, "nothing changed: no entries");
            if kind == Kind::BFloat16 {
                // `b` dense (600 bytes) + a sparse `a`: well under the 4.6 KB blob.
                assert!(d01.len() < v1.len() / 3, "{} of {}", d01.len(), v1.len());
            }
            let other = encode(&[("z".to_string(), Tensor::zeros([4], (Kind::Float, tch::Device::Cpu)))], kind).unwrap();
            let mut blob = v0.clone();
            for bad in [delta(&other, &other).unwrap(), d01[..d01.len() - 1].to_vec(), b"SLDELTA1xxxxxxxx".to_vec()] {
                assert!(apply_deltas(&mut blob, &bad).is_err());
                assert!(blob == v0, "untouched");
            }
            // Forged entries: an index past its tensor, a range past the data.
            let w = if kind == Kind::BFloat16 { 2 } else { 4 };
            let forge = |entry: &[u8]| {
                let mut d = d01[..DELTA_HEAD].to_vec();
                d[DELTA_HEAD - 4..].copy_from_slice(&1u32.to_le_bytes());
                d.extend_from_slice(entry);
                let len = d.len() as u64;
                d[8..16].copy_from_slice(&len.to_le_bytes());
                d
            };
            let sparse = [&0u64.to_le_bytes()[..], &7u64.to_le_bytes(), &[1], &1u32.to_le_bytes(), &7u32.to_le_bytes(), &vec![0; w]].concat();
            let dense = [&(u64::MAX / 2).to_le_bytes()[..], &1u64.to_le_bytes(), &[0], &vec![0; w]].concat();
            for bad in [forge(&sparse), forge(&dense)] {
                assert!(apply_deltas(&mut blob, &[d01.clone(), bad].concat()).is_err());
                assert!(blob == v0, "a chain with a bad link changes nothing");
            }
            assert!(delta(&v0, &other).is_err());
        }
    }
}

