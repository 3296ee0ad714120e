//! The actor's link to a learner: the gRPC channel (windows, timeouts, TLS),
//! what the learner said on the ack stream ([`LearnerView`]), waiting on it,
//! and the backoff between reconnects.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_proto::v1::learner_client::LearnerClient;
use sluice_proto::v1::PushAck;
use tokio::sync::Notify;
use sluice_proto::Channel;
use tonic::transport::{ClientTlsConfig, Endpoint};

use crate::error::{Error, Result};

/// What the learner told us on the ack stream.
#[derive(Debug, Default)]
pub(crate) struct LearnerView {
    pub version: u64,
    pub incarnation: u64,
    pub finished: bool,
    pub accepted: u64,
    pub dropped: u64,
    /// The stream ended (with this reason).
    pub closed: Option<String>,
    pub heard: bool,
}

/// The weights broadcast group's address an actor dials: the learner's
/// advertised `host:port`, with an unspecified host (`0.0.0.0`, `[::]`)
/// replaced by the host of the learner `endpoint` the actor reached; `None`
/// when nothing usable was advertised.
pub fn broadcast_addr(endpoint: &str, advertised: &str) -> Option<String> {
    if advertised.is_empty() {
        return None;
    }
    match advertised.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => {
            let uri = endpoint.parse::<tonic::codegen::http::Uri>().ok()?;
            let host = uri.host()?;
            Some(format!("{host}:{}", a.port()))
        }
        _ => Some(advertised.to_string()),
    }
}

/// Doubling backoff between `min` and `max`, reset after a success.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new() -> Self {
        Backoff { next: Duration::from_millis(100), min: Duration::from_millis(100), max: Duration::from_secs(5) }
    }
    pub fn wait(&mut self, stop: &AtomicBool) {
        let until = Instant::now() + self.next;
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.next = (self.next * 2).min(self.max);
    }
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// A gRPC client of a learner (plain HTTP/2) with sluice's message limits and windows.
pub async fn connect(endpoint: &str) -> Result<LearnerClient<Channel>> {
    connect_with(endpoint, None).await
}

/// [`connect`], over TLS when `tls` is given (the endpoint is then `https://`).
pub async fn connect_with(endpoint: &str, tls: Option<&ClientTlsConfig>) -> Result<LearnerClient<Channel>> {
    Ok(LearnerClient::new(channel(endpoint, tls).await?)
        .max_decoding_message_size(sluice_core::limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(sluice_core::limits::MAX_MESSAGE_BYTES))
}

/// The channel every client of the actor uses: short connect timeout, no Nagle,
/// large HTTP/2 windows and frames, optional TLS.
pub async fn channel(endpoint: &str, tls: Option<&ClientTlsConfig>) -> Result<Channel> {
    let transport = |reason: String| Error::Transport { endpoint: endpoint.to_string(), reason };
    let mut ep = Endpoint::from_shared(endpoint.to_string()).map_err(|e| transport(e.to_string()))?;
    if let Some(tls) = tls {
        ep = ep.tls_config(tls.clone()).map_err(|e| transport(e.to_string()))?;
    }
    ep.connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .connect()
        .await
        .map(sluice_proto::serve::Traced)
        .map_err(|e| transport(e.to_string()))
}

/// Blocks until `done(view)` holds or `stop` is set; false when stopped.
pub(crate) fn wait_for(
    rt: &tokio::runtime::Runtime,
    view: &Mutex<LearnerView>,
    notify: &Notify,
    stop: &AtomicBool,
    done: impl Fn(&LearnerView) -> bool,
) -> bool {
    loop {
        if done(&view.lock().expect("view lock")) {
            return true;
        }
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_millis(50), notify.notified()).await;
        });
    }
}

pub(crate) async fn read_acks(mut acks: tonic::Streaming<PushAck>, view: Arc<Mutex<LearnerView>>, notify: Arc<Notify>) {
    loop {
        let msg = acks.message().await;
        {
            let mut v = view.lock().expect("view lock");
            match msg {
                Ok(Some(a)) => {
                    v.heard = true;
                    v.version = a.learner_version;
                    v.incarnation = a.incarnation;
                    v.finished = a.finished;
                    if a.group_id != 0 {
                        if a.accepted {
                            v.accepted += 1;
                        } else {
                            v.dropped += 1;
                        }
                    }
                }
                Ok(None) => v.closed = Some("the learner closed the stream".into()),
                Err(status) => v.closed = Some(status.to_string()),
            }
        }
        notify.notify_waiters();
        if view.lock().expect("view lock").closed.is_some() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let stop = AtomicBool::new(true); // a stopped wait returns at once
        let mut b = Backoff::new();
        let seen: Vec<u128> = (0..8)
            .map(|_| {
                let d = b.next.as_millis();
                b.wait(&stop);
                d
            })
            .collect();
        assert_eq!(seen, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next, Duration::from_millis(100));
    }

    #[test]
    fn an_unspecified_broadcast_host_is_the_learners() {
        assert_eq!(broadcast_addr("http://learner-0.ns.svc:50051", "0.0.0.0:7000").as_deref(), Some("learner-0.ns.svc:7000"));
        assert_eq!(broadcast_addr("https://[::1]:50051", "[::]:7000").as_deref(), Some("[::1]:7000"));
        assert_eq!(broadcast_addr("http://127.0.0.1:1", "10.0.0.5:7000").as_deref(), Some("10.0.0.5:7000"));
        assert_eq!(broadcast_addr("http://127.0.0.1:1", "learner-0:7000").as_deref(), Some("learner-0:7000"));
        assert_eq!(broadcast_addr("http://127.0.0.1:1", ""), None);
    }
}
