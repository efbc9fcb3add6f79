//! gRPC streams from filters (`proxy_grpc_stream`, send, cancel, close) against a real server.
