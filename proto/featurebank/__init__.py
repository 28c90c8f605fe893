"""featurebank: a shared feature-extraction backend (gRPC + Redis feature cache + frozen TF backbones)."""

__version__ = "0.1.0"
