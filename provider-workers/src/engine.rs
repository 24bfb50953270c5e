//! What a provider pool runs to turn a prompt into text.

use std::future::Future;

use optiroute_common::nats::RequestMeta;
use optiroute_common::wire::{ProviderRequest, Usage};
use optiroute_common::Error;

/// One generated answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    pub usage: Usage,
    /// The configured model that served it (a bounded set, used as a metric label).
    pub model: String,
    pub finish_reason: Option<String>,
}

pub trait Engine: Send + Sync + 'static {
    fn generate(
        &self,
        meta: &RequestMeta,
        request: &ProviderRequest,
    ) -> impl Future<Output = Result<Generation, Error>> + Send;

    /// `Ok` when the engine can serve, else why not (shown on `/ready`).
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}
