//! Network (TCP) filters: the connection callbacks and the downstream/upstream data buffers.
