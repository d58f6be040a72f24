"""Fused losses over vocabulary-parallel logits. `chunked`: the PyTorch twins (CPU)."""
