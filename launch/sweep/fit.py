"""Scaling laws from an IsoFLOP sweep (docs/scaling.md).

Per objective: at each budget C a parabola in ln N gives the compute-optimal size N*(C) and
loss L*(C) (§1); across budgets N*(C) = a·C^b and L*(C) = E + A·C^-alpha (§2, §3); a
residual bootstrap gives every parameter a 95% interval (§4). Between objectives, the
compute multiplier says how much compute one needs to reach another's loss (§5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from dlm_pretrain.common.errors import DataError
from scipy import optimize, stats

MIN_SIZES = 3  # a parabola has three coefficients
MIN_BUDGETS = 2  # a line in log-log
MIN_BUDGETS_FOR_E = 4  # three parameters plus one residual degree of freedom for the F-test
E_TEST_LEVEL = 0.05  # the F-test level at which E must improve the residual
CI_LEVEL = 95.0


class FitError(DataError, ValueError):
    """Sweep results that cannot be fitted: a DataError for the CLI, a ValueError for callers."""


@dataclass(frozen=True)
class RunResult:
    objective: str  # "ar", "mdlm", "duo", ...
    budget: float  # training FLOPs C of the run
    parameters: float  # N, the parameter count the sweep uses on its x axis
    loss: float  # final validation loss (nats per token; the ELBO for diffusion models)


@dataclass(frozen=True)
class Estimate:
    """A fitted value and its 95% bootstrap percentile interval (nan without a bootstrap)."""

    value: float
    lo: float = math.nan
    hi: float = math.nan


@dataclass(frozen=True)
class Profile:
    """One budget's IsoFLOP profile: loss = c0 + c1·u + c2·u², u = ln N - log_center."""

    budget: float
    parameters: tuple[float, ...]
    losses: tuple[float, ...]
    coeffs: tuple[float, float, float] | None = None  # (c0, c1, c2); None when skipped
    log_center: float = math.nan
    n_opt: float | None = None
    loss_opt: float | None = None
    extrapolated: bool = False  # N* outside the sampled sizes: the sweep needs other sizes
    skipped: str = ""  # why there is no minimum; "" when fitted

    def loss_at(self, n: np.ndarray) -> np.ndarray:
        c0, c1, c2 = self.coeffs
        u = np.log(n) - self.log_center
        return c0 + c1 * u + c2 * u**2


@dataclass(frozen=True)
class SizeLaw:
    """N*(C) = a·C^b."""

    a: Estimate
    b: Estimate

    def __call__(self, budget: np.ndarray) -> np.ndarray:
        return self.a.value * np.asarray(budget, float) ** self.b.value


@dataclass(frozen=True)
class LossLaw:
    """L*(C) = E + A·C^-alpha, or A·C^-alpha when E is None (the data do not support E)."""

    E: Estimate | None
    A: Estimate
    alpha: Estimate
    form_reason: str  # why E is or is not part of the law

    def __call__(self, budget: np.ndarray) -> np.ndarray:
        return _law_loss(self.params, np.log(np.asarray(budget, float)))

    @property
    def params(self) -> np.ndarray:
        """(E, ln A, alpha) with E = 0 for the pure power law."""
        e = 0.0 if self.E is None else self.E.value
        return np.array([e, math.log(self.A.value), self.alpha.value])


@dataclass(frozen=True)
class ObjectiveFit:
    objective: str
    profiles: tuple[Profile, ...]  # every budget the objective ran, ascending
    size_law: SizeLaw | None  # None when fewer than MIN_BUDGETS minima
    loss_law: LossLaw | None
    laws_skipped: str  # why there are no laws; "" when fitted
    replicates: int  # bootstrap replicates in which every minimum and law could be refitted


@dataclass(frozen=True)
class Multiplier:
    """Compute `objective` needs to reach `reference`'s L*(budget), divided by budget."""

    objective: str
    reference: str
    budget: float
    value: Estimate  # > 1: `objective` is less compute-efficient; inf: it never gets there
    extrapolated: bool  # the compute it needs lies outside `objective`'s fitted budgets


@dataclass(frozen=True)
class SweepFit:
    objectives: tuple[ObjectiveFit, ...]  # in order of first appearance in the results
    multipliers: tuple[Multiplier, ...]  # every ordered pair with loss laws, every budget
    budgets: tuple[float, ...]  # every budget of the sweep, ascending
    bootstrap: int
    seed: int


def fit_sweep(results: Sequence[RunResult], *, bootstrap: int = 1000, seed: int = 0) -> SweepFit:
    """IsoFLOP profiles, scaling laws and compute multipliers of every objective in `results`,
    with `bootstrap` residual-bootstrap replicates drawn from `seed` (reproducible)."""
    _check(results, bootstrap)
    rng = np.random.default_rng(seed)
    objectives = list(dict.fromkeys(r.objective for r in results))
    fits, laws = [], {}
    for name in objectives:
        fit, laws[name] = _fit_objective(
            name, [r for r in results if r.objective == name], rng, bootstrap
        )
        fits.append(fit)
    budgets = tuple(sorted({float(r.budget) for r in results}))
    multipliers = _multipliers(fits, laws, budgets)
    return SweepFit(tuple(fits), multipliers, budgets, bootstrap, seed)


def _check(results: Sequence[RunResult], bootstrap: int) -> None:
    if not results:
        raise FitError(
            "no runs to fit: the result list is empty; finish at least three sizes at one budget "
            "(each with a final validation loss) before fitting the sweep"
        )
    if bootstrap < 0:
        raise FitError(f"bootstrap={bootstrap} is negative; give 0 (no intervals) or more")
    for r in results:
        if not (r.budget > 0 and r.parameters > 0 and r.loss > 0 and math.isfinite(r.loss)):
            raise FitError(
                f"{r}: budget, parameters and loss must be positive and finite; "
                "drop the run or fix its record"
            )


def fit_profile(budget: float, parameters: Sequence[float], losses: Sequence[float]) -> Profile:
    """Least-squares parabola of loss against ln N at one budget, and its vertex.

    ln N is centred on its mean so that the three coefficients are well conditioned."""
    n, y = np.asarray(parameters, float), np.asarray(losses, float)
    base = Profile(float(budget), tuple(n.tolist()), tuple(y.tolist()))
    sizes = np.unique(n).size
    if sizes < MIN_SIZES:
        return _skip(base, f"{sizes} size(s); a parabola needs >= {MIN_SIZES}: add sizes")
    center = float(np.log(n).mean())
    coeffs = np.linalg.lstsq(_design(np.log(n) - center), y, rcond=None)[0]
    if coeffs[2] <= 0:
        return _skip(base, "the losses curve downward (no minimum): add sizes on both sides")
    u_opt, loss_opt = _vertex(coeffs)
    n_opt = math.exp(center + u_opt)
    return Profile(
        base.budget,
        base.parameters,
        base.losses,
        (float(coeffs[0]), float(coeffs[1]), float(coeffs[2])),
        center,
        n_opt,
        float(loss_opt),
        extrapolated=not n.min() <= n_opt <= n.max(),
    )


def _skip(profile: Profile, reason: str) -> Profile:
    return Profile(profile.budget, profile.parameters, profile.losses, skipped=reason)


def _design(u: np.ndarray) -> np.ndarray:
    """[n] -> [n, 3] columns 1, u, u²."""
    return np.stack([np.ones_like(u), u, u**2], axis=-1)


def _vertex(coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., 3] parabola coefficients -> the vertex's u and loss; nan where c2 <= 0."""
    c0, c1 = coeffs[..., 0], coeffs[..., 1]
    c2 = np.where(coeffs[..., 2] > 0, coeffs[..., 2], np.nan)
    return -c1 / (2 * c2), c0 - c1**2 / (4 * c2)


def _fit_objective(
    name: str, runs: list[RunResult], rng: np.random.Generator, bootstrap: int
) -> tuple[ObjectiveFit, np.ndarray | None]:
    """The objective's fit, and its [R, 3] bootstrap loss-law replicates for the multipliers."""
    budgets = sorted({r.budget for r in runs})
    profiles = tuple(
        fit_profile(
            c,
            [r.parameters for r in runs if r.budget == c],
            [r.loss for r in runs if r.budget == c],
        )
        for c in budgets
    )
    fitted = [p for p in profiles if not p.skipped]
    if len(fitted) < MIN_BUDGETS:
        reason = (
            f"{len(fitted)} budget(s) with a minimum; the power laws need >= {MIN_BUDGETS}: "
            "add budgets or sizes"
        )
        return ObjectiveFit(name, profiles, None, None, reason, 0), None
    log_c = np.log([p.budget for p in fitted])
    log_n, loss = np.log([p.n_opt for p in fitted]), np.array([p.loss_opt for p in fitted])
    size_params = np.polyfit(log_c, log_n, 1)[::-1]  # (ln a, b)
    loss_params, with_e, form_reason = _choose_loss_law(log_c, loss)
    sizes, losses = _bootstrap_laws(fitted, loss_params, with_e, rng, bootstrap)
    ok = np.isfinite(sizes).all(axis=1) & np.isfinite(losses).all(axis=1)
    size_law = SizeLaw(
        _estimate(math.exp(size_params[0]), np.exp(sizes[ok, 0])),
        _estimate(size_params[1], sizes[ok, 1]),
    )
    loss_law = LossLaw(
        _estimate(loss_params[0], losses[ok, 0]) if with_e else None,
        _estimate(math.exp(loss_params[1]), np.exp(losses[ok, 1])),
        _estimate(loss_params[2], losses[ok, 2]),
        form_reason,
    )
    losses[~ok] = np.nan
    return ObjectiveFit(name, profiles, size_law, loss_law, "", int(ok.sum())), losses


def _estimate(value: float, replicates: np.ndarray) -> Estimate:
    if replicates.size == 0:
        return Estimate(float(value))
    # no interpolation between replicates: a multiplier's replicates may be inf
    q = [(100 - CI_LEVEL) / 2, (100 + CI_LEVEL) / 2]
    lo, hi = np.percentile(replicates, q, method="inverted_cdf")
    return Estimate(float(value), float(lo), float(hi))


def _choose_loss_law(log_c: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, bool, str]:
    """(E, ln A, alpha), whether E is part of the law, and why.

    E enters when there are >= MIN_BUDGETS_FOR_E minima, the three-parameter fit converges
    with 0 <= E < min L* and alpha > 0, and an F-test of the two nested fits (residuals in
    ln L*) says E lowers the residual more than one extra parameter would by chance."""
    power = _fit_power(log_c, loss)
    k = loss.size
    if k < MIN_BUDGETS_FOR_E:
        return power, False, f"{k} budgets: E needs >= {MIN_BUDGETS_FOR_E}"
    full = _fit_irreducible(log_c, loss, [f * loss.min() for f in (0.0, 0.5, 0.9)])
    if full is None:
        return power, False, "the fit with E did not converge"
    e, _, alpha = full
    if not (0 <= e < loss.min() and alpha > 0):
        return power, False, f"the fit with E gives E={e:.3g}, alpha={alpha:.3g}: not 0 <= E < L*"
    sse_power, sse_full = _sse(power, log_c, loss), _sse(full, log_c, loss)
    f = (sse_power - sse_full) / (sse_full / (k - 3)) if sse_full > 0 else math.inf
    p = float(stats.f.sf(f, 1, k - 3))
    if p >= E_TEST_LEVEL:
        return power, False, f"E does not improve the residual (F-test p={p:.2g})"
    return full, True, f"E improves the residual (F-test p={p:.2g})"


def _law_loss(params: np.ndarray, log_c: np.ndarray) -> np.ndarray:
    """(E, ln A, alpha) [..., 3] and ln C -> E + A·C^-alpha."""
    return params[..., 0] + np.exp(params[..., 1] - params[..., 2] * log_c)


def _sse(params: np.ndarray, log_c: np.ndarray, loss: np.ndarray) -> float:
    return float(np.sum((np.log(_law_loss(params, log_c)) - np.log(loss)) ** 2))


def _fit_power(log_c: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """ln L* = ln A - alpha ln C by least squares: (0, ln A, alpha)."""
    slope, intercept = np.polyfit(log_c, np.log(loss), 1)
    return np.array([0.0, intercept, -slope])


def _fit_irreducible(log_c: np.ndarray, loss: np.ndarray, starts: list[float]) -> np.ndarray | None:
    """E + A·C^-alpha by least squares in ln L* from each starting E; the best converged fit.

    ln C is centred for the optimiser (ln A and alpha are nearly collinear otherwise)."""
    ref = log_c.mean()

    def residuals(p: np.ndarray) -> np.ndarray:
        model = p[0] + np.exp(p[1] - p[2] * (log_c - ref))
        return np.log(np.maximum(model, 1e-300)) - np.log(loss)

    best = None
    for e0 in starts:
        e0 = min(e0, 0.99 * loss.min())
        slope, intercept = np.polyfit(log_c - ref, np.log(loss - e0), 1)
        r = optimize.least_squares(residuals, [e0, intercept, -slope], method="lm")
        if r.success and np.isfinite(r.x).all() and (best is None or r.cost < best.cost):
            best = r
    if best is None:
        return None
    e, log_a_ref, alpha = best.x
    return np.array([e, log_a_ref + alpha * ref, alpha])


def _bootstrap_laws(
    fitted: list[Profile],
    loss_params: np.ndarray,
    with_e: bool,
    rng: np.random.Generator,
    reps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """[R, 2] (ln a, b) and [R, 3] (E, ln A, alpha) refitted from resampled losses; nan rows
    where a replicate's parabola has no minimum or its law fit fails.

    Residual bootstrap: the sizes are the experimenter's choice, not a sample, so they stay
    fixed; each budget's parabola residuals, divided by sqrt(1 - leverage) to undo the fit's
    shrinkage (largest at the outermost sizes) and centred, are resampled and added back to
    the parabola, and the whole chain (minima, then laws, in the form chosen on the data) is
    refitted. Resampling runs instead would leave a 7-size budget with ~4 distinct sizes per
    replicate and widen the intervals with parabolas that barely fit. A budget with exactly 3
    sizes has no residuals: it contributes no spread. Objectives draw from one generator in
    their order of appearance, so a seed gives the same intervals every time."""
    minima = np.stack([_resampled_minima(p, rng, reps) for p in fitted], axis=1)  # [R, K, 2]
    log_c = np.log([p.budget for p in fitted])
    sizes, losses = np.full((reps, 2), np.nan), np.full((reps, 3), np.nan)
    for i in range(reps):
        log_n, loss = minima[i, :, 0], minima[i, :, 1]
        if not (np.isfinite(minima[i]).all() and (loss > 0).all()):
            continue
        sizes[i] = np.polyfit(log_c, log_n, 1)[::-1]
        if not with_e:
            losses[i] = _fit_power(log_c, loss)
        elif (full := _fit_irreducible(log_c, loss, [loss_params[0]])) is not None:
            losses[i] = full
    return sizes, losses


def _resampled_minima(profile: Profile, rng: np.random.Generator, reps: int) -> np.ndarray:
    """[R, 2] ln N* and L* of `reps` residual-resampled parabolas at one budget."""
    u = np.log(profile.parameters) - profile.log_center
    x, y = _design(u), np.asarray(profile.losses)
    fitted = x @ np.asarray(profile.coeffs)
    leverage = np.einsum("ij,ji->i", x, np.linalg.pinv(x))  # diagonal of the hat matrix
    free = leverage < 1 - 1e-9  # a point the parabola must pass through has no residual
    residuals = np.where(free, (y - fitted) / np.sqrt(np.where(free, 1 - leverage, 1)), 0.0)
    residuals -= residuals.mean()
    ys = fitted + residuals[rng.integers(y.size, size=(reps, y.size))]  # [R, n]
    coeffs = np.linalg.lstsq(x, ys.T, rcond=None)[0].T  # [R, 3]
    u_opt, loss_opt = _vertex(coeffs)
    return np.stack([profile.log_center + u_opt, loss_opt], axis=-1)


def _compute_to_reach(params: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """The inverse law: C with E + A·C^-alpha = loss, for (E, ln A, alpha) [..., 3]; inf when
    loss <= E (never reached)."""
    e, log_a, alpha = params[..., 0], params[..., 1], params[..., 2]
    gap = np.asarray(loss) - e
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_c = (log_a - np.log(np.where(gap > 0, gap, np.nan))) / alpha
        return np.where(gap > 0, np.exp(log_c), np.inf)


def _multiplier(a: np.ndarray, b: np.ndarray, budget: float) -> np.ndarray:
    """C_A(L*_B(C)) / C for loss laws (E, ln A, alpha) [..., 3] of A and B."""
    return _compute_to_reach(a, _law_loss(b, math.log(budget))) / budget


def _multipliers(
    fits: list[ObjectiveFit], replicates: dict[str, np.ndarray | None], budgets: tuple[float, ...]
) -> tuple[Multiplier, ...]:
    """m(C) for every ordered pair (A, B) with loss laws and every budget of the sweep.

    L*_B(C) is B's fitted law (defined at every budget, also where B's profile was skipped),
    inverted under A's law; the interval pairs replicate i of A with replicate i of B (the
    objectives' runs are independent, and so are their draws)."""
    with_laws = [f for f in fits if f.loss_law is not None]
    out = []
    for a, b in ((a, b) for a in with_laws for b in with_laws if a is not b):
        fitted = [p.budget for p in a.profiles if not p.skipped]
        for c in budgets:
            value = float(_multiplier(a.loss_law.params, b.loss_law.params, c))
            reps = _multiplier(replicates[a.objective], replicates[b.objective], c)
            estimate = _estimate(value, reps[~np.isnan(reps)])
            extrapolated = not min(fitted) <= value * c <= max(fitted)
            out.append(Multiplier(a.objective, b.objective, c, estimate, extrapolated))
    return tuple(out)
