//! Where the orchestrator keeps its state: in process memory (`memory`, dev
//! mode: gone with the process) or in Redis (`redis://`, survives restarts).
//!
//! The orchestrator's in-memory state is authoritative while it runs; every
//! mutation is written through to the store before the RPC that caused it is
//! answered, in one `MULTI`/`EXEC` transaction. On start, [`Store::load`]
//! reads back every job. Redis layout (prefix `sluice:orch`):
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

use serde::{Deserialize, Serialize};
use sluice_core::budget::History;

use crate::driver::{Changes, Item, Job, JobRecord};
use crate::error::{Error, Result};

const PREFIX: &str = "sluice:orch";

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
    Redis { conn: redis::aio::MultiplexedConnection, url: String },
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
    /// Opens `memory` or a `redis://` URL (checked with a PING).
    pub async fn open(spec: &str) -> Result<Store> {
        if spec == "memory" {
            return Ok(Store::Memory);
        }
        if !(spec.starts_with("redis://") || spec.starts_with("rediss://")) {
            return Err(Error::Invalid(format!("store `{spec}` is not `memory` or a redis:// URL")));
        }
        let client = redis::Client::open(spec).map_err(|e| Error::Store(format!("{spec}: {e}")))?;
        let connect = client.get_multiplexed_async_connection();
        let mut conn = tokio::time::timeout(std::time::Duration::from_secs(5), connect)
            .await
            .map_err(|_| Error::Store(format!("{spec}: no answer within 5 s")))?
            .map_err(|e| Error::Store(format!("{spec}: {e}")))?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await.map_err(|e| Error::Store(format!("{spec}: {e}")))?;
        Ok(Store::Redis { conn, url: spec.to_string() })
    }

    pub fn describe(&self) -> String {
        match self {
            Store::Memory => "memory".into(),
            Store::Redis { url, .. } => url.clone(),
        }
    }

    /// Writes what `ch` says changed in `job`.
    pub async fn apply(&self, job: &Job, ch: &Changes) -> Result<()> {
        let Store::Redis { conn, .. } = self else { return Ok(()) };
        if !ch.record && ch.items.is_empty() && ch.removed_items.is_empty() && ch.events.is_empty() {
            return Ok(());
        }
        let id = &job.rec.id;
        let key = format!("{PREFIX}:job:{id}");
        let mut pipe = redis::pipe();
        pipe.atomic();
        if ch.record {
            pipe.cmd("SET").arg(&key).arg(json(&job.rec)?).ignore();
            pipe.cmd("SADD").arg(format!("{PREFIX}:jobs")).arg(id).ignore();
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
        let mut conn = conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// The next job number (persisted in Redis so ids are never reused).
    pub async fn next_job_number(&self, memory_next: u64) -> Result<u64> {
        match self {
            Store::Memory => Ok(memory_next),
            Store::Redis { conn, .. } => {
                let mut conn = conn.clone();
                Ok(redis::cmd("INCR").arg(format!("{PREFIX}:next_job")).query_async(&mut conn).await?)
            }
        }
    }

    /// Saves a worker with a lease of `ttl_ms` (renewed by each heartbeat).
    pub async fn put_worker(&self, w: &Worker, ttl_ms: u64) -> Result<()> {
        let Store::Redis { conn, .. } = self else { return Ok(()) };
        let mut conn = conn.clone();
        redis::cmd("SET")
            .arg(format!("{PREFIX}:worker:{}", w.id))
            .arg(json(w)?)
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    pub async fn remove_worker(&self, id: &str) -> Result<()> {
        let Store::Redis { conn, .. } = self else { return Ok(()) };
        let mut conn = conn.clone();
        redis::cmd("DEL").arg(format!("{PREFIX}:worker:{id}")).query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// Every job (with items, history and events) and every worker whose lease is alive.
    pub async fn load(&self) -> Result<Snapshot> {
        let Store::Redis { conn, .. } = self else { return Ok(Snapshot::default()) };
        let mut conn = conn.clone();
        let mut snap = Snapshot::default();
        let ids: Vec<String> = redis::cmd("SMEMBERS").arg(format!("{PREFIX}:jobs")).query_async(&mut conn).await?;
        for id in ids {
            let key = format!("{PREFIX}:job:{id}");
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
        let keys: Vec<String> = scan(&mut conn, &format!("{PREFIX}:worker:*")).await?;
        for k in keys {
            if let Some(v) = redis::cmd("GET").arg(&k).query_async::<Option<String>>(&mut conn).await? {
                snap.workers.push(parse(&v, &k)?);
            }
        }
        snap.next_job = redis::cmd("GET").arg(format!("{PREFIX}:next_job")).query_async::<Option<u64>>(&mut conn).await?.unwrap_or(0);
        Ok(snap)
    }
}

async fn scan(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Result<Vec<String>> {
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
