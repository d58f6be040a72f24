"""The objectives, one class each behind one interface (objective.Objective; docs/conventions.md
§10), and the dict that names them for the config's `objective.name`.

Importing this package imports neither megatron-core, DeepSpeed nor Triton (the CLI loads the
config through it; the Triton kernels are imported when first used on CUDA tensors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dlm_pretrain.pretrain.objectives.ar import AR
from dlm_pretrain.pretrain.objectives.duo import Duo
from dlm_pretrain.pretrain.objectives.esolm import EsoLM
from dlm_pretrain.pretrain.objectives.gidd import GIDD
from dlm_pretrain.pretrain.objectives.mdlm import MDLM
from dlm_pretrain.pretrain.objectives.objective import Objective

if TYPE_CHECKING:  # pretrain.config imports this package
    from dlm_pretrain.pretrain.config import ObjectiveConfig

OBJECTIVES: dict[str, type[Objective]] = {
    "ar": AR,
    "mdlm": MDLM,
    "duo": Duo,
    "gidd": GIDD,
    "esolm": EsoLM,
}


def build_objective(cfg: ObjectiveConfig) -> Objective:
    """The objective of the config's `objective` section, its options on the instance."""
    return OBJECTIVES[cfg.name].from_config(cfg)
