"""The stages the pipeline trains, one module each; a new stage is a module and a line below.

Each module defines a ``TrainableStage`` (base.py): what the training phase and loop need to know
of that stage. Model code stays in ``stages/``.
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.trainable.base import Task, TaskSpec, TrainableStage
from pipelines.trainable.semantic import SEMANTIC
from pipelines.trainable.stage_a import STAGE_A
from pipelines.trainable.stage_b import STAGE_B
from pipelines.trainable.stage_c import STAGE_C

# In pipeline order within each source phase: Stage B trains before Stage C, whose sample grids
# render through it.
REGISTRY: dict[str, TrainableStage] = {stage.name: stage for stage in (STAGE_A, SEMANTIC, STAGE_B, STAGE_C)}


def training_phases() -> dict[str, TrainableStage]:
    """Every registered stage by its training phase."""
    return {stage.phase: stage for stage in REGISTRY.values()}


def stage_of_phase(phase: str) -> TrainableStage:
    return training_phases()[phase]


def build_model(spec: TaskSpec) -> nn.Module:
    """The freshly initialised model of the registered stage ``spec.stage``."""
    return REGISTRY[spec.stage].build_model(spec)


def build_task(spec: TaskSpec, device: torch.device) -> Task:
    """The loss and sample grid of the registered stage ``spec.stage`` on ``device``."""
    return REGISTRY[spec.stage].task(spec, device)
