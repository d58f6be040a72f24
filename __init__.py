"""dlm-pretrain. The repository root is the `dlm_pretrain` package (pyproject.toml maps it), so
its folders install as `dlm_pretrain.parallel`, `dlm_pretrain.launch`, ... and cannot collide
with another distribution's `parallel` or `launch`, nor be shadowed by a script beside them."""
