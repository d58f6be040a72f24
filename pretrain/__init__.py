"""Objectives, fused kernels, the training loop, sampling and evaluation (issue 3 onward)."""
