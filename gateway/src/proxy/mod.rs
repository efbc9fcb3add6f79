//! The proxy: what happens to one request after the HTTP codec hands it over.

pub mod filtered;
pub mod forward;
pub mod logged_body;
pub mod service;
