//! Weir SDK for filter authors.

pub mod address;
pub mod properties;
