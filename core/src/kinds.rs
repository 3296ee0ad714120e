//! Parsed values of the job file: each is checked once, when the file is read,
//! and cannot hold anything else afterwards (no string re-parsed where used).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Element type of parameters (`model.dtype`) and of weights on the wire
/// (`rollout.weights_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        }
    }
}

impl FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "fp32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            _ => Err(format!("`{s}` is not one of f32, bf16")),
        }
    }
}

/// Where the policy runs (`model.device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    /// The first CUDA device when one is available, else the CPU.
    Auto,
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "auto" => Ok(DeviceSpec::Auto),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(format!("`{s}` is not one of cpu, cuda, cuda:N, auto")),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Auto => f.write_str("auto"),
        }
    }
}

/// Where the reward server keeps caption labels (`reward.store`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum StoreUrl {
    /// This process only; lost when it exits.
    Memory,
    /// A `redis://` or `rediss://` URL, kept verbatim.
    Redis(String),
}

impl FromStr for StoreUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "memory" {
            Ok(StoreUrl::Memory)
        } else if s.starts_with("redis://") || s.starts_with("rediss://") {
            Ok(StoreUrl::Redis(s.to_string()))
        } else {
            Err(format!("`{s}` is neither `memory` nor a redis:// URL"))
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Memory => f.write_str("memory"),
            StoreUrl::Redis(url) => f.write_str(url),
        }
    }
}

/// How actors get each new policy version (`rollout.weight_transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightTransport {
    /// Each actor downloads the versions it needs (`GetWeights`, chunked,
    /// resumable, deltas).
    #[default]
    Grpc,
    /// The learner's rank 0 pushes every version to the actors that joined its
    /// weights broadcast group (TCP collective on CPU, NCCL on CUDA); an actor
    /// that missed a version, or just joined, downloads it over gRPC.
    Broadcast,
}

/// What an annotator says of a caption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    Helpful,
    Unhelpful,
}

impl Label {
    pub fn is_helpful(self) -> bool {
        self == Label::Helpful
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! string_forms {
    ($($t:ty),*) => {$(
        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.to_string()
            }
        }
    )*};
}
string_forms!(Dtype, DeviceSpec, StoreUrl);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_their_text() {
        for s in ["f32", "bf16"] {
            assert_eq!(s.parse::<Dtype>().unwrap().to_string(), s);
        }
        assert_eq!("float32".parse::<Dtype>().unwrap(), Dtype::F32);
        for s in ["cpu", "cuda:3", "auto"] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap().to_string(), s);
        }
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        for s in ["memory", "redis://127.0.0.1:6379/2", "rediss://h:1"] {
            assert_eq!(s.parse::<StoreUrl>().unwrap().to_string(), s);
        }
        assert!("f16".parse::<Dtype>().unwrap_err().contains("f32, bf16"));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("mysql://x".parse::<StoreUrl>().is_err());
    }
}
