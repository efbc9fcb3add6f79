//! The proxy-wasm host of Weir.
