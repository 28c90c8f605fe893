"""The gRPC frontend: hashing, cache, batching, servicer, metrics."""
