//! COLO (COarse-grained LOck-stepping) replication.
//!
//! Built so far: [`ram_cache`], the secondary's copy of the primary's memory as of the last
//! checkpoint. Checkpoint protocol, heartbeat, failover, the network proxy and block
//! replication come next (issues 6-8); they hook the VM through the `Stateful` trait and the
//! migration library, and devices through their packet-filter and block-backend seams.

pub mod ram_cache;
