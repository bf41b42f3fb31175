"""Stage C: text-conditional diffusion on the semantic compressor's latents."""

from __future__ import annotations

import dataclasses

import torch
from PIL import Image
from torch import nn

from pipelines import pre_encode, schema
from pipelines.reports import image_grid
from pipelines.trainable.base import Parallelism, TaskSpec, TrainableStage, pil_images
from pipelines.trainable.text_conditioned import TextConditionedTask
from stages.blocks import AttnBlock, ResBlock, TimestepBlock
from stages.diffusion import drop_conditioning
from stages.generate import GENERATE_CONFIGS, Wuerstchen, generate
from stages.stage_c import STAGE_C_CONFIGS, StageC
from stages.text import TEXT_CONFIGS, TextEncoder


def columns(spec: TaskSpec) -> list[str]:
    return [schema.STAGE_C_LATENT, schema.TEXT_TOKENS if spec.text_from_tokens else schema.TEXT_STAGE_C]


def build_model(spec: TaskSpec) -> nn.Module:
    return StageC(dataclasses.replace(STAGE_C_CONFIGS[spec.models](), checkpointing=spec.activation_checkpointing))


class StageCTask(TextConditionedTask):
    def __init__(self, spec: TaskSpec, device: torch.device):
        super().__init__(spec, device, TEXT_CONFIGS[spec.models]().stage_c)

    def conditioned(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None):
        text = self.text(batch, schema.TEXT_STAGE_C)
        if generator is not None:
            text = drop_conditioning(text, self.empty[schema.TEXT_STAGE_C], self.spec.caption_dropout,
                                     generator=generator)
        return batch[schema.STAGE_C_LATENT], lambda noised, r: model(noised, r, text)

    def sample_grid(self, model: nn.Module, step: int) -> Image.Image | None:
        """The fixed prompts generated through the trained Stage B and Stage A, once both exist."""
        stage_b, stage_a = self.partner("stage_b"), self.partner("stage_a")
        if stage_b is None or stage_a is None:
            return None
        text = TEXT_CONFIGS[self.spec.models]()
        models = Wuerstchen(text_c=TextEncoder(text.stage_c).to(self.device), stage_c=model,
                            text_b=TextEncoder(text.stage_b).to(self.device), stage_b=stage_b, stage_a=stage_a)
        side = self.spec.resolution
        generated = generate(list(self.spec.sample_prompts), models=models, config=GENERATE_CONFIGS[self.spec.models](),
                             height=side, width=side, generator=torch.Generator(self.device).manual_seed(step))
        return image_grid(pil_images(generated.images), list(self.spec.sample_prompts))


STAGE_C = TrainableStage(
    name="stage_c",
    phase="train_stage_c",
    config_section="train_c",
    source_phase=pre_encode.PHASE,
    columns=columns,
    build_model=build_model,
    task=StageCTask,
    parallelism=Parallelism(sharded_blocks=(ResBlock, AttnBlock), compiled_blocks=(ResBlock, AttnBlock, TimestepBlock)),
    text_column=schema.TEXT_STAGE_C,
    latent_column=schema.STAGE_C_LATENT,
    sample_partners=("stage_b", "stage_a"),
)
