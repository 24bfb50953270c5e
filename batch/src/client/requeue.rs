//! Resubmission after a key's limits were raised: the lines that ended
//! because of them run again.

use std::collections::HashMap;

use async_nats::jetstream::kv;
use optiroute_common::wire::{self, Format};
use optiroute_common::{Error, ErrorKind};

use super::{js_error, BatchClient};
use crate::counters;
use crate::model::{BatchResult, ResultStatus};

impl BatchClient {
    /// Lines among the first `submitted` whose result is `budget_exceeded`:
    /// their results are removed (and uncounted) so a resubmission runs
    /// them again, after the budget was raised. Line → the removed
    /// result's revision. A status read between the removal and the count
    /// sees the counts one short, and recounts.
    pub(super) async fn requeue_over_budget(
        &self,
        id: &str,
        submitted: u64,
    ) -> Result<HashMap<u64, u64>, Error> {
        let mut out = HashMap::new();
        for line in 1..=submitted {
            let key = format!("{id}.{line}");
            let Some(entry) = self
                .results
                .entry(key.as_str())
                .await
                .map_err(|e| js_error("batch result", e))?
                .filter(|e| e.operation == kv::Operation::Put)
            else {
                continue;
            };
            let r: BatchResult = wire::decode(Format::MsgPack, &entry.value)?;
            // Lines refused for the key's limits (a spent budget, or a rate
            // limit that outlasted the retries) run again.
            let over_budget = r.status == ResultStatus::Error
                && r.error.as_ref().is_some_and(|e| {
                    matches!(e.code, ErrorKind::BudgetExceeded | ErrorKind::RateLimited)
                });
            if !over_budget {
                continue;
            }
            match self
                .results
                .delete_expect_revision(key.as_str(), Some(entry.revision))
                .await
            {
                Ok(()) => {
                    counters::change(&self.meta, id, |c| {
                        c.failed = c.failed.saturating_sub(1);
                        c.verified = false;
                    })
                    .await?;
                    out.insert(line, entry.revision);
                }
                // Another resubmission took it first.
                Err(e) => tracing::debug!(%key, error = %e, "over-budget result changed meanwhile"),
            }
        }
        Ok(out)
    }
}
