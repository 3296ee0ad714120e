//! Compiles `sluice/v1/*.proto` with protox (pure Rust, no protoc) and generates
//! the prost messages and tonic clients/servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["sluice/v1/learner.proto", "sluice/v1/reward.proto", "sluice/v1/orchestrator.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    // Every `bytes` field is `bytes::Bytes`: weight chunks are slices of one shared
    // buffer, and rollout arrays decode as slices of the receive buffer (no copies).
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
