//! Black-box tests: the gateway on real sockets (127.0.0.1, port 0) in front of real upstream
//! servers. One test binary made of modules keeps link time down.

mod builtin_jwt;
mod builtin_policy;
mod config;
mod filters;
mod hardening;
mod lifecycle;
mod protocols;
mod routing;
mod streams;
mod support;
mod tcp;
mod upstreams;
mod workers;
