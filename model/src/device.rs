//! The job file's parsed dtype and device ([`sluice_core::kinds`]) as libtorch's.

use sluice_core::kinds::{DeviceSpec, Dtype};
use tch::{Device, Kind};

/// The libtorch device; `auto` is the first CUDA device when one is available.
pub fn device(spec: DeviceSpec) -> Device {
    match spec {
        DeviceSpec::Cpu => Device::Cpu,
        DeviceSpec::Cuda(n) => Device::Cuda(n),
        DeviceSpec::Auto => Device::cuda_if_available(),
    }
}

/// The libtorch element type.
pub fn kind(dtype: Dtype) -> Kind {
    match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::Bf16 => Kind::BFloat16,
    }
}
