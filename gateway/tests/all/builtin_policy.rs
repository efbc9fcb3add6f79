//! The built-in `ratelimit` and `stats` filters through the gateway.
