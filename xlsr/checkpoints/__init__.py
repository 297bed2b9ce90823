"""Loaders and key maps for foreign checkpoint formats (fairseq, Hugging Face)."""
