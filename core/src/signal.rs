//! Ctrl-C and SIGTERM: the one place every sluice process handles them.
//!
//! * [`stop_flag`] for the synchronous loops (trainer, learner, actor, `sluice
//!   dev`): the first Ctrl-C or SIGTERM (or SIGHUP) sets the flag (the loop
//!   finishes its step, saves what it must and exits 130), a second one exits
//!   130 at once.
//! * [`shutdown`] for the async servers: resolves on Ctrl-C or SIGTERM, and is
//!   what tonic's graceful shutdown waits on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The exit status of a process stopped by Ctrl-C.
pub const INTERRUPTED: i32 = 130;

/// A flag set by the first Ctrl-C (after printing `message`, when given); the
/// second Ctrl-C exits with [`INTERRUPTED`] without waiting.
pub fn stop_flag(message: Option<&'static str>) -> Result<Arc<AtomicBool>, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(INTERRUPTED);
        }
        if let Some(m) = message {
            eprintln!("\n{m}");
        }
    })
    .map_err(|e| format!("installing the Ctrl-C handler: {e}"))?;
    Ok(stop)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
