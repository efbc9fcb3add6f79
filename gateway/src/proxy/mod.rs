//! The proxy: what happens to one request after the HTTP codec hands it over, and to one
//! connection of a `tcp` listener (`tcp.rs`).

pub mod filtered;
pub mod forward;
pub mod logged_body;
pub mod response_flags;
pub mod service;
pub mod tcp;
