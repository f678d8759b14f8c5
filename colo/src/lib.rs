//! COLO replication (checkpoints, RAM cache, proxy, block replication, failover): built in later issues.
