//! Weir's load-testing harness.
//!
//! - [`generator`]: the load generator (closed and open loop, HTTP/1.1, h2c, TLS, a new
//!   connection per request), measuring latency into HDR histograms ([`report`]), with the open
//!   loop's [`schedule`] free of coordinated omission.
//! - [`upstream`]: the fast benchmark upstream answering fixed bodies.
//! - [`bench`]: the runner that starts the upstream, Weir and its peers (nginx, HAProxy, Caddy,
//!   Traefik) with equivalent configurations and runs each scenario on all of them in turn.
//! - [`report`] and [`svg`]: results as JSON, Markdown and an SVG latency chart.

pub mod bench;
pub mod cli;
pub mod generator;
pub mod report;
pub mod schedule;
pub mod svg;
pub mod tls;
pub mod upstream;
