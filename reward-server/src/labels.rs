//! The label store: caption hash → helpful / unhelpful, with the caption text
//! kept for reward models that learn from labels.
//!
//! `memory` lives and dies with the process (dev mode); `redis://` keeps labels
//! across reward-server restarts under `sluice:<job>:label:<hash>` (JSON
//! `{"helpful": bool, "caption": text}`), with `sluice:<job>:labels` counting them.
//! A label, once written, is never overwritten (`SET NX`).

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One label as stored: the verdict and the normalised caption it is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub helpful: bool,
    pub caption: String,
}

pub enum LabelStore {
    Memory(Mutex<HashMap<u64, Stored>>),
    Redis { conn: redis::aio::MultiplexedConnection, prefix: String },
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
    pub async fn open(spec: &str, job: &str) -> Result<Self> {
        if spec == "memory" {
            return Ok(LabelStore::Memory(Mutex::new(HashMap::new())));
        }
        let client = redis::Client::open(spec).map_err(|e| Error::Store(format!("{spec}: {e}")))?;
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| Error::Store(format!("cannot connect to {spec}: {e}")))?;
        Ok(LabelStore::Redis { conn, prefix: format!("sluice:{job}") })
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
                Ok(hashes.iter().map(|h| m.get(h).map(|s| s.helpful)).collect())
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
                    if !m.contains_key(h) {
                        m.insert(*h, Stored { helpful: *helpful, caption: caption.clone() });
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
                let mut all: Vec<(u64, &Stored)> = m.iter().map(|(h, s)| (*h, s)).collect();
                all.sort_by_key(|(h, _)| *h);
                let skip = all.len().saturating_sub(limit);
                Ok(all.into_iter().skip(skip).map(|(_, s)| (s.caption.clone(), s.helpful)).collect())
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
            LabelStore::Memory(m) => Ok(m.lock().expect("label map").len() as u64),
            LabelStore::Redis { conn, prefix } => {
                let mut conn = conn.clone();
                let n: Option<u64> = redis::cmd("GET").arg(format!("{prefix}:labels")).query_async(&mut conn).await?;
                Ok(n.unwrap_or(0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_keeps_the_first_label() {
        let s = LabelStore::open("memory", "j").await.unwrap();
        assert_eq!(s.put_many(&[(1, "a".into(), true), (2, "b".into(), false)]).await.unwrap(), 2);
        assert_eq!(s.put_many(&[(1, "a".into(), false)]).await.unwrap(), 0);
        assert_eq!(s.get_many(&[1, 2, 3]).await.unwrap(), vec![Some(true), Some(false), None]);
        assert_eq!(s.count().await.unwrap(), 2);
        assert_eq!(s.recent(10).await.unwrap(), vec![("a".to_string(), true), ("b".to_string(), false)]);
        assert_eq!(s.recent(1).await.unwrap().len(), 1);
    }
}
