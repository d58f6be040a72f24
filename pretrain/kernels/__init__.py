"""Fused losses over vocabulary-parallel logits (losses.py) and their backends: Triton
kernels on CUDA (triton_backend.py), chunked PyTorch twins elsewhere (chunked.py)."""
