//! The orchestrator's jobs and their stored events as the dashboard's
//! [`Source`] (`--dashboard ADDR`): live jobs follow their event log, ended
//! ones are read back from it (memory or Redis).

use std::sync::Arc;

use serde_json::Value;
use sluice_dashboard::{Events, Source};
use sluice_proto::jobs::job_json;

use crate::error::Error;
use crate::service::Orchestrator;

/// The orchestrator, read-only.
pub struct Jobs(pub Arc<Orchestrator>);

fn dashboard_error(e: Error) -> sluice_dashboard::Error {
    match e {
        Error::NotFound(what) => sluice_dashboard::Error::NotFound(what),
        other => sluice_dashboard::Error::Unavailable(other.to_string()),
    }
}

impl Source for Jobs {
    async fn jobs(&self) -> sluice_dashboard::Result<Vec<Value>> {
        let (page, _) = self.0.list(sluice_core::limits::MAX_LIST_PAGE, "").await.map_err(dashboard_error)?;
        Ok(page.iter().map(|j| job_json(j, false)).collect())
    }

    async fn job(&self, id: &str) -> sluice_dashboard::Result<Value> {
        Ok(job_json(&self.0.get(id).await.map_err(dashboard_error)?, false))
    }

    async fn events(&self, id: &str, from: u64) -> sluice_dashboard::Result<Events> {
        let (events, state) = self.0.events(id, from).await.map_err(dashboard_error)?;
        Ok(Events { events, finished: state.is_final() })
    }
}
