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

/// Set by a supervisor (`sluice dev`) to its own pid in each child's
/// environment: a child that sees it dies with its parent ([`die_with_parent`]).
pub const PARENT_ENV: &str = "SLUICE_PARENT_PID";

/// When [`PARENT_ENV`] names this process's parent, asks the kernel for SIGTERM
/// when the parent dies (a `kill -9` of `sluice dev` leaves no orphans), and
/// exits at once if the parent is already gone. Every sluice server and worker
/// calls it first thing; without the variable it does nothing.
pub fn die_with_parent() {
    let Some(parent) = std::env::var(PARENT_ENV).ok().and_then(|p| p.parse::<i32>().ok()) else { return };
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM) {
        tracing::warn!(error = %e, "cannot ask to die with the parent process");
        return;
    }
    // The parent may have died before the request: then we were re-parented.
    if nix::unistd::getppid().as_raw() != parent {
        std::process::exit(INTERRUPTED);
    }
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
