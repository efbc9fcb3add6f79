//! TCP listeners: proxying to a cluster and proxy-wasm network filters.
