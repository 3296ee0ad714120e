//! Compiles `sluice/v1/*.proto` with protox (pure Rust, no protoc) and generates
//! the prost messages and tonic clients/servers.

/// Messages with a JSON form: the event bodies and what they hold.
const EVENT_BODIES: [&str; 13] = [
    "AnnotationProgress",
    "WorkAccounted",
    "TrainStep",
    "WarmupStep",
    "Evaluation",
    "EvalSample",
    "CheckpointSaved",
    "JobSubmitted",
    "StateChanged",
    "RoundOpened",
    "WorkerJoined",
    "WorkerLost",
    "WorkRedispatched",
];

const NULLABLE_FLOATS: [&str; 5] = ["AnnotationProgress.annotate_seconds_mean", "TrainStep.grad_norm", "TrainStep.pg_loss", "TrainStep.kl", "WarmupStep.grad_norm"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["sluice/v1/learner.proto", "sluice/v1/reward.proto", "sluice/v1/orchestrator.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    // Every `bytes` field is `bytes::Bytes`: weight chunks are slices of one shared
    // buffer, and rollout arrays decode as slices of the receive buffer (no copies).
    let mut config = tonic_prost_build::configure().bytes(".");
    // Events have a JSON form (the orchestrator's store, `sluice logs --json`):
    // the body's fields plus `"event": "<name>"`; see `crate::events`.
    config = config
        .type_attribute(
            ".sluice.v1.Event.body",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(tag = \"event\", rename_all = \"snake_case\")]",
        );
    for m in EVENT_BODIES {
        config = config.type_attribute(format!(".sluice.v1.{m}"), "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]");
    }
    // JSON has no NaN: serde_json writes it as null, which reads back as NaN.
    for f in NULLABLE_FLOATS {
        config = config.field_attribute(format!(".sluice.v1.{f}"), "#[serde(deserialize_with = \"crate::events::null_as_nan\")]");
    }
    config.compile_fds(fds)?;
    Ok(())
}
