"""Peak extra memory and time of the losses' forward + backward on CPU.

    python bench/loss.py [--vocab 32001] [--tokens 8192]

For float32 logits [tokens, vocab]: the straightforward implementation of each formula as
the reference code writes it (full-vocabulary float32 tensors) and the production loss (the
objective over pretrain.kernels.losses; on CPU its chunked twin, pretrain.kernels.chunked).
Extra memory = peak resident memory
during forward + backward, minus the resident memory before it and minus the logits'
gradient every variant must produce (Linux VmHWM, reset before each run).
Target: the production loss's extra memory at most 10% of the straightforward one's, and no slower.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
import torch.nn.functional as F
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


def _measure(fn, logits: torch.Tensor) -> tuple[float, float]:
    """(extra MiB, best seconds of 3) of fn(logits).sum().backward()."""
    best = float("inf")
    for _ in range(3):
        logits.grad = None
        before = reset_peak_memory()
        start = time.perf_counter()
        fn(logits).sum().backward()
        best = min(best, time.perf_counter() - start)
        extra = memory_mib("VmHWM") - before - logits.numel() * logits.element_size() / 2**20
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
    args = parser.parse_args()
    n, v = args.tokens, args.vocab
    vocab = Vocab.build(v, mask_id=v - 1, never_in_data=(0,))
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, v, generator=g) * 2).requires_grad_()
    x0 = vocab.real_ids[torch.randint(vocab.num_real, (n,), generator=g)]
    t_seq = torch.linspace(1e-3, 0.999, SEQUENCES)  # one t per sequence, as in training
    t = t_seq.repeat_interleave(n // SEQUENCES)  # per token, for the reference forms
    corrupt = torch.rand(n, generator=g) < t
    masked = torch.where(corrupt, vocab.mask_id, x0)
    uniform = torch.where(corrupt, vocab.real_ids[torch.randint(vocab.num_real, (n,))], x0)
    gidd = GIDD(p_uniform=0.1)
    mixed = gidd.noise(x0.view(SEQUENCES, -1), t_seq, torch.arange(SEQUENCES), vocab).flatten()

    def ours(objective, xt):
        def loss(lg):
            shape = (SEQUENCES, n // SEQUENCES)
            return objective.per_token_loss(
                lg.view(*shape, v), x0.view(shape), xt.view(shape), t_seq, vocab
            )

        return loss

    cases = {
        "MDLM cross-entropy": (masked, reference_cross_entropy, MDLM(loss_type="cross_entropy")),
        "Duo ELBO": (uniform, reference_duo, Duo()),
        "GIDD (p_u = 0.1, dynamic weights)": (mixed, reference_gidd, gidd),
    }
    print(
        f"{n} tokens x vocab {v}, float32 logits ({n * v * 4 / 2**30:.2f} GiB), CPU, "
        f"{torch.get_num_threads()} threads"
    )
    for name, (xt, reference, objective) in cases.items():
        print(f"\n{name}:                  extra memory      time")
        base_mem, base_time = _measure(lambda lg, r=reference, z=xt: r(lg, x0, z, t, vocab), logits)
        rows = [("straightforward", base_mem, base_time)]
        rows.append(("production", *_measure(ours(objective, xt), logits)))
        for label, mem, seconds in rows:
            print(
                f"  {label:<16} {mem:9.0f} MiB ({mem / base_mem:6.1%})"
                f"  {seconds:6.2f} s ({base_time / seconds:.2f}x)"
            )


if __name__ == "__main__":
    main()
