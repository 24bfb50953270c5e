//! Users of OptiRoute: API keys and teams (stored hashed in JetStream KV,
//! followed in memory by every process), budgets and rate limits shared by
//! every replica through leases on KV counters, and one spend record per
//! served request.

pub mod directory;
pub mod ledger;
pub mod model;
pub mod spend;
pub mod store;

pub use directory::Directory;
pub use model::{to_nanos, to_usd, KeyRecord, Nanos, Period, TeamRecord};
pub use store::{AccountStore, CreatedKey, KeyChanges, NewKey, NewTeam, TeamChanges};
