"""Float64 references for every loss, written from the formulas of docs/algorithms.md §4 as
straightforwardly as possible (full-vocabulary tensors, autograd for the gradients). They
never call the code under test; the production losses (pretrain.objectives over the kernels
of pretrain.kernels.losses) are held to them in test_objectives.py and test_kernels.py.

Each takes logits [B, L, V] (any float dtype, widened to float64), x0, xt [B, L] int64, t [B]
and a Vocab; non-real ids have probability zero (zero-masking, docs/algorithms.md §4.1).
"""

from __future__ import annotations

import math

import torch
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor

EPS = 1e-3  # alpha_t = 1 - (1 - EPS) t, the log-linear schedule (docs/algorithms.md §2.1)


def alpha(t: Tensor) -> Tensor:
    return 1 - (1 - EPS) * t.double()


def log_probs(logits: Tensor, vocab: Vocab) -> Tensor:
    """float64 log softmax over the real ids; -inf elsewhere. -> [B, L, V]"""
    z = logits.double().masked_fill(~vocab.real, -math.inf)
    return z - torch.logsumexp(z, -1, keepdim=True)


def ar(logits: Tensor, x0: Tensor, xt: Tensor, t: Tensor, vocab: Vocab) -> Tensor:
    """docs/algorithms.md §4.7: -log x̂[x0 at l + 1] from position l. -> [B, L - 1]"""
    return -log_probs(logits, vocab)[:, :-1].gather(-1, x0[:, 1:, None]).squeeze(-1)


def mdlm_cross_entropy(logits, x0, xt, t, vocab: Vocab) -> Tensor:
    """docs/algorithms.md §4.2 low_var: CE on masked tokens, 0 elsewhere. -> [B, L]"""
    ce = -log_probs(logits, vocab).gather(-1, x0[..., None]).squeeze(-1)
    return torch.where(xt == vocab.mask_id, ce, 0.0)


def mdlm_elbo(logits, x0, xt, t, vocab: Vocab) -> Tensor:
    """docs/algorithms.md §4.2 ELBO of the log-linear schedule: (1/t) CE on masked tokens. ->
    [B, L]"""
    return mdlm_cross_entropy(logits, x0, xt, t, vocab) / t.double()[:, None]


def duo_compact(logits, x0, xt, t, vocab: Vocab) -> Tensor:
    """docs/algorithms.md §4.3 compact form over the K real ids. -> [B, L]"""
    k, real = vocab.num_real, vocab.real
    p = log_probs(logits, vocab).exp()[..., real]  # [B, L, K]
    real_index = torch.cumsum(real.long(), 0) - 1
    x, z = real_index[x0], real_index[xt]
    a = alpha(t)[:, None, None]
    a_prime = -(1 - EPS)
    bar = k * a * torch.nn.functional.one_hot(x, k).double() + (1 - a)
    bar_theta = k * a * p + (1 - a)
    bar_z = bar.gather(-1, z[..., None])
    bar_theta_z = bar_theta.gather(-1, z[..., None])
    log_ratio = torch.log(bar_theta_z * bar / (bar_theta * bar_z))
    sum_term = (bar / bar_z * log_ratio).sum(-1, keepdim=True)
    return (a_prime / (k * a) * (k / bar_z - k / bar_theta_z - sum_term)).squeeze(-1)


def duo_expanded(logits, x0, xt, t, vocab: Vocab) -> Tensor:
    """docs/algorithms.md §4.3 expanded form as the reference code organises it. -> [B, L]"""
    k, real = vocab.num_real, vocab.real
    p = log_probs(logits, vocab).exp()[..., real]
    real_index = torch.cumsum(real.long(), 0) - 1
    x, z = real_index[x0], real_index[xt]
    a = alpha(t)[:, None]
    a_prime = -(1 - EPS)
    delta = (x == z).double()
    c = (1 - a) / (k * a + 1 - a)
    bar_theta = k * a[..., None] * p + (1 - a[..., None])
    s = torch.log(bar_theta).sum(-1)
    log_theta_z = torch.log(bar_theta.gather(-1, z[..., None]).squeeze(-1))
    log_theta_x = torch.log(bar_theta.gather(-1, x[..., None]).squeeze(-1))
    coeff = a_prime / (k * a)
    term1 = k * (1 / ((1 - a) + k * a * delta) - 1 / log_theta_z.exp())
    offset = ((k - 1) * c * delta - (1 / c) * (1 - delta)) * torch.log(c)
    theta = -(delta * c + (1 - delta)) * (s - k * log_theta_z) - (1 - delta) * (k * a / (1 - a)) * (
        log_theta_x - log_theta_z
    )
    return coeff * (term1 - (theta + offset))


def gidd_mixing(t: Tensor, vocab: Vocab, p_u: float, gamma: float) -> tuple[Tensor, Tensor]:
    """docs/algorithms.md §3.4 over the real ids: alpha_t [B, 1] and β_t π_t [B, V]."""
    log_b = max(gamma * math.log(2) + math.log(max(p_u, math.exp(-20)) / (1 - p_u)), -20)
    t = t.double()[:, None]
    c = math.exp(log_b) * t ** (gamma / 2) * (1 - t) ** (gamma / 2)
    at_mask = torch.nn.functional.one_hot(torch.tensor(vocab.mask_id), vocab.size).double()
    beta_pi = (t * at_mask + c * vocab.real.double() / vocab.num_real) / (1 + c)
    return (1 - t) / (1 + c), beta_pi


def gidd(p_u: float, gamma: float, weighting: str):
    """docs/algorithms.md §4.5 from its definition: w (KL(q_t(.|x) ‖ q_t(.|x̂)) + ρ - log ρ - 1)
    on dense [B, L, V] distributions. The ELBO weight is the general one of GIDD,
    w = e_z·((βπ)' - (alpha'/alpha) βπ) / q_t(z|x), its derivatives taken by forward-mode
    autodiff in t, not the closed forms."""

    def loss(logits, x0, xt, t, vocab: Vocab) -> Tensor:
        alpha_t, beta_pi = gidd_mixing(t, vocab, p_u, gamma)
        ones = torch.ones_like(t, dtype=torch.float64)
        mixing = lambda s: gidd_mixing(s, vocab, p_u, gamma)  # noqa: E731
        _, (d_alpha, d_beta_pi) = torch.func.jvp(mixing, (t.double(),), (ones,))
        a, bp = alpha_t[..., None], beta_pi[:, None]  # [B, 1, 1], [B, 1, V]
        q = a * torch.nn.functional.one_hot(x0, vocab.size).double() + bp
        p = a * log_probs(logits, vocab).exp() + bp
        support = q > 0  # the real ids and the mask; elsewhere both are 0
        q_in, p_in = torch.where(support, q, 1.0), torch.where(support, p, 1.0)
        kl = (q * (q_in.log() - p_in.log())).sum(-1)
        rho = q.gather(-1, xt[..., None]).squeeze(-1) / p.gather(-1, xt[..., None]).squeeze(-1)
        rate = d_beta_pi - d_alpha / alpha_t * beta_pi  # [B, V]
        elbo = rate.gather(-1, xt) / q.gather(-1, xt[..., None]).squeeze(-1)
        masked, clean = xt == vocab.mask_id, xt == x0
        if weighting == "dynamic":
            b = math.exp(max(gamma * math.log(2) + math.log(p_u / (1 - p_u)), -20))
            x_scale = b / (vocab.num_real + 1) * torch.exp(gamma / 2 * torch.sigmoid(-t.double()))
            noise = torch.where(masked, 2.0, 1.0).double()
            weight = torch.where(clean, x_scale[:, None], noise).clamp(0, 2)
        else:
            weight = elbo.clamp(0, 2) if weighting == "clip" else elbo
        return weight * (kl + rho - rho.log() - 1)

    return loss


def esolm(alpha_0: float, loss_type: str):
    """docs/algorithms.md §4.4 on a sorted micro-batch whose sequential rows have t = 0: CE on
    masked tokens, diffusion rows weighted by -alpha'/(1 - alpha) of alpha = alpha_0 (1 -
    (1 - EPS) t) for the ELBO, each branch's rows scaled by B / (rows of the branch)."""

    def loss(logits, x0, xt, t, vocab: Vocab) -> Tensor:
        ce = mdlm_cross_entropy(logits, x0, xt, t, vocab)
        t = t.double()[:, None]
        sequential = t == 0
        elbo = alpha_0 * (1 - EPS) / (1 - alpha_0 * alpha(t))
        weight = torch.where(sequential, 1.0, elbo if loss_type == "elbo" else 1.0)
        rows = torch.where(sequential, sequential.sum(), (~sequential).sum())
        return ce * weight * len(t) / rows

    return loss


# Per test case (test_objectives.CASES): the training loss and the validation bound.
TRAINING = {
    "ar": ar,
    "mdlm-elbo": mdlm_elbo,
    "mdlm-ce": mdlm_cross_entropy,
    "duo": duo_compact,
    "gidd-dynamic": gidd(0.1, 1.0, "dynamic"),
    "gidd-clip": gidd(0.1, 1.0, "clip"),
    "gidd-elbo": gidd(0.2, 1.5, "elbo"),
    "esolm-elbo": mdlm_elbo,  # alpha_0 = 1: MDLM's losses, in sorted space
    "esolm-ce": mdlm_cross_entropy,
}
VALIDATION = {
    "ar": ar,
    "mdlm-elbo": mdlm_elbo,
    "mdlm-ce": mdlm_elbo,
    "duo": duo_compact,
    "gidd-dynamic": gidd(0.1, 1.0, "elbo"),
    "gidd-clip": gidd(0.1, 1.0, "elbo"),
    "gidd-elbo": gidd(0.2, 1.5, "elbo"),
    "esolm-elbo": mdlm_elbo,
    "esolm-ce": mdlm_elbo,
}
