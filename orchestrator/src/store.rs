//! Where the orchestrator keeps its state: in process memory (`memory`, dev
//! mode: gone with the process) or in Redis (`redis://`, survives restarts).
//!
//! The orchestrator's in-memory state is authoritative while it runs; every
//! mutation is written through to the store before the RPC that caused it is
//! answered, in one `MULTI`/`EXEC` transaction. On start, [`Store::load`]
//! reads back every job.
//!
//! Redis outages: the connection is a [`ConnectionManager`], which reconnects
//! with exponential backoff; a command that fails (Redis down, a timeout)
//! fails the RPC with `UNAVAILABLE` and marks the store [`Store::take_failed`],
//! so the orchestrator throws its in-memory state away and reads it back from
//! Redis before it answers anything else: what a client was told failed may or
//! may not have been written, and only Redis knows.
//!
//! Redis layout (prefix `sluice:orch` unless `--store-prefix` names another,
//! so several orchestrators can share one Redis):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `jobs` | set | job ids |
//! | `next_job` | counter | last job number handed out |
//! | `job:{id}` | string | the job record (JSON: spec, state, counters, cursor) |
//! | `job:{id}:items` | hash | outstanding work items by id (JSON) |
//! | `job:{id}:history` | hash | per-prompt outcomes, last `budget.history` (JSON list) |
//! | `job:{id}:events` | list | the job's events (JSON lines) |
//! | `worker:{id}` | string with TTL | a worker and its lease |

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use sluice_core::budget::History;

use crate::driver::{Changes, Item, Job, JobRecord};
use crate::error::{Error, Result};

/// The key prefix when none is given.
pub const DEFAULT_PREFIX: &str = "sluice:orch";

/// A Redis command that gets no answer within this long fails (and the RPC with it).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// A registered worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    pub id: String,
    pub job: String,
    pub role: String,
    pub name: String,
    pub address: String,
    pub rank: u32,
}

/// The orchestrator's store.
pub enum Store {
    Memory,
    Redis(RedisStore),
}

/// A Redis connection that reconnects by itself, under one key prefix.
pub struct RedisStore {
    conn: ConnectionManager,
    url: String,
    prefix: String,
    /// Set when a command failed: memory may hold what Redis does not.
    failed: AtomicBool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Everything a restarted orchestrator needs.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub jobs: Vec<Job>,
    pub workers: Vec<Worker>,
    pub next_job: u64,
}

impl Store {
    /// Opens `memory` or a `redis://` URL (checked with a PING) under [`DEFAULT_PREFIX`].
    pub async fn open(spec: &str) -> Result<Store> {
        Store::open_prefixed(spec, DEFAULT_PREFIX).await
    }

    /// Opens `memory` or a `redis://` URL whose keys all start with `prefix`.
    pub async fn open_prefixed(spec: &str, prefix: &str) -> Result<Store> {
        if spec == "memory" {
            return Ok(Store::Memory);
        }
        if !(spec.starts_with("redis://") || spec.starts_with("rediss://")) {
            return Err(Error::Invalid(format!("store `{spec}` is not `memory` or a redis:// URL")));
        }
        if prefix.is_empty() || prefix.len() > 64 || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::Invalid(format!("store prefix `{prefix}` must be 1 to 64 characters without spaces")));
        }
        let client = redis::Client::open(spec).map_err(|e| Error::Store(format!("{spec}: {e}")))?;
        // A lost connection is re-made in the background on the next command:
        // one retry after a jittered delay of at most a second (backon's
        // exponential backoff starts at 1 s), then the command fails and the
        // one after it tries again. Callers (workers) back off on UNAVAILABLE.
        let config = ConnectionManagerConfig::new()
            .set_factor(2)
            .set_max_delay(1000)
            .set_number_of_retries(1)
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(RESPONSE_TIMEOUT);
        let connect = ConnectionManager::new_with_config(client, config);
        let mut conn = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .map_err(|_| Error::Store(format!("{spec}: no answer within 10 s")))?
            .map_err(|e| Error::Store(format!("{spec}: {e}")))?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await.map_err(|e| Error::Store(format!("{spec}: {e}")))?;
        Ok(Store::Redis(RedisStore { conn, url: spec.to_string(), prefix: prefix.to_string(), failed: AtomicBool::new(false) }))
    }

    pub fn describe(&self) -> String {
        match self {
            Store::Memory => "memory".into(),
            Store::Redis(r) if r.prefix == DEFAULT_PREFIX => r.url.clone(),
            Store::Redis(r) => format!("{} (prefix {})", r.url, r.prefix),
        }
    }

    /// True once after a command failed since the last call: the caller must
    /// read its state back ([`Store::load`]) before trusting memory again.
    pub fn take_failed(&self) -> bool {
        match self {
            Store::Memory => false,
            Store::Redis(r) => r.failed.swap(false, Ordering::SeqCst),
        }
    }

    /// Whether a command failed and the state was not read back yet.
    pub fn is_failed(&self) -> bool {
        match self {
            Store::Memory => false,
            Store::Redis(r) => r.failed.load(Ordering::SeqCst),
        }
    }

    /// Marks the store failed (memory and Redis may differ).
    pub fn mark_failed(&self) {
        if let Store::Redis(r) = self {
            r.failed.store(true, Ordering::SeqCst);
        }
    }

    /// Writes what `ch` says changed in `job`.
    pub async fn apply(&self, job: &Job, ch: &Changes) -> Result<()> {
        let Store::Redis(r) = self else { return Ok(()) };
        if !ch.record && ch.items.is_empty() && ch.removed_items.is_empty() && ch.events.is_empty() {
            return Ok(());
        }
        let id = &job.rec.id;
        let prefix = &r.prefix;
        let key = format!("{prefix}:job:{id}");
        let mut pipe = redis::pipe();
        pipe.atomic();
        if ch.record {
            pipe.cmd("SET").arg(&key).arg(json(&job.rec)?).ignore();
            pipe.cmd("SADD").arg(format!("{prefix}:jobs")).arg(id).ignore();
        }
        for item in &ch.items {
            pipe.cmd("HSET").arg(format!("{key}:items")).arg(item.id).arg(json(item)?).ignore();
        }
        if !ch.removed_items.is_empty() {
            pipe.cmd("HDEL").arg(format!("{key}:items")).arg(&ch.removed_items).ignore();
        }
        for &prompt in &ch.history {
            pipe.cmd("HSET").arg(format!("{key}:history")).arg(prompt).arg(json(&job.history.outcomes(prompt))?).ignore();
        }
        if !ch.events.is_empty() {
            pipe.cmd("RPUSH").arg(format!("{key}:events")).arg(&ch.events).ignore();
        }
        r.run(|mut c| async move { pipe.query_async::<()>(&mut c).await }).await
    }

    /// The next job number from Redis (persisted, so ids are never reused);
    /// `None` for the memory store, which numbers jobs in memory.
    pub async fn next_job_number(&self) -> Result<Option<u64>> {
        match self {
            Store::Memory => Ok(None),
            Store::Redis(r) => {
                let key = format!("{}:next_job", r.prefix);
                r.run(|mut c| async move { redis::cmd("INCR").arg(key).query_async(&mut c).await }).await.map(Some)
            }
        }
    }

    /// Saves a worker with a lease of `ttl_ms` (renewed by each heartbeat).
    pub async fn put_worker(&self, w: &Worker, ttl_ms: u64) -> Result<()> {
        let Store::Redis(r) = self else { return Ok(()) };
        let mut cmd = redis::cmd("SET");
        cmd.arg(format!("{}:worker:{}", r.prefix, w.id)).arg(json(w)?).arg("PX").arg(ttl_ms.max(1));
        r.run(|mut c| async move { cmd.query_async::<()>(&mut c).await }).await
    }

    pub async fn remove_worker(&self, id: &str) -> Result<()> {
        let Store::Redis(r) = self else { return Ok(()) };
        let key = format!("{}:worker:{id}", r.prefix);
        r.run(|mut c| async move { redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await }).await
    }

    /// Removes a job with its items, history and events, and the workers named.
    pub async fn delete_job(&self, id: &str, workers: &[String]) -> Result<()> {
        let Store::Redis(r) = self else { return Ok(()) };
        let key = format!("{}:job:{id}", r.prefix);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("SREM").arg(format!("{}:jobs", r.prefix)).arg(id).ignore();
        pipe.cmd("DEL").arg(&key).arg(format!("{key}:items")).arg(format!("{key}:history")).arg(format!("{key}:events")).ignore();
        for w in workers {
            pipe.cmd("DEL").arg(format!("{}:worker:{w}", r.prefix)).ignore();
        }
        r.run(|mut c| async move { pipe.query_async::<()>(&mut c).await }).await
    }

    /// Every job (with items, history and events) and every worker whose lease is alive.
    pub async fn load(&self) -> Result<Snapshot> {
        let Store::Redis(r) = self else { return Ok(Snapshot::default()) };
        let out = r.load().await;
        if out.is_err() {
            self.mark_failed();
        }
        out
    }
}

impl RedisStore {
    /// Runs one command (or pipeline) on a clone of the connection; a failure
    /// marks the store failed.
    async fn run<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(RESPONSE_TIMEOUT * 2, f(self.conn.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.failed.store(true, Ordering::SeqCst);
                Err(Error::Store(format!("{}: {e}", self.url)))
            }
            Err(_) => {
                self.failed.store(true, Ordering::SeqCst);
                Err(Error::Store(format!("{}: no answer within {} s", self.url, (RESPONSE_TIMEOUT * 2).as_secs())))
            }
        }
    }

    async fn load(&self) -> Result<Snapshot> {
        let prefix = &self.prefix;
        let mut conn = self.conn.clone();
        let mut snap = Snapshot::default();
        let ids: Vec<String> = redis::cmd("SMEMBERS").arg(format!("{prefix}:jobs")).query_async(&mut conn).await?;
        for id in ids {
            let key = format!("{prefix}:job:{id}");
            let Some(rec): Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await? else {
                continue;
            };
            let rec: JobRecord = parse(&rec, &key)?;
            let items: Vec<(u64, String)> = redis::cmd("HGETALL").arg(format!("{key}:items")).query_async(&mut conn).await?;
            let items = items.iter().map(|(_, v)| parse::<Item>(v, &key)).collect::<Result<Vec<_>>>()?;
            let rows: Vec<(u64, String)> = redis::cmd("HGETALL").arg(format!("{key}:history")).query_async(&mut conn).await?;
            let cfg = sluice_core::config::JobConfig::from_toml(&rec.spec_toml)?;
            let mut history = History::new(cfg.budget.history);
            for (prompt, v) in rows {
                history.set(prompt, parse(&v, &key)?);
            }
            let events: Vec<String> = redis::cmd("LRANGE").arg(format!("{key}:events")).arg(0).arg(-1).query_async(&mut conn).await?;
            snap.jobs.push(Job::restore(rec, items, history, events)?);
        }
        let keys: Vec<String> = scan(&mut conn, &format!("{prefix}:worker:*")).await?;
        for k in keys {
            if let Some(v) = redis::cmd("GET").arg(&k).query_async::<Option<String>>(&mut conn).await? {
                snap.workers.push(parse(&v, &k)?);
            }
        }
        snap.next_job = redis::cmd("GET").arg(format!("{prefix}:next_job")).query_async::<Option<u64>>(&mut conn).await?.unwrap_or(0);
        Ok(snap)
    }
}

async fn scan(conn: &mut ConnectionManager, pattern: &str) -> Result<Vec<String>> {
    let mut cursor = 0u64;
    let mut out = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(500).query_async(conn).await?;
        out.extend(keys);
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}

fn json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Store(format!("encoding: {e}")))
}

fn parse<T: for<'de> Deserialize<'de>>(v: &str, key: &str) -> Result<T> {
    serde_json::from_str(v).map_err(|e| Error::Store(format!("{key}: unreadable value: {e}")))
}
