"""What a run is, and what a restart may change (docs/design.md, Restarts and revisions).

A run's settings are its flat configuration (`section.key`) with the values the dataset and
the device resolved: the dataset's sequence length and tokenizer hash, the compute dtype and
the number of steps. Each checkpoint keeps the settings it was trained with and the list of
revisions: the first start, then every restart that changed something, with the step it
took effect. A restart compares its settings with the checkpoint's before any work:

- FIXED settings never change within a run (the weights' shape, the data and its order);
- IDENTITY settings change only when `train.allow_changes` names them, for one restart;
- the rest (steps, cadences, layout, tracking, paths) change freely and are recorded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from dlm_pretrain.common.errors import ConfigError

# Entries are a key or a whole section.
FIXED = ("model.size", "data.seq_len", "data.tokenizer_sha256", "data.seed")
IDENTITY = (
    "model.dropout",
    "model.init_seed",
    "objective",
    "optim",
    "train.global_batch",
    "train.flops_convention",
    "train.dtype",
    "train.val_sequences",
)
ALLOW_CHANGES = "train.allow_changes"  # applies to the restart that gives it, never recorded
TOTAL_STEPS = "train.total_steps"  # the resolved number of steps (train.steps or the budget)


@dataclass(frozen=True)
class Revision:
    """From `step` on, the run trains to `total_steps` with the settings of the revision
    before it, `changes` applied (key -> [before, after]); `allowed`: the identity keys the
    restart was allowed to change."""

    step: int
    total_steps: int
    changes: dict[str, list] = field(default_factory=dict)
    allowed: list[str] = field(default_factory=list)

    def describe(self) -> str:
        changed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in self.changes.items())
        return f"step {self.step}: {changed or 'first start'}"


@dataclass(frozen=True)
class RunHistory:
    """The settings in effect and every revision up to them, as a checkpoint keeps them."""

    settings: dict[str, object]
    revisions: list[Revision]

    @property
    def schedule(self) -> list[tuple[int, int]]:
        """(first step, total steps) of each revision: what the learning rate follows."""
        return [(r.step, r.total_steps) for r in self.revisions]

    def to_dict(self) -> dict:
        return {"settings": self.settings, "revisions": [asdict(r) for r in self.revisions]}

    @classmethod
    def from_dict(cls, saved: dict) -> RunHistory:
        return cls(saved["settings"], [Revision(**r) for r in saved["revisions"]])


def run_settings(flat: dict[str, object], resolved: dict[str, object]) -> dict[str, object]:
    """The flat config with the resolved values, as JSON reads it back (tuples as lists)."""
    settings = {k: v for k, v in {**flat, **resolved}.items() if k != ALLOW_CHANGES}
    return json.loads(json.dumps(settings))


def first_start(settings: dict[str, object]) -> RunHistory:
    return RunHistory(settings, [Revision(0, settings[TOTAL_STEPS])])


def restart(
    saved: RunHistory,
    settings: dict[str, object],
    step: int,
    allowed: tuple[str, ...] = (),
    defaults: dict[str, object] | None = None,
) -> tuple[RunHistory, Revision | None]:
    """The history of a run continued at `step` with `settings`, and the new revision (None:
    nothing changed). Raises before any work if a fixed setting changed, an identity setting
    changed without `allowed` naming it, or the new number of steps is behind `step`.
    A key the checkpoint lacks (added to the config since) had its value in `defaults`; a
    key it has that the config lost is ignored."""
    before = {**(defaults or {}), **saved.settings}
    changes = {k: [before.get(k), v] for k, v in sorted(settings.items()) if before.get(k) != v}
    _check(changes, allowed)
    total = settings[TOTAL_STEPS]
    if total < step:
        raise ConfigError(
            f"the run is at step {step} and train.steps (or the budget) now gives {total} "
            f"steps; give at least {step} to continue it"
        )
    if not changes:
        return RunHistory(settings, saved.revisions), None
    used = sorted(a for a in allowed if any(_covers(a, k) for k in changes))
    revision = Revision(step, total, changes, used)
    return RunHistory(settings, [*saved.revisions, revision]), revision


def check_allowable(entries: tuple[str, ...]) -> None:
    """`train.allow_changes` names identity keys or sections only."""
    bad = [e for e in entries if not any(_covers(i, e) for i in IDENTITY)]
    if bad:
        raise ConfigError(
            f"{ALLOW_CHANGES}={list(bad)}: only identity settings need allowing; choose among "
            f"{list(IDENTITY)} (a section allows each of its keys)"
        )


def _check(changes: dict[str, list], allowed: tuple[str, ...]) -> None:
    fixed = [k for k in changes if any(_covers(f, k) for f in FIXED)]
    identity = [
        k
        for k in changes
        if any(_covers(i, k) for i in IDENTITY) and not any(_covers(a, k) for a in allowed)
    ]
    if not fixed and not identity:
        return
    lines = [
        f"  {k}: saved {changes[k][0]!r}, requested {changes[k][1]!r}"
        + (" (fixed for the whole run)" if k in fixed else "")
        for k in [*fixed, *identity]
    ]
    ways = ["start a new run directory (train.run_dir=...)"]
    if identity and not fixed:
        keys = ",".join(identity)
        ways.append(
            f"or continue these weights and optimizer with the change, recorded as a revision: "
            f"add {ALLOW_CHANGES}=[{keys}]"
        )
    if fixed and all(k.startswith("data.") for k in fixed):
        ways.append(
            "or fine-tune these weights alone on the other data: `dlm export-hf RUN --out DIR`, "
            "then `dlm import-hf DIR --out NEW_RUN` and train NEW_RUN"
        )
    raise ConfigError(
        "the checkpoint was trained with other settings than this restart asks for:\n"
        + "\n".join(lines)
        + "\n"
        + "\n".join(ways)
    )


def _covers(entry: str, key: str) -> bool:
    """Whether `entry` (a key or a section) names `key`."""
    return key == entry or key.startswith(entry + ".")
