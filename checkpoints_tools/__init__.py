"""Sharded checkpoint <-> Hugging Face conversion and resharding (later issues)."""
