//! Weir SDK for filter authors.

pub mod address;
