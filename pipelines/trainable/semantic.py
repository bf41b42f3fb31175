"""The semantic compressor, learnt from the decoded crops through a probe that reconstructs a
low-resolution image (only a run from scratch trains it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipelines import decode, schema
from pipelines.reports import image_grid
from pipelines.trainable.base import Task, TaskSpec, TrainableStage, batch_images, pil_images, sample_images
from stages.semantic import SEMANTIC_CONFIGS, SemanticCompressor

# The low resolution the semantic compressor learns to reconstruct when trained from scratch.
SEMANTIC_TARGET_SIZE = 16


class SemanticWithProbe(nn.Module):
    """The semantic compressor with a small decoder that reconstructs a low-resolution image.

    Pretrained EfficientNet weights do not exist offline, and a random one keeps little of the
    image, so a run from scratch first teaches the compressor to keep what a decoder needs; the
    probe is thrown away and the compressor is frozen afterwards, as the real one is.
    """

    def __init__(self, compressor: SemanticCompressor):
        super().__init__()
        self.compressor = compressor
        c, side = compressor.config.c_latent, compressor.config.latent_size
        assert SEMANTIC_TARGET_SIZE % side == 0, "the probe upsamples the latent by an integer factor"
        self.probe = nn.Sequential(
            nn.Conv2d(c, 64, kernel_size=1),
            nn.GELU(),
            nn.Upsample(scale_factor=SEMANTIC_TARGET_SIZE // side),
            nn.Conv2d(64, 3, kernel_size=3, padding=1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.probe(self.compressor(images))


def columns(spec: TaskSpec) -> list[str]:
    return [schema.IMAGE]


def build_model(spec: TaskSpec) -> nn.Module:
    return SemanticWithProbe(SemanticCompressor(SEMANTIC_CONFIGS[spec.models]()))


def export(model: SemanticWithProbe) -> nn.Module:
    """The compressor, which leaves its probe behind and takes its output scale (the probe trained on
    the normalised latent)."""
    model.compressor.scale_output_()
    return model.compressor


def probe_errors(model: SemanticWithProbe, images: torch.Tensor) -> torch.Tensor:
    """Each image's squared error (B,) of the probe's reconstruction at ``SEMANTIC_TARGET_SIZE``."""
    target = F.interpolate(images, size=SEMANTIC_TARGET_SIZE, mode="area")
    return (model(images).float() - target).square().flatten(1).mean(1)


class SemanticTask(Task):
    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, step: int
    ) -> torch.Tensor:
        return probe_errors(model, batch_images(batch)).mean()

    def validation_losses(
        self, model: nn.Module, batch: dict[str, torch.Tensor], first_row: int
    ) -> dict[str, torch.Tensor]:
        """The training objective on held-out crops: the probe's error, ``loss``."""
        return {"loss": probe_errors(model, batch_images(batch))}

    def sample_grid(self, model: nn.Module, step: int) -> Image.Image:
        """The probe's low-resolution reconstructions of the held-in crops."""
        images = sample_images(self.spec, self.device)
        shown = F.interpolate(model(images), size=images.shape[-1], mode="nearest").clamp(0, 1)
        return image_grid(pil_images(shown), list(self.spec.sample_batch.get(schema.CAPTION, [])))


SEMANTIC = TrainableStage(
    name="semantic",
    phase="train_semantic",
    config_section="train_semantic",
    source_phase=decode.PHASE,
    columns=columns,
    build_model=build_model,
    task=SemanticTask,
    export=export,
    exports_its_loss=False,  # the probe's error, and the probe stays behind
    encoder_weights="semantic_weights",
)
