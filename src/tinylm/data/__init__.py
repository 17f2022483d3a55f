"""Data: sources of documents, tokenizers, prepared token files and batching."""
