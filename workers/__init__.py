"""Worker processes that each hold frozen backbones and run batches."""
