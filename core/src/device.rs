//! Device selection from config strings.

use tch::Device;

/// `cpu`, `cuda`, `cuda:N`, or `auto` (the first CUDA device when one is available).
pub fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available()),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Device::Cuda(n)),
            _ => Err(format!("`{s}` is not one of cpu, cuda, cuda:N, auto")),
        },
    }
}
