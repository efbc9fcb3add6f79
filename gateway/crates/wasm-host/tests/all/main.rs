//! Integration tests of weir-wasm-host with real guests (built on demand by `support`).

mod abi;
mod builtin_filters;
mod callouts;
mod check;
mod containment;
mod grpc_streams;
mod http;
mod sharing;
mod support;
mod tcp;
