"""The objectives, one module each with the same functions (STYLE.md §10):

noise(x0, t, sample_ids, seed, vocab) -> xt           corruption, keyed by sample and position
time_input(t) -> s                                    the scalar the adaLN conditioning sees
per_token_loss(logits, x0, xt, t, vocab, group) -> [B, L]   the training loss per token, f32
validation_loss(logits, x0, xt, t, vocab, group) -> [B, L]  the ELBO (exact NLL for AR)
CAUSAL                                                the attention pattern

logits are this rank's vocabulary shard [B, L, V/tp]; `group` is the tensor-parallel group
that holds the other shards (None: the whole vocabulary). `fused=True` computes the losses
with the memory-lean kernels of pretrain.kernels (same results).
"""

from dlm_pretrain.pretrain.objectives import ar, duo, mdlm

OBJECTIVES = {"ar": ar, "mdlm": mdlm, "duo": duo}
