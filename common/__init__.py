"""What the frontends and the engine share: errors, the cache client and its value codec, metrics."""
