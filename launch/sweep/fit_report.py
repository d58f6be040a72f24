"""What `dlm sweep fit` writes: two figures, a tidy CSV and a Markdown summary (docs/scaling.md).

Figures are drawn on matplotlib `Figure` objects with the Agg canvas, never pyplot, so that no
global backend or figure registry is touched. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
from dlm_pretrain.common.files import write_atomic
from dlm_pretrain.launch.sweep.fit import Estimate, ObjectiveFit, Profile, SweepFit
from dlm_pretrain.launch.sweep.tables import markdown_table
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import (
    FormatStrFormatter,
    LogFormatterSciNotation,
    LogLocator,
    NullFormatter,
)

LOSS_LABEL = "validation loss (nats/token)"
COMPUTE_LABEL = "training compute C (FLOPs)"
MINIMUM_LABEL = "minimum (hollow: outside the sizes)"
CSV_COLUMNS = (
    "objective",
    "budget_flops",
    "runs",
    "skipped",
    "n_opt",
    "loss_opt",
    "extrapolated",
    "n_opt_law",
    "loss_opt_law",
    *(f"size_{p}{s}" for p in ("a", "b") for s in ("", "_lo", "_hi")),
    "loss_form",
    "law_note",
    *(f"loss_{p}{s}" for p in ("E", "A", "alpha") for s in ("", "_lo", "_hi")),
    "replicates",
)


def write_fit_report(fit: SweepFit, out_dir: Path) -> list[Path]:
    """isoflop.png, scaling_laws.png, scaling_fit.csv and scaling_fit.md in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "isoflop.png": _png(_isoflop_figure(fit)),
        "scaling_laws.png": _png(_laws_figure(fit)),
        "scaling_fit.csv": _csv(fit).encode(),
        "scaling_fit.md": _markdown(fit).encode(),
    }
    for name, data in files.items():
        write_atomic(out_dir / name, data)
    return [out_dir / name for name in files]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _budget_colors(fit: SweepFit) -> dict[float, tuple]:
    """One colour per budget, dark (small) to light (large), the same in every panel."""
    shades = np.linspace(0.0, 0.85, len(fit.budgets))
    return {c: colormaps["viridis"](s) for c, s in zip(fit.budgets, shades, strict=True)}


def _isoflop_figure(fit: SweepFit) -> Figure:
    """One panel per objective: loss against N at each budget, the parabola and its minimum
    (a filled star; hollow when it lies outside the sampled sizes)."""
    cols = min(3, len(fit.objectives))
    rows = math.ceil(len(fit.objectives) / cols)
    fig = Figure(figsize=(5.5 * cols, 4.5 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = _budget_colors(fit)
    for ax, obj in zip(axes, fit.objectives, strict=False):  # spare axes hidden below
        for p in obj.profiles:
            _draw_profile(ax, p, colors[p.budget])
        ax.scatter(
            [], [], marker="*", s=120, facecolor="none", edgecolor="black", label=MINIMUM_LABEL
        )
        ax.set(xscale="log", xlabel="parameters N", ylabel=LOSS_LABEL, title=obj.objective)
        sizes = [n for p in obj.profiles for n in (*p.parameters, p.n_opt) if n]
        ax.set_xlim(min(sizes) / 1.5, max(sizes) * 1.5)  # positive, even for one size
        # labels at 1, 2 and 5 x 10^k: a narrow range may hold no power of ten at all
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize="small", title="budget")
        ax.grid(alpha=0.3, which="both")
    for ax in axes[len(fit.objectives) :]:
        ax.set_visible(False)
    return fig


def _draw_profile(ax, p: Profile, color: tuple) -> None:
    label = f"{p.budget:.2g} FLOPs" + (" (skipped)" if p.skipped else "")
    ax.scatter(p.parameters, p.losses, color=color, s=18, label=label)
    if p.skipped:
        return
    lo, hi = min(*p.parameters, p.n_opt), max(*p.parameters, p.n_opt)
    n = np.geomspace(lo / 1.15, hi * 1.15, 200)
    ax.plot(n, p.loss_at(n), color=color, lw=1.2)
    face = "none" if p.extrapolated else color
    ax.scatter([p.n_opt], [p.loss_opt], marker="*", s=160, facecolor=face, edgecolor="black")


def _laws_figure(fit: SweepFit) -> Figure:
    """N*(C) and L*(C) of every objective, points (hollow: extrapolated) and fitted laws."""
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax_n, ax_l = fig.subplots(1, 2)
    c = np.geomspace(min(fit.budgets) / 1.5, max(fit.budgets) * 1.5, 100)
    for i, obj in enumerate(fit.objectives):
        color = f"C{i}"
        fitted = [p for p in obj.profiles if not p.skipped]
        for ax, value in ((ax_n, "n_opt"), (ax_l, "loss_opt")):
            for p in fitted:
                face = "none" if p.extrapolated else color
                ax.scatter(p.budget, getattr(p, value), facecolor=face, edgecolor=color, s=30)
        if obj.size_law is None:
            for ax in (ax_n, ax_l):
                ax.plot([], [], "o", color=color, label=f"{obj.objective}: no law")
            continue
        ax_n.plot(c, obj.size_law(c), color=color, label=f"{obj.objective}: {_size_text(obj)}")
        ax_l.plot(c, obj.loss_law(c), color=color, label=f"{obj.objective}: {_loss_text(obj)}")
    ax_n.set(ylabel="compute-optimal parameters N*", title="N*(C) = a·C^b")
    ax_l.set(ylabel=f"minimum {LOSS_LABEL}", title="L*(C) = E + A·C^-alpha")
    minima = any(not p.skipped for obj in fit.objectives for p in obj.profiles)
    for ax in (ax_n, ax_l):
        ax.set(xscale="log", yscale="log" if minima else "linear", xlabel=COMPUTE_LABEL)
        ax.set_xlim(c[0], c[-1])
        if not minima:  # nothing to draw on a log axis
            ax.text(0.5, 0.5, "no IsoFLOP minimum", transform=ax.transAxes, ha="center")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    if minima:  # losses span less than a decade: plain numbers, set after the log scale
        ax_l.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
        ax_l.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
    return fig


def _size_text(obj: ObjectiveFit) -> str:
    return f"N* = {obj.size_law.a.value:.3g}·C^{obj.size_law.b.value:.3f}"


def _loss_text(obj: ObjectiveFit) -> str:
    law = obj.loss_law
    e = "" if law.E is None else f"{law.E.value:.3f} + "
    return f"L* = {e}{law.A.value:.3g}·C^-{law.alpha.value:.3f}"


def _csv(fit: SweepFit) -> str:
    """One row per objective and budget; the laws repeat on each of the objective's rows, so
    that every row stands alone. Floats are written exactly (repr); empty: not fitted."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for obj in fit.objectives:
        laws = _law_columns(obj)
        for p in obj.profiles:
            writer.writerow({**_profile_columns(obj, p), **laws})
    return buf.getvalue()


def _profile_columns(obj: ObjectiveFit, p: Profile) -> dict[str, str]:
    law = obj.size_law is not None
    return {
        "objective": obj.objective,
        "budget_flops": repr(p.budget),
        "runs": str(len(p.parameters)),
        "skipped": p.skipped,
        "n_opt": _number(p.n_opt),
        "loss_opt": _number(p.loss_opt),
        "extrapolated": "" if p.skipped else str(p.extrapolated).lower(),
        "n_opt_law": repr(float(obj.size_law(p.budget))) if law else "",
        "loss_opt_law": repr(float(obj.loss_law(p.budget))) if law else "",
    }


def _law_columns(obj: ObjectiveFit) -> dict[str, str]:
    if obj.size_law is None:
        return {"law_note": obj.laws_skipped, "replicates": "0"}
    law = obj.loss_law
    estimates = {
        "size_a": obj.size_law.a,
        "size_b": obj.size_law.b,
        "loss_E": law.E,
        "loss_A": law.A,
        "loss_alpha": law.alpha,
    }
    columns = {
        "loss_form": _form(obj),
        "law_note": law.form_reason,
        "replicates": str(obj.replicates),
    }
    for name, e in estimates.items():
        if e is not None:
            columns |= {name: repr(e.value), f"{name}_lo": repr(e.lo), f"{name}_hi": repr(e.hi)}
    return columns


def _form(obj: ObjectiveFit) -> str:
    return "E + A*C^-alpha" if obj.loss_law.E is not None else "A*C^-alpha"


def _number(x: float | None) -> str:
    return "" if x is None else repr(x)


def _markdown(fit: SweepFit) -> str:
    lines = [
        "# Scaling-law fit",
        "",
        f"Budgets {', '.join(f'{c:.2g}' for c in fit.budgets)} FLOPs; intervals are 95% "
        f"bootstrap percentiles ({fit.bootstrap} replicates, seed {fit.seed}). Losses in "
        "nats/token.",
    ]
    for obj in fit.objectives:
        lines += ["", *_objective_markdown(obj)]
    return "\n".join([*lines, "", *_multipliers_markdown(fit)]) + "\n"


def _objective_markdown(obj: ObjectiveFit) -> list[str]:
    rows = [["budget (FLOPs)", "runs", "N*", "L*", "note"]]
    for p in obj.profiles:
        runs = [f"{p.budget:.3g}", str(len(p.parameters))]
        if p.skipped:
            rows.append([*runs, "", "", f"skipped: {p.skipped}"])
        else:
            note = "extrapolated: add sizes towards N*" if p.extrapolated else ""
            rows.append([*runs, f"{p.n_opt:.4g}", f"{p.loss_opt:.4f}", note])
    lines = [f"## {obj.objective}", "", *_table(rows)]
    lines.append("")
    if obj.size_law is None:
        return [*lines, f"No scaling laws: {obj.laws_skipped}."]
    law = obj.loss_law
    e = [] if law.E is None else [f"E = {_ci(law.E)}"]
    return [
        *lines,
        f"- N*(C) = a·C^b: a = {_ci(obj.size_law.a)}, b = {_ci(obj.size_law.b)}",
        f"- L*(C) = {_form(obj)}: "
        + ", ".join([*e, f"A = {_ci(law.A)}", f"alpha = {_ci(law.alpha)}"]),
        f"- form: {law.form_reason}; {obj.replicates} bootstrap replicates refitted",
    ]


def _multipliers_markdown(fit: SweepFit) -> list[str]:
    lines = [
        "## Compute multipliers",
        "",
        "Compute A needs to reach B's L*(C), divided by C: > 1 means A needs more compute than "
        "B for the same loss. Columns: the budget C in FLOPs. `*`: A's law is extrapolated "
        "beyond its budgets.",
        "",
    ]
    if not fit.multipliers:
        return [*lines, "None: fewer than two objectives have a loss law."]
    rows = [["A", "B", *(f"{c:.2g}" for c in fit.budgets)]]
    for a, b in dict.fromkeys((m.objective, m.reference) for m in fit.multipliers):
        cells = [
            _ci(m.value, ".3f") + ("*" if m.extrapolated else "")
            for m in fit.multipliers
            if (m.objective, m.reference) == (a, b)
        ]
        rows.append([a, b, *cells])
    return [*lines, *_table(rows)]


def _table(rows: list[list[str]]) -> list[str]:
    return markdown_table(rows[0], rows[1:]).splitlines()


def _ci(e: Estimate, spec: str = ".4g") -> str:
    if math.isnan(e.lo):
        return format(e.value, spec)
    return f"{e.value:{spec}} [{e.lo:{spec}}, {e.hi:{spec}}]"
