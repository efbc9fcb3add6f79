//! Routing: the compiled table and pure request matching.

pub mod matcher;
pub mod table;
