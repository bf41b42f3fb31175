"""Stage B: diffusion on Stage A's latents, conditioned on the semantic latents and the caption."""

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
from stages.diffusion import drop_conditioning, linear_timesteps
from stages.generate import GENERATE_CONFIGS
from stages.semantic import from_stage_c_latents
from stages.stage_b import STAGE_B_CONFIGS, StageB
from stages.text import TEXT_CONFIGS


def columns(spec: TaskSpec) -> list[str]:
    return [
        schema.STAGE_B_LATENT,
        schema.STAGE_C_LATENT,
        schema.TEXT_TOKENS if spec.text_from_tokens else schema.TEXT_STAGE_B,
    ]


def build_model(spec: TaskSpec) -> nn.Module:
    return StageB(dataclasses.replace(STAGE_B_CONFIGS[spec.models](), checkpointing=spec.activation_checkpointing))


class StageBTask(TextConditionedTask):
    def __init__(self, spec: TaskSpec, device: torch.device):
        super().__init__(spec, device, TEXT_CONFIGS[spec.models]().stage_b)

    def conditioned(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None):
        spec = self.spec
        text = self.text(batch, schema.TEXT_STAGE_B)
        semantic = from_stage_c_latents(batch[schema.STAGE_C_LATENT].float())
        if generator is not None:
            text = drop_conditioning(text, self.empty[schema.TEXT_STAGE_B], spec.caption_dropout, generator=generator)
            if spec.semantic_noise:
                semantic = semantic + spec.semantic_noise * torch.randn(
                    semantic.shape, generator=generator, device=generator.device
                ).to(semantic.device)
            # As the unconditional pass of the official decoder pipeline: no semantics at all.
            semantic = drop_conditioning(
                semantic, torch.zeros_like(semantic[:1]), spec.semantic_dropout, generator=generator
            )
        return batch[schema.STAGE_B_LATENT], lambda noised, r: model(noised, r, semantic, text)

    def sample_grid(self, model: nn.Module, step: int) -> Image.Image | None:
        """The held-in samples decoded from their semantic latents and captions, once Stage A exists."""
        stage_a = self.partner("stage_a")
        if stage_a is None:
            return None
        batch = {
            name: torch.tensor(value).to(self.device)
            for name, value in self.spec.sample_batch.items()
            if name != schema.CAPTION
        }
        semantic = from_stage_c_latents(batch[schema.STAGE_C_LATENT].float())
        text = self.text(batch, schema.TEXT_STAGE_B)
        generator = torch.Generator(self.device).manual_seed(step)
        latents = self.diffusion.sample(
            lambda x, r: model(x, r, semantic, text),
            batch[schema.STAGE_B_LATENT].shape,
            timesteps=linear_timesteps(GENERATE_CONFIGS[self.spec.models]().decoder_steps),
            generator=generator,
            device=self.device,
        )
        shown = stage_a.decode_stage_b_latents(latents)
        return image_grid(pil_images(shown), list(self.spec.sample_batch.get(schema.CAPTION, [])))


def check_crop(config, crop: tuple[int, int]) -> None:
    """Refuses, before Ray Train starts, a crop whose Stage A latent Stage B cannot take: each worker
    would fail on its first batch of it, and again on every restart."""
    models = config.pre_encode.models
    multiple = STAGE_B_CONFIGS[models]().size_multiple
    _, height, width = pre_encode.latent_shapes(config.pre_encode, crop, config.decode.resolution)[
        schema.STAGE_B_LATENT
    ]
    if height % multiple or width % multiple:
        pixels = multiple * crop[0] // width
        raise ValueError(
            f"train_stage_b: the {crop[0]}x{crop[1]} crops have {width}x{height} Stage A latents, and the "
            f"{models!r} Stage B takes sides that are multiples of {multiple}: set decode.bucket_multiple "
            f"(or decode.resolution) to a multiple of {pixels}"
        )


STAGE_B = TrainableStage(
    name="stage_b",
    phase="train_stage_b",
    config_section="train_b",
    source_phase=pre_encode.PHASE,
    columns=columns,
    build_model=build_model,
    task=StageBTask,
    parallelism=Parallelism(
        sharded_blocks=(ResBlock, AttnBlock),
        compiled_blocks=(ResBlock, AttnBlock, TimestepBlock),
        levels=StageB.blocks_by_level,
    ),
    text_column=schema.TEXT_STAGE_B,
    latent_column=schema.STAGE_B_LATENT,
    sample_partners=("stage_a",),
    check_crop=check_crop,
)
