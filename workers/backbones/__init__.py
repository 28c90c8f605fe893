"""Frozen backbones: one module each, looked up by name in the registry."""
