"""The speed-quality Pareto (the form of the paper's Figure 1): gen-PPL against sampling
throughput over targets and step counts, the frontier marked, as a CSV and a PNG."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ParetoPoint:
    target: str
    steps: int
    tokens_per_s: float  # at the largest batch timed
    gen_ppl: float
    on_frontier: bool = False


def mark_frontier(points: list[ParetoPoint]) -> list[ParetoPoint]:
    """A point is on the frontier if no other is at least as fast and as good, and better in
    one (faster is better, lower gen-PPL is better)."""

    def dominated(p: ParetoPoint) -> bool:
        return any(
            q.tokens_per_s >= p.tokens_per_s
            and q.gen_ppl <= p.gen_ppl
            and (q.tokens_per_s > p.tokens_per_s or q.gen_ppl < p.gen_ppl)
            for q in points
        )

    return [ParetoPoint(**{**asdict(p), "on_frontier": not dominated(p)}) for p in points]


def write_pareto(points: list[ParetoPoint], out: Path) -> tuple[Path, Path]:
    """pareto.csv and pareto.png in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = out / "pareto.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(points[0])))
        writer.writeheader()
        writer.writerows(asdict(p) for p in points)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for target in dict.fromkeys(p.target for p in points):
        mine = [p for p in points if p.target == target]
        ax.plot([p.tokens_per_s for p in mine], [p.gen_ppl for p in mine], "o-", label=target)
        for p in mine:
            ax.annotate(
                f"T={p.steps}",
                (p.tokens_per_s, p.gen_ppl),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    frontier = sorted((p for p in points if p.on_frontier), key=lambda p: p.tokens_per_s)
    ax.plot(
        [p.tokens_per_s for p in frontier],
        [p.gen_ppl for p in frontier],
        "k--",
        lw=1,
        label="Pareto frontier",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampling throughput (tokens/s)")
    ax.set_ylabel("generative perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    image = out / "pareto.png"
    fig.savefig(image, dpi=110)
    plt.close(fig)
    return table, image
