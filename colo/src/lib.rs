//! COLO (COarse-grained LOck-stepping) replication.
//!
//! A primary VM (PVM) and a secondary VM (SVM) run in parallel; the primary checkpoints the
//! PVM into the secondary at every interval ([`primary`]), the secondary applies each
//! checkpoint whole through its [`ram_cache`] ([`secondary`]), a [`heartbeat`] on its own
//! connection notices a lost peer, and the failover switch ([`protection`]) lets the survivor
//! go on alone. The VM is reached only through [`vm::ProtectedVm`] — pages, the dirty log,
//! pause/resume and the saved state as opaque bytes — so all of it runs without KVM in tests.
//! `docs/colo.md` has the protocol and its sequence diagram.

pub mod auth;
pub mod block;
pub mod heartbeat;
pub mod primary;
pub mod protection;
pub mod proxy;
pub mod ram_cache;
pub mod record;
pub mod secondary;
pub mod staging;
pub mod status;
pub mod vm;
pub mod wire;

pub use primary::{start_primary, PrimaryConfig};
pub use protection::{Protection, ProtectionError};
pub use record::Reason;
pub use secondary::{start_secondary, SecondaryConfig};
pub use status::{ColoExit, ColoState, ColoStatus, ExitAction, Role};
pub use vm::{Observer, ProtectedVm, SecondaryHost};
