//! Logging set-up shared by every sluice binary: `tracing` to stderr, filtered
//! by `RUST_LOG` (default: `default_level`). Stdout stays free for JSON events.

pub fn init(default_level: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into()),
        )
        .init();
}
