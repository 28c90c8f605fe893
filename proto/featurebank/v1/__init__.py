"""Generated protobuf and gRPC stubs for featurebank.v1 (run proto/generate.py to refresh)."""
