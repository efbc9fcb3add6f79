//! Weir SDK for filter authors.
