//! The built-in `jwt-authn` filter through the gateway.
