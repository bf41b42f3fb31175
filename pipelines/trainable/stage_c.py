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
        self._text_encoders: tuple[TextEncoder, TextEncoder] | None = None
        self._scorer = None

    def conditioned(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None):
        text = self.text(batch, schema.TEXT_STAGE_C)
        if generator is not None:
            text = drop_conditioning(
                text, self.empty[schema.TEXT_STAGE_C], self.spec.caption_dropout, generator=generator
            )
        return batch[schema.STAGE_C_LATENT], lambda noised, r: model(noised, r, text)

    def chain(self, model: nn.Module) -> Wuerstchen | None:
        """The chain through ``model`` and the trained Stage B and Stage A, once both exist."""
        stage_b, stage_a = self.partner("stage_b"), self.partner("stage_a")
        if stage_b is None or stage_a is None:
            return None
        if self._text_encoders is None:
            text = TEXT_CONFIGS[self.spec.models]()
            self._text_encoders = (
                TextEncoder(text.stage_c).to(self.device).eval(),
                TextEncoder(text.stage_b).to(self.device).eval(),
            )
        text_c, text_b = self._text_encoders
        return Wuerstchen(text_c=text_c, stage_c=model, text_b=text_b, stage_b=stage_b, stage_a=stage_a)

    @torch.no_grad()
    def chain_metrics(self, model: nn.Module, *, shared: bool = False) -> dict[str, float]:
        """CLIP score, FID and (demo) colour accuracy of the chain on the held-out captions; empty
        before Stage B and Stage A exist or without held-out captions. ``shared``: every rank calls
        this and renders its part (``ChainScorer``), rank 0 gets the metrics."""
        models = self.chain(model)
        if models is None or self.spec.chain_evaluation is None:
            return {}
        if self._scorer is None:
            from pipelines.chain_evaluation import ChainScorer  # open_clip and pytorch-fid: only here

            self._scorer = ChainScorer(self.spec.chain_evaluation, self.device)
        model.eval()
        try:
            return self._scorer(models, shared=shared)
        finally:
            model.train()

    def sample_grid(self, model: nn.Module, step: int) -> Image.Image | None:
        """The fixed prompts generated through the trained Stage B and Stage A, once both exist."""
        models = self.chain(model)
        if models is None:
            return None
        side = self.spec.resolution
        generated = generate(
            list(self.spec.sample_prompts),
            models=models,
            config=GENERATE_CONFIGS[self.spec.models](),
            height=side,
            width=side,
            generator=torch.Generator(self.device).manual_seed(step),
        )
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
    evaluates_chain=True,
)
