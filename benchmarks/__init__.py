"""The featurebank performance benchmark: limits, a naive baseline and the server, in one run."""
