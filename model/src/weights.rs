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
}
