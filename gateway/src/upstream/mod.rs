//! Upstreams: clusters of endpoints, load balancing, connection pools, health and retries.

pub mod cluster;
pub mod connector;
pub mod endpoint;
pub mod h2pool;
pub mod lb;
pub mod retry;
