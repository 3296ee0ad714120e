//! What the integration tests of every crate share: child processes that
//! report readiness on stdout and die with their test, and a private
//! `redis-server`.
//!
//! Rules the helpers enforce, so tests do not have to remember them:
//! - readiness comes from the child (a JSON line such as `{"event":"listening",
//!   "addr":…}` after binding port 0), never from a sleep;
//! - a child runs in its own process group, and dropping its [`Proc`] kills that
//!   group and every process the child announced (`"pid"` in its `started` /
//!   `restarted` lines, as `sluice dev` prints them), so a failing test leaves
//!   no orphans behind;
//! - a server that must listen on a chosen port ([`Redis`]) is retried on
//!   another port when the one picked was taken in between.
//!
//! [`browser`] drives headless Chromium for the dashboard's tests.

pub mod browser;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

#[derive(Default)]
struct Lines {
    values: Vec<Value>,
    /// The child's stdout reached end of file.
    closed: bool,
}

/// A child process whose stdout JSON lines are collected; killed (with its
/// process group and every process it announced) on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
    lines: Arc<(Mutex<Lines>, Condvar)>,
}

impl Proc {
    /// Starts `cmd` in a process group of its own, stdout piped (JSON lines
    /// collected), stderr inherited; `OMP_NUM_THREADS=1` and `RUST_LOG=warn`
    /// unless the command sets them.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        let mut child = cmd
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let lines: Arc<(Mutex<Lines>, Condvar)> = Arc::default();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.0.lock().unwrap_or_else(|p| p.into_inner()).values.push(v);
                    sink.1.notify_all();
                }
            }
            sink.0.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
            sink.1.notify_all();
        });
        Proc { child, name: name.to_string(), lines }
    }

    /// A command for `binary` with the environment every test child gets.
    pub fn command(binary: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(binary);
        cmd.env("OMP_NUM_THREADS", "1").env("RUST_LOG", std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "warn".into()));
        cmd
    }

    /// The collected lines. A test that panicked while waiting poisons nothing
    /// for `Drop`: the lock is taken whatever happened before.
    fn guard(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.lines.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every JSON line so far.
    pub fn lines(&self) -> Vec<Value> {
        self.guard().values.clone()
    }

    /// Waits for a line satisfying `pred` and returns it. Panics when the
    /// child's stdout closes (it exited) without one, or at the deadline.
    pub fn wait_line(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let lines = self.lines.clone();
        let (lock, cv) = &*lines;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(v) = g.values.iter().find(|v| pred(v)) {
                return v.clone();
            }
            // Panics below release the lock first, so `Drop` can still read the
            // announced pids and kill them (a poisoned lock there would abort).
            if g.closed {
                drop(g);
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                panic!("{} exited ({status}) before {what}", self.name);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(g);
                panic!("{}: no {what} within {timeout:?}", self.name);
            }
            g = cv.wait_timeout(g, left.min(Duration::from_millis(500))).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Waits for the process to exit; returns its exit code (-1 for a signal).
    /// Its stdout has been read to the end when this returns.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        let code = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "{} did not exit within {timeout:?}", self.name);
            std::thread::sleep(Duration::from_millis(20));
        };
        // Lines written just before exiting are still in the pipe: read them
        // (a grandchild holding the pipe open ends the wait at the deadline).
        let (lock, cv) = &*self.lines;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        while !g.closed {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
            let (next, waited) = cv.wait_timeout(g, left).unwrap_or_else(|p| p.into_inner());
            g = next;
            if waited.timed_out() {
                break;
            }
        }
        code
    }

    /// Sends `signal` (e.g. "INT", "TERM", "KILL") to the process itself.
    /// The child's process id.
    pub fn pid(&self) -> u64 {
        u64::from(self.child.id())
    }

    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -{signal} {} failed", self.child.id());
    }

    /// SIGKILL to the process and its group; waits for it.
    pub fn kill9(&mut self) {
        kill_group(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Processes the child started and announced (each leads its own group).
        for v in self.lines() {
            if matches!(v["event"].as_str(), Some("started" | "restarted")) {
                if let Some(pid) = v["pid"].as_u64() {
                    kill_group(pid as u32);
                }
            }
        }
        self.kill9();
    }
}

/// SIGKILL to process group `pgid` and to the process `pgid` (best effort).
fn kill_group(pgid: u32) {
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}"), &pgid.to_string()]).stderr(Stdio::null()).status();
}

/// SIGKILL to one process by pid; panics if the signal could not be sent.
pub fn kill9(pid: u64) {
    let ok = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill -9 {pid} failed");
}

/// A port that was free a moment ago. Only for processes that cannot report
/// the port they bound; whoever uses it must retry on another port if it was
/// taken in between (see [`Redis::start`]).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A private `redis-server` on loopback, killed on drop: no persistence
/// ([`Redis::start`]) or an append-only file fsynced on every write
/// ([`Redis::start_durable`]), which survives [`Redis::kill9`] and [`Redis::restart`].
pub struct Redis {
    pub proc: Proc,
    pub port: u16,
    pub url: String,
    dir: Option<std::path::PathBuf>,
}

impl Redis {
    /// Starts one on a free port; if the port was taken in between, tries another.
    pub fn start() -> Redis {
        Redis::start_in(None)
    }

    /// Starts one that keeps every acknowledged write in `dir` (AOF, `appendfsync always`).
    pub fn start_durable(dir: &std::path::Path) -> Redis {
        Redis::start_in(Some(dir.to_path_buf()))
    }

    fn start_in(dir: Option<std::path::PathBuf>) -> Redis {
        for _ in 0..10 {
            let port = free_port();
            if let Some(proc) = Redis::spawn(port, dir.as_deref()) {
                return Redis { proc, port, url: format!("redis://127.0.0.1:{port}"), dir };
            }
        }
        panic!("redis-server could not bind a free port in 10 tries (is it installed? scripts/setup.sh does)");
    }

    /// A `redis-server` on `port`, once it answers; `None` if the port was taken.
    fn spawn(port: u16, dir: Option<&std::path::Path>) -> Option<Proc> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--save", "", "--bind", "127.0.0.1"]);
        match dir {
            Some(d) => cmd.args(["--appendonly", "yes", "--appendfsync", "always", "--dir"]).arg(d),
            None => cmd.args(["--appendonly", "no"]),
        };
        let mut proc = Proc::spawn("redis-server", cmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                // Ours, not a squatter: the child is still alive.
                if proc.child.try_wait().unwrap().is_none() {
                    return Some(proc);
                }
            }
            if proc.child.try_wait().unwrap().is_some() {
                return None; // port taken
            }
            assert!(Instant::now() < deadline, "redis-server did not start (scripts/setup.sh installs it)");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server with SIGKILL (no shutdown save).
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Starts the server again on the same port (and directory, if durable).
    pub fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(proc) = Redis::spawn(self.port, self.dir.as_deref()) {
                self.proc = proc;
                return;
            }
            assert!(Instant::now() < deadline, "port {} stayed taken after redis-server was killed", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The Python with `torch`, `transformers` and `tokenizers` that reference
/// checks run: `SLUICE_PYTHON`, else the project's `.venv` (made by
/// `scripts/setup.sh`).
pub fn python() -> std::path::PathBuf {
    match std::env::var_os("SLUICE_PYTHON") {
        Some(p) => p.into(),
        None => {
            let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
            assert!(venv.exists(), "no Python with transformers: run ./scripts/setup.sh (it creates .venv) or set SLUICE_PYTHON");
            venv
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u64) -> bool {
        // A zombie still answers `kill -0`; ask for the state too.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        !stat.is_empty() && !stat.contains(") Z ")
    }

    /// A test that panics while waiting still kills its child and the process
    /// the child announced (in a session of its own, as `sluice dev` children are).
    #[test]
    fn a_panicking_wait_still_kills_the_child_and_what_it_announced() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "setsid sleep 300 & echo \"{\\\"event\\\":\\\"started\\\",\\\"pid\\\":$!}\"; exec sleep 300"]);
        let mut p = Proc::spawn("sh", cmd);
        let started = p.wait_line("started", Duration::from_secs(10), |v| v["event"] == "started");
        let (child, grandchild) = (p.child.id() as u64, started["pid"].as_u64().unwrap());
        assert!(alive(child) && alive(grandchild));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            p.wait_line("never", Duration::from_millis(100), |v| v["event"] == "never");
        }));
        assert!(r.is_err(), "the wait must time out");
        drop(p);
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(grandchild) {
            assert!(Instant::now() < deadline, "the announced process {grandchild} survived");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(child), "the child {child} survived");
    }
}
