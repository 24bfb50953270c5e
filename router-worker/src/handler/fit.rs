//! Where routing's choice meets the caller and the local pool's load:
//! a key limited to one pool, and overflow to the cloud when the local
//! pool could not start the prompt in time.

use optiroute_common::wire::{GenerateRequest, Pool, ProviderChoice};

use super::GenerateHandler;
use crate::access::Caller;
use crate::cache::scoped_cache_key;
use crate::overflow::InPool;
use crate::routing::Decision;

impl GenerateHandler {
    /// Adjusts `decision` to the key's pools and the local pool's load; the
    /// local pool's slot this request counts in, when it goes there.
    pub(super) async fn fit(
        &self,
        decision: &mut Decision,
        req: &GenerateRequest,
        caller: &Caller,
        scope: &str,
    ) -> Option<InPool<'_>> {
        if !self.access.allows(caller, decision.target) {
            // The key may use only the other pool (identify checked one is left).
            decision.target = decision.target.other();
            decision.reason_label = "key_restricted";
            decision.reason = format!("{}; the key allows only this pool", decision.reason);
        }
        let mut local_slot = None;
        if decision.target == Pool::Local {
            let may_overflow =
                req.provider == ProviderChoice::Auto && self.access.allows(caller, Pool::Cloud);
            match self.local_load.claim(may_overflow) {
                Ok(slot) => local_slot = Some(slot),
                // Overflow is for work the local pool would do: an answer
                // it already gave (cached) is served, not paid for again.
                Err(_)
                    if req.cache.reads() && self.cache.enabled() && {
                        let mut local = req.clone();
                        self.access.pin_model(caller, Pool::Local, &mut local);
                        let local_key = scoped_cache_key(&local, Pool::Local, scope);
                        self.cache.fetch(&local_key).await.is_some()
                    } => {}
                Err(wait) => {
                    let wait = wait.map_or_else(
                        || "the local pool is full".to_string(),
                        |w| format!("the local pool's expected wait is {} ms", w.as_millis()),
                    );
                    decision.target = Pool::Cloud;
                    decision.reason_label = "overflow";
                    decision.reason = format!(
                        "overflow: {wait}, past router.routing.local_max_wait_ms = {}; {}",
                        self.local_load.max_wait().as_millis(),
                        decision.reason
                    );
                }
            }
        }
        local_slot
    }
}
