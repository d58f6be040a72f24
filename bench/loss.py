"""Peak extra memory and time of the head and the losses, forward + backward, on CPU.

    python bench/loss.py [--vocab 32001] [--tokens 8192] [--hidden 384]

For a head (hidden [tokens, d], weight [vocab, d], bias, float32) and each loss:
- straightforward: the head's logits [tokens, vocab], then each formula as the reference
  code writes it (full-vocabulary float32 tensors), autograd through both;
- head, then the loss: our kernels (pretrain.kernels.losses; on CPU the chunked twins) with
  every row's logits in one block, as before the head and the loss were fused;
- fused: the production path, logits a block of rows at a time (losses.BLOCK_BYTES).
Extra memory = peak resident memory during forward + backward minus the resident memory
before it (Linux VmHWM, reset before each run); each variant allocates the same gradients.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
import torch.nn.functional as F
from dlm_pretrain.parallel.head import HeadInput
from dlm_pretrain.pretrain.kernels import losses
from dlm_pretrain.pretrain.objectives import GIDD, MDLM, Duo
from dlm_pretrain.pretrain.objectives.schedule import alpha
from dlm_pretrain.pretrain.objectives.vocab import Vocab

SEQUENCES = 8  # the tokens are 8 sequences


def memory_mib(field: str) -> float:
    """A /proc/self/status memory figure in MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field))
    return int(line.split()[1]) / 1024


def reset_peak_memory() -> float:
    """Reset the peak resident set (VmHWM) to the current one; returns the current MiB."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return memory_mib("VmRSS")


def _measure(step) -> tuple[float, float]:
    """(extra MiB, best seconds of 3) of step()."""
    best, extra = float("inf"), 0.0
    for _ in range(3):
        before = reset_peak_memory()
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
        extra = max(extra, memory_mib("VmHWM") - before)
    return extra, best


def reference_cross_entropy(logits, x0, xt, t, vocab):
    """MDLM's loss as the reference writes it: log_softmax over the vocabulary, gather."""
    log_p = F.log_softmax(logits.masked_fill(~vocab.real, float("-inf")), dim=-1)
    return -log_p.gather(-1, x0[:, None]).squeeze(-1) * (xt == vocab.mask_id)


def reference_duo(logits, x0, xt, t, vocab):
    """Duo's ELBO in the reference's expanded form (docs/algorithms.md §4.3), float32 [N, V]."""
    k = vocab.num_real
    a = alpha(t)[:, None]
    x_hat = F.softmax(logits.masked_fill(~vocab.real, float("-inf")), dim=-1)
    bar_theta = (k * a * x_hat + (1 - a))[:, vocab.real]  # [N, K]
    real_index = torch.cumsum(vocab.real.long(), 0) - 1
    x, z = real_index[x0], real_index[xt]
    delta = (x == z).float()
    c = (1 - a[:, 0]) / (k * a[:, 0] + 1 - a[:, 0])
    log_sum = torch.log(bar_theta).sum(-1)
    log_z = torch.log(bar_theta.gather(-1, z[:, None]).squeeze(-1))
    log_x = torch.log(bar_theta.gather(-1, x[:, None]).squeeze(-1))
    a1 = a[:, 0]
    term1 = k * (1 / ((1 - a1) + k * a1 * delta) - 1 / log_z.exp())
    offset = ((k - 1) * c * delta - (1 / c) * (1 - delta)) * torch.log(c)
    theta = -(delta * c + (1 - delta)) * (log_sum - k * log_z) - (1 - delta) * (
        k * a1 / (1 - a1)
    ) * (log_x - log_z)
    return -(1 - 1e-3) / (k * a1) * (term1 - (theta + offset))


def reference_gidd(logits, x0, xt, t, vocab, p_uniform=0.1):
    """GIDD's loss as its code writes it (docs/algorithms.md §4.5): q_t(.|x) and q_t(.|x̂) as
    float32 [N, V], their logs, the KL summed over the vocabulary, the IS term at z, the
    dynamic weights (2 masked, 1 uniform, x_scale clean)."""
    k = vocab.num_real
    b = 2 * p_uniform / (1 - p_uniform)  # γ = 1
    c = b * (t * (1 - t)).sqrt()[:, None]
    big_c = 1 + c
    beta_pi = (t[:, None] * F.one_hot(torch.tensor(vocab.mask_id), logits.shape[-1])) / big_c
    beta_pi = beta_pi + c * vocab.real / (k * big_c)
    a = (1 - t)[:, None] / big_c
    x_hat = F.softmax(logits.masked_fill(~vocab.real, float("-inf")), dim=-1)
    log_q = (a * F.one_hot(x0, logits.shape[-1]) + beta_pi).log().clamp(min=-1e6)
    log_p = (a * x_hat + beta_pi).log().clamp(min=-1e6)
    kl = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    log_ratio = (log_q - log_p).gather(-1, xt[:, None]).squeeze(-1)
    x_scale = b / (k + 1) * torch.exp(0.5 * torch.sigmoid(-t))
    weight = torch.where(xt == x0, x_scale, torch.where(xt == vocab.mask_id, 2.0, 1.0))
    return weight * (kl + log_ratio.exp() - log_ratio - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32001)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=384)
    args = parser.parse_args()
    n, v, d = args.tokens, args.vocab, args.hidden
    vocab = Vocab.build(v, mask_id=v - 1, never_in_data=(0,))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = (torch.randn(v, d, generator=g) * 2 / d**0.5).requires_grad_()
    bias = torch.zeros(v, requires_grad=True)
    x0 = vocab.real_ids[torch.randint(vocab.num_real, (n,), generator=g)]
    t_seq = torch.linspace(1e-3, 0.999, SEQUENCES)  # one t per sequence, as in training
    t = t_seq.repeat_interleave(n // SEQUENCES)  # per token, for the reference forms
    corrupt = torch.rand(n, generator=g) < t
    masked = torch.where(corrupt, vocab.mask_id, x0)
    uniform = torch.where(corrupt, vocab.real_ids[torch.randint(vocab.num_real, (n,))], x0)
    gidd = GIDD(p_uniform=0.1)
    mixed = gidd.noise(x0.view(SEQUENCES, -1), t_seq, torch.arange(SEQUENCES), vocab).flatten()
    shape = (SEQUENCES, n // SEQUENCES)

    def clear() -> None:
        for p in (hidden, weight, bias):
            p.grad = None

    def straightforward(reference, xt):
        clear()
        reference(F.linear(hidden, weight, bias), x0, xt, t, vocab).mean().backward()

    def ours(objective, xt, block_bytes):
        clear()
        losses.BLOCK_BYTES = block_bytes
        head = HeadInput(hidden.view(shape[1], shape[0], d), weight, bias, None)  # [L, B, d]
        objective.train_loss(head, x0.view(shape), xt.view(shape), t_seq, vocab).backward()

    cases = {
        "MDLM cross-entropy": (masked, reference_cross_entropy, MDLM(loss_type="cross_entropy")),
        "Duo ELBO": (uniform, reference_duo, Duo()),
        "GIDD (p_u = 0.1, dynamic weights)": (mixed, reference_gidd, gidd),
    }
    fused_bytes = losses.BLOCK_BYTES
    print(
        f"{n} tokens x vocab {v}, hidden {d}, float32 (every logit: {n * v * 4 / 2**30:.2f} "
        f"GiB), CPU, {torch.get_num_threads()} threads; fused blocks of "
        f"{losses.rows_per_block(v)} rows"
    )
    for name, (xt, reference, objective) in cases.items():
        print(f"\n{name}:                      extra memory      time")
        base_mem, base_time = _measure(lambda r=reference, z=xt: straightforward(r, z))
        rows = [("straightforward", base_mem, base_time)]
        one_block = _measure(lambda o=objective, z=xt: ours(o, z, 2**62))
        rows.append(("head, then the loss", *one_block))
        rows.append(
            ("fused head+loss", *_measure(lambda o=objective, z=xt: ours(o, z, fused_bytes)))
        )
        for label, mem, seconds in rows:
            print(
                f"  {label:<20} {mem:9.0f} MiB ({mem / base_mem:6.1%})"
                f"  {seconds:6.2f} s ({base_time / seconds:.2f}x)"
            )
        losses.BLOCK_BYTES = fused_bytes


if __name__ == "__main__":
    main()
