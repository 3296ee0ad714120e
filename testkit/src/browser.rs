//! A real browser for tests: Debian's headless Chromium driven through
//! chromedriver's W3C WebDriver API (JSON over HTTP/1.1 on loopback).
//!
//! [`Browser::start`] returns `None` (the caller prints that it skipped) when
//! `chromium` or `chromedriver` is not installed; `scripts/setup.sh` installs
//! both.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{free_port, Proc};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// One headless Chromium session; the driver (and the browser) die on drop.
pub struct Browser {
    driver: String,
    session: String,
    _driver: Proc,
    _profile: tempfile_dir::Dir,
}

/// A fresh, empty profile directory removed on drop.
mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `(status, body)` of one HTTP/1.1 request to `addr` (`host:port`) with
/// extra `headers` and a JSON `body`.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&Value>) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // Read by Content-Length: chromedriver says `Connection: close` but keeps the socket open.
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf)?;
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw);
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let header = |name: &str| {
                head.lines().find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string()))
            };
            let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            let complete = match (header("content-length").and_then(|v| v.parse::<usize>().ok()), header("transfer-encoding")) {
                (Some(len), _) => rest.len() >= len,
                (None, Some(te)) if te.contains("chunked") => rest.contains("\r\n0\r\n\r\n") || rest.starts_with("0\r\n"),
                _ => n == 0,
            };
            if complete || n == 0 {
                let chunked = header("transfer-encoding").is_some_and(|t| t.contains("chunked"));
                return Ok((status, if chunked { dechunk(rest) } else { rest.to_string() }));
            }
        }
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed before the headers ended"));
        }
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session with a
    /// `width`×`height` window; `None` when either program is missing.
    pub fn start(width: u32, height: u32) -> Option<Browser> {
        if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
            return None;
        }
        let port = free_port();
        let mut cmd = Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}")).stderr(Stdio::null());
        let driver = Proc::spawn("chromedriver", cmd);
        let deadline = Instant::now() + Duration::from_secs(30);
        let driver_addr = format!("127.0.0.1:{port}");
        while http(&driver_addr, "GET", "/status", &[], None).map_or(true, |(_, b)| !b.contains("\"ready\":true")) {
            assert!(Instant::now() < deadline, "chromedriver did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = std::env::temp_dir().join(format!("sluice-chromium-{}-{port}", std::process::id()));
        // The flags a closed network needs: no background fetches that would be refused.
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", profile.display()),
            &format!("--window-size={width},{height}"),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let (status, body) = http(&driver_addr, "POST", "/session", &[], Some(&caps)).expect("new WebDriver session");
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let session = v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session ({status}): {body}")).to_string();
        Some(Browser { driver: driver_addr, session, _driver: driver, _profile: tempfile_dir::Dir(profile) })
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, text) = http(&self.driver, method, &format!("/session/{}{path}", self.session), &[], body).expect("WebDriver call");
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert!(status == 200, "WebDriver {method} {path}: {status} {text}");
        v["value"].clone()
    }

    /// Opens `url` (waits for the page's load event).
    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(&json!({ "url": url })));
    }

    /// Runs `script` (a function body: `return ...`) in the page; its result.
    pub fn eval(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", Some(&json!({ "script": script, "args": [] })))
    }

    /// Evaluates `script` until `pred` holds of its result; panics with the
    /// last result after `timeout`.
    pub fn wait_for(&self, what: &str, script: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(script);
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "no {what} within {timeout:?}: last {v}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The address the page is at now.
    pub fn url(&self) -> String {
        self.call("GET", "/url", None).as_str().unwrap_or_default().to_string()
    }

    /// A PNG of the window.
    pub fn screenshot(&self) -> Vec<u8> {
        let b64 = self.call("GET", "/screenshot", None);
        base64_decode(b64.as_str().expect("base64 PNG"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(&self.driver, "DELETE", &format!("/session/{}", self.session), &[], None);
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let digits: Vec<u32> = s.bytes().filter_map(val).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, d)| acc | (d << (18 - 6 * i)));
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_round_trips_known_values() {
        assert_eq!(super::base64_decode("aGVsbG8="), b"hello");
        assert_eq!(super::base64_decode("aGk="), b"hi");
        assert_eq!(super::base64_decode("YWJj"), b"abc");
    }
}
