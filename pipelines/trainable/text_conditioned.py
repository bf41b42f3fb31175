"""The task of the diffusion stages, which learn from latents conditioned on caption hidden states.

Their held-out loss is MLPerf's: the training objective at ``VALIDATION_TIMES`` fixed times, each
held-out row noised at each time with a draw seeded by the row's index and the time's alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipelines import schema
from pipelines.trainable.base import Task, TaskSpec
from stages.diffusion import DIFFUSION_CONFIGS, CosineDiffusion
from stages.text import TextEncoder, TextEncoderConfig, attention_mask

VALIDATION_TIMES = 8
"""Times at which each held-out row is noised and denoised."""
_NOISE_SEED = 20_240_125


def validation_times(t_min: float, count: int = VALIDATION_TIMES) -> list[float]:
    """``count`` times at the midpoints of equal parts of the training range [t_min, 1]."""
    return [t_min + (1 - t_min) * (k + 0.5) / count for k in range(count)]


def validation_noise(shape: torch.Size, row: int, time_index: int) -> torch.Tensor:
    """The noise of held-out row ``row`` at time ``time_index``: the same on any device and batch."""
    generator = torch.Generator().manual_seed(_NOISE_SEED + row * VALIDATION_TIMES + time_index)
    return torch.randn(shape, generator=generator)


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
        self, model: nn.Module, batch: dict[str, torch.Tensor], first_row: int
    ) -> dict[str, torch.Tensor]:
        """Each sample's loss (B,) at each fixed time (``loss_r<time>``), with its conditioning as it is
        and its fixed noise, and their mean over the times (``loss``): a fixed quadrature of the
        training loss's expectation over times (training draws them uniformly)."""
        latents, predict = self.conditioned(model, batch, None)
        latents = latents.float()
        losses = {}
        for k, r in enumerate(validation_times(self.diffusion.config.t_min)):
            noise = torch.stack([validation_noise(latents.shape[1:], first_row + i, k) for i in range(len(latents))])
            noise = noise.to(latents.device)
            times = torch.full((len(latents),), r, device=latents.device)
            noised = self.diffusion.add_noise(latents, noise, times)
            losses[f"loss_r{r:.3f}"] = self.diffusion.per_sample_loss(predict(noised, times), noise, times)
        losses["loss"] = torch.stack(list(losses.values())).mean(0)
        return losses
