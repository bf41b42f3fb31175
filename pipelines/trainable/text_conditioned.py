"""The task of the diffusion stages, which learn from latents conditioned on caption hidden states."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipelines import schema
from pipelines.trainable.base import Task, TaskSpec
from stages.diffusion import DIFFUSION_CONFIGS, CosineDiffusion
from stages.text import TextEncoder, TextEncoderConfig, attention_mask


class TextConditionedTask(Task):
    """A diffusion stage's task: its noise schedule, and the caption hidden states of a batch, read from
    the shards or (when the shards hold tokens only) encoded on the worker."""

    def __init__(self, spec: TaskSpec, device: torch.device, text_encoder: TextEncoderConfig):
        super().__init__(spec, device)
        self.diffusion = CosineDiffusion(DIFFUSION_CONFIGS[spec.models]())
        self.text_encoder: nn.Module | None = TextEncoder(text_encoder).to(device) if spec.text_from_tokens else None
        self.empty = {name: torch.tensor(value).float().to(device) for name, value in spec.empty_caption.items()}

    def text(self, batch: dict[str, torch.Tensor], column: str) -> torch.Tensor:
        """Text hidden states of a batch: read from the shards, or encoded from the tokens."""
        if self.text_encoder is None:
            return batch[column].float()
        tokens = batch[schema.TEXT_TOKENS].long()
        with torch.no_grad():
            return self.text_encoder(tokens, attention_mask(tokens))

    def conditioned(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """A batch's clean latents and the model's noise prediction ``(noised, r) -> noise`` under the
        batch's conditioning; with ``generator``, the conditioning is dropped (and noised) as in training,
        drawing from it; without, it is used as it is."""
        raise NotImplementedError

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, step: int
    ) -> torch.Tensor:
        latents, predict = self.conditioned(model, batch, generator)
        noised, noise, r = self.diffusion.noise_batch(latents.float(), generator=generator)
        return self.diffusion.loss(predict(noised, r), noise, r)

    @torch.no_grad()
    def validation_losses(
        self, model: nn.Module, batch: dict[str, torch.Tensor], noise: torch.Tensor, r: float
    ) -> torch.Tensor:
        """Each sample's loss (B,) at time ``r`` with the given ``noise``, its conditioning as it is."""
        latents, predict = self.conditioned(model, batch, None)
        times = torch.full((latents.shape[0],), r, device=latents.device)
        noised = self.diffusion.add_noise(latents.float(), noise, times)
        return self.diffusion.per_sample_loss(predict(noised, times), noise, times)
