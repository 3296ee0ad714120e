//! The label store: caption hash → helpful / unhelpful, with the caption text
//! kept for reward models that learn from labels.
//!
//! `memory` lives and dies with the process (dev mode); `redis://` keeps labels
//! across reward-server restarts under `sluice:labels:<job id>:label:<hash>` (JSON
//! `{"helpful": bool, "caption": text}`), with `sluice:labels:<job id>:labels` counting them.
//! A label, once written, is never overwritten (`SET NX`).
//!
//! The ranking model learns from pairwise [`Preference`]s instead: Redis keeps
//! them in the list `sluice:labels:<job id>:prefs` (JSON, oldest first) and the hashes of
//! captions already compared in the set `sluice:labels:<job id>:ranked`.

use sluice_core::kinds::StoreUrl;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One label as stored: the verdict and the normalised caption it is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub helpful: bool,
    pub caption: String,
}

/// A judged pair: `outcome` is the probability that `a` is better than `b`
/// (1: a, 0: b, 0.5: tie or no parseable answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preference {
    pub a: String,
    pub b: String,
    pub outcome: f64,
}

/// The in-process store.
#[derive(Debug, Default)]
pub struct Memory {
    labels: HashMap<u64, Stored>,
    order: Vec<u64>,
    prefs: Vec<Preference>,
    ranked: HashSet<u64>,
}

pub enum LabelStore {
    Memory(Mutex<Memory>),
    /// The connection reconnects by itself after Redis restarts (a call during
    /// the outage fails; scoring goes on without intrinsic values meanwhile).
    Redis { conn: redis::aio::ConnectionManager, prefix: String },
}

impl std::fmt::Debug for LabelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabelStore::Memory(_) => write!(f, "LabelStore::Memory"),
            LabelStore::Redis { prefix, .. } => write!(f, "LabelStore::Redis({prefix})"),
        }
    }
}

impl LabelStore {
    /// Opens `memory` or a `redis://` URL for `job`.
    pub async fn open(spec: &StoreUrl, job: &str) -> Result<Self> {
        let spec = match spec {
            StoreUrl::Memory => return Ok(LabelStore::Memory(Mutex::new(Memory::default()))),
            StoreUrl::Redis(url) => url.as_str(),
        };
        let client = redis::Client::open(spec).map_err(|e| Error::Store(format!("{spec}: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_max_delay(1000)
            .set_number_of_retries(1)
            .set_connection_timeout(std::time::Duration::from_secs(2))
            .set_response_timeout(std::time::Duration::from_secs(3));
        let conn = redis::aio::ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| Error::Store(format!("cannot connect to {spec}: {e}")))?;
        Ok(LabelStore::Redis { conn, prefix: format!("sluice:labels:{job}") })
    }

    fn key(prefix: &str, hash: u64) -> String {
        format!("{prefix}:label:{hash:016x}")
    }

    /// The label of each hash (None: not labelled yet).
    pub async fn get_many(&self, hashes: &[u64]) -> Result<Vec<Option<bool>>> {
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            LabelStore::Memory(m) => {
                let m = m.lock().expect("label map");
                Ok(hashes.iter().map(|h| m.labels.get(h).map(|s| s.helpful)).collect())
            }
            LabelStore::Redis { conn, prefix } => {
                let keys: Vec<String> = hashes.iter().map(|&h| Self::key(prefix, h)).collect();
                let mut conn = conn.clone();
                let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
                Ok(values
                    .into_iter()
                    .map(|v| v.and_then(|s| serde_json::from_str::<Stored>(&s).ok()).map(|s| s.helpful))
                    .collect())
            }
        }
    }

    /// Stores labels that do not exist yet; returns how many were new.
    pub async fn put_many(&self, labels: &[(u64, String, bool)]) -> Result<u64> {
        if labels.is_empty() {
            return Ok(0);
        }
        match self {
            LabelStore::Memory(m) => {
                let mut m = m.lock().expect("label map");
                let mut added = 0;
                for (h, caption, helpful) in labels {
                    if !m.labels.contains_key(h) {
                        m.labels.insert(*h, Stored { helpful: *helpful, caption: caption.clone() });
                        m.order.push(*h);
                        added += 1;
                    }
                }
                Ok(added)
            }
            LabelStore::Redis { conn, prefix } => {
                let mut conn = conn.clone();
                let mut pipe = redis::pipe();
                for (h, caption, helpful) in labels {
                    let value = serde_json::to_string(&Stored { helpful: *helpful, caption: caption.clone() })
                        .expect("labels serialise");
                    pipe.cmd("SET").arg(Self::key(prefix, *h)).arg(value).arg("NX");
                }
                let set: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
                let new: Vec<String> =
                    labels.iter().zip(&set).filter(|(_, r)| r.is_some()).map(|((h, _, _), _)| format!("{h:016x}")).collect();
                if !new.is_empty() {
                    let mut pipe = redis::pipe();
                    pipe.cmd("INCRBY").arg(format!("{prefix}:labels")).arg(new.len()).ignore();
                    pipe.cmd("RPUSH").arg(format!("{prefix}:order")).arg(&new).ignore();
                    let _: () = pipe.query_async(&mut conn).await?;
                }
                Ok(new.len() as u64)
            }
        }
    }

    /// The newest `limit` labels as (caption, helpful), oldest first: training data.
    pub async fn recent(&self, limit: usize) -> Result<Vec<(String, bool)>> {
        match self {
            LabelStore::Memory(m) => {
                let m = m.lock().expect("label map");
                let skip = m.order.len().saturating_sub(limit);
                Ok(m.order[skip..].iter().map(|h| &m.labels[h]).map(|s| (s.caption.clone(), s.helpful)).collect())
            }
            LabelStore::Redis { conn, prefix } => {
                let mut conn = conn.clone();
                let hashes: Vec<String> = redis::cmd("LRANGE")
                    .arg(format!("{prefix}:order"))
                    .arg(-(limit as i64))
                    .arg(-1)
                    .query_async(&mut conn)
                    .await?;
                if hashes.is_empty() {
                    return Ok(Vec::new());
                }
                let keys: Vec<String> = hashes.iter().map(|h| format!("{prefix}:label:{h}")).collect();
                let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
                Ok(values
                    .into_iter()
                    .flatten()
                    .filter_map(|v| serde_json::from_str::<Stored>(&v).ok())
                    .map(|s| (s.caption, s.helpful))
                    .collect())
            }
        }
    }

    /// Labels in the store.
    pub async fn count(&self) -> Result<u64> {
        match self {
            LabelStore::Memory(m) => Ok(m.lock().expect("label map").labels.len() as u64),
            LabelStore::Redis { conn, prefix } => {
                let mut conn = conn.clone();
                let n: Option<u64> = redis::cmd("GET").arg(format!("{prefix}:labels")).query_async(&mut conn).await?;
                Ok(n.unwrap_or(0))
            }
        }
    }
}

impl LabelStore {
    /// Stores judged pairs `(hash_a, hash_b, preference)` and marks both captions as compared.
    pub async fn put_preferences(&self, rows: &[(u64, u64, Preference)]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        match self {
            LabelStore::Memory(m) => {
                let mut m = m.lock().expect("label map");
                for (a, b, p) in rows {
                    m.ranked.insert(*a);
                    m.ranked.insert(*b);
                    m.prefs.push(p.clone());
                }
                Ok(())
            }
            LabelStore::Redis { conn, prefix } => {
                let mut conn = conn.clone();
                let json: Vec<String> =
                    rows.iter().map(|(_, _, p)| serde_json::to_string(p).expect("preferences serialise")).collect();
                let hashes: Vec<String> = rows.iter().flat_map(|(a, b, _)| [format!("{a:016x}"), format!("{b:016x}")]).collect();
                let mut pipe = redis::pipe();
                pipe.cmd("RPUSH").arg(format!("{prefix}:prefs")).arg(&json).ignore();
                pipe.cmd("SADD").arg(format!("{prefix}:ranked")).arg(&hashes).ignore();
                let _: () = pipe.query_async(&mut conn).await?;
                Ok(())
            }
        }
    }

    /// Whether each caption has been compared already.
    pub async fn ranked_many(&self, hashes: &[u64]) -> Result<Vec<bool>> {
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            LabelStore::Memory(m) => {
                let m = m.lock().expect("label map");
                Ok(hashes.iter().map(|h| m.ranked.contains(h)).collect())
            }
            LabelStore::Redis { conn, prefix } => {
                let mut conn = conn.clone();
                let members: Vec<String> = hashes.iter().map(|h| format!("{h:016x}")).collect();
                let found: Vec<bool> =
                    redis::cmd("SMISMEMBER").arg(format!("{prefix}:ranked")).arg(&members).query_async(&mut conn).await?;
                Ok(found)
            }
        }
    }

    /// The newest `limit` preferences, oldest first.
    pub async fn preferences(&self, limit: usize) -> Result<Vec<Preference>> {
        match self {
            LabelStore::Memory(m) => {
                let m = m.lock().expect("label map");
                Ok(m.prefs[m.prefs.len().saturating_sub(limit)..].to_vec())
            }
            LabelStore::Redis { conn, prefix } => {
                let mut conn = conn.clone();
                let rows: Vec<String> = redis::cmd("LRANGE")
                    .arg(format!("{prefix}:prefs"))
                    .arg(-(limit as i64))
                    .arg(-1)
                    .query_async(&mut conn)
                    .await?;
                Ok(rows.iter().filter_map(|r| serde_json::from_str(r).ok()).collect())
            }
        }
    }

    /// Preferences in the store.
    pub async fn preference_count(&self) -> Result<u64> {
        match self {
            LabelStore::Memory(m) => Ok(m.lock().expect("label map").prefs.len() as u64),
            LabelStore::Redis { conn, prefix } => {
                let mut conn = conn.clone();
                Ok(redis::cmd("LLEN").arg(format!("{prefix}:prefs")).query_async(&mut conn).await?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_keeps_the_first_label() {
        let s = LabelStore::open(&StoreUrl::Memory, "j").await.unwrap();
        assert_eq!(s.put_many(&[(1, "a".into(), true), (2, "b".into(), false)]).await.unwrap(), 2);
        assert_eq!(s.put_many(&[(1, "a".into(), false)]).await.unwrap(), 0);
        assert_eq!(s.get_many(&[1, 2, 3]).await.unwrap(), vec![Some(true), Some(false), None]);
        assert_eq!(s.count().await.unwrap(), 2);
        assert_eq!(s.recent(10).await.unwrap(), vec![("a".to_string(), true), ("b".to_string(), false)]);
        assert_eq!(s.recent(1).await.unwrap(), vec![("b".to_string(), false)]);
    }

    #[tokio::test]
    async fn memory_store_keeps_preferences_and_marks_compared_captions() {
        let s = LabelStore::open(&StoreUrl::Memory, "j").await.unwrap();
        let p = |a: &str, b: &str, o: f64| Preference { a: a.into(), b: b.into(), outcome: o };
        s.put_preferences(&[(1, 2, p("a", "b", 1.0)), (3, 4, p("c", "d", 0.5))]).await.unwrap();
        assert_eq!(s.ranked_many(&[1, 4, 5]).await.unwrap(), vec![true, true, false]);
        assert_eq!(s.preference_count().await.unwrap(), 2);
        assert_eq!(s.preferences(1).await.unwrap(), vec![p("c", "d", 0.5)]);
    }
}
