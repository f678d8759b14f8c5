//! COLO (COarse-grained LOck-stepping) replication.
//!
//! Built so far: [`ram_cache`], the secondary's copy of the primary's memory as of the last
//! checkpoint, and [`heartbeat`], the liveness check between the two sides. The checkpoint
//! protocol, failover, the network proxy and block replication come next (issues 6-8); they
//! hook the VM through the `Stateful` trait and the migration library, and devices through
//! their packet-filter and block-backend seams.

pub mod heartbeat;
pub mod ram_cache;
