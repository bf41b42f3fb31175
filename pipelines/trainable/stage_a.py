"""Stage A: the autoencoder of the pixels, learnt from the decoded crops (VQGAN's recipe, its
perceptual and adversarial terms optional)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipelines import decode, schema
from pipelines.reports import image_grid
from pipelines.storage import local_copy
from pipelines.trainable.base import (
    Parallelism,
    Task,
    TaskSpec,
    TrainableStage,
    batch_images,
    pil_images,
    sample_images,
)
from stages.stage_a import STAGE_A_CONFIGS, MixingBlock, StageA
from stages.stage_a_losses import (
    STAGE_A_LOSS_CONFIGS,
    PatchCritic,
    PerceptualDistance,
    critic_hinge_loss,
    generator_adversarial_loss,
)


class StageAWithCritic(nn.Module):
    """Stage A and the patch critic it trains against, as one module so that one data-parallel
    forward covers both (the critic is left behind on export).

    ``forward`` returns the reconstruction, the quantisation loss, the critic's logits on the
    reconstruction as seen by the autoencoder (through a detached copy of the critic's weights, so
    that term trains the autoencoder only) and the critic's hinge loss (on a detached
    reconstruction, so it trains the critic only): one backward pass serves both players.
    """

    def __init__(self, autoencoder: StageA, critic: PatchCritic):
        super().__init__()
        self.autoencoder, self.critic = autoencoder, critic

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        reconstruction, vq_loss = self.autoencoder(images, quantize=False)
        frozen = {name: p.detach() for name, p in self.critic.named_parameters()}
        fake_logits = torch.func.functional_call(self.critic, frozen, (reconstruction,))
        critic_loss = critic_hinge_loss(self.critic(images), self.critic(reconstruction.detach()))
        return reconstruction, vq_loss, fake_logits, critic_loss


def columns(spec: TaskSpec) -> list[str]:
    return [schema.IMAGE]


def build_model(spec: TaskSpec) -> nn.Module:
    autoencoder = StageA(STAGE_A_CONFIGS[spec.models]())
    if spec.stage_a_losses.adversarial_weight > 0:
        return StageAWithCritic(autoencoder, PatchCritic(STAGE_A_LOSS_CONFIGS[spec.models]().critic))
    return autoencoder


def export(model: nn.Module) -> nn.Module:
    """The autoencoder; the critic stays behind."""
    return model.autoencoder if isinstance(model, StageAWithCritic) else model


def perceptual_weights(config) -> str:
    return config.stage_a_losses.perceptual_weights if config.stage_a_losses.perceptual_weight > 0 else ""


class StageATask(Task):
    def __init__(self, spec: TaskSpec, device: torch.device):
        super().__init__(spec, device)
        self.perceptual = None
        if spec.stage_a_losses.perceptual_weight > 0:
            self.perceptual = PerceptualDistance(STAGE_A_LOSS_CONFIGS[spec.models]().perceptual)
            if spec.loss_weights:
                self.perceptual.load_torchvision_vgg16(local_copy(spec.loss_weights, spec.storage))
            else:
                warnings.warn(
                    "train_a.stage_a_losses.perceptual_weights is empty: the perceptual distance uses random features",
                    stacklevel=2,
                )
            self.perceptual.to(device)

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, step: int
    ) -> torch.Tensor:
        images = batch_images(batch)
        losses = self.spec.stage_a_losses
        # Unquantised decoding, as at generation time; the quantiser still learns its codebook.
        if losses.adversarial_weight > 0:
            reconstruction, vq_loss, fake_logits, critic_loss = model(images)
            # Before the start the terms still run, weighted 0, so every parameter gets a gradient
            # (data parallelism expects each one in every step).
            factor = losses.adversarial_weight if step >= losses.adversarial_start_step else 0.0
            adversarial = factor * generator_adversarial_loss(fake_logits) + (factor > 0) * critic_loss
        else:
            reconstruction, vq_loss = model(images, quantize=False)
            adversarial = 0.0
        loss = F.mse_loss(reconstruction, images) + vq_loss + adversarial
        if self.perceptual is not None:
            loss = loss + losses.perceptual_weight * self.perceptual(reconstruction, images).mean()
        return loss

    def validation_losses(
        self, model: nn.Module, batch: dict[str, torch.Tensor], first_row: int
    ) -> dict[str, torch.Tensor]:
        """The training objective's terms on held-out crops, the adversarial one left out (it measures
        the critic as much as the autoencoder): ``reconstruction`` (the pixels' squared error),
        ``quantisation``, ``perceptual`` where it is trained with, and ``loss``, their weighted sum."""
        images = batch_images(batch)
        if isinstance(model, StageAWithCritic):
            reconstruction, vq_loss, _, _ = model(images)
        else:
            reconstruction, vq_loss = model(images, quantize=False)
        terms = {
            "reconstruction": (reconstruction.float() - images).square().flatten(1).mean(1),
            # The batch's mean over equal-sized samples: as a per-sample term it sums to the batch's share.
            "quantisation": vq_loss.float().expand(len(images)),
        }
        terms["loss"] = terms["reconstruction"] + terms["quantisation"]
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(reconstruction, images).float()
            terms["loss"] = terms["loss"] + self.spec.stage_a_losses.perceptual_weight * terms["perceptual"]
        return terms

    def sample_grid(self, model: nn.Module, step: int) -> Image.Image:
        """The held-in crops, encoded and decoded."""
        images = sample_images(self.spec, self.device)
        autoencoder = export(model)
        shown = autoencoder.decode(autoencoder.encode(images)).clamp(0, 1)
        return image_grid(pil_images(shown), list(self.spec.sample_batch.get(schema.CAPTION, [])))


STAGE_A = TrainableStage(
    name="stage_a",
    phase="train_stage_a",
    config_section="train_a",
    source_phase=decode.PHASE,
    columns=columns,
    build_model=build_model,
    task=StageATask,
    export=export,
    parallelism=Parallelism(sharded_blocks=(MixingBlock,), compiled_blocks=(MixingBlock,)),
    sample_partners=(),
    encoder_weights="stage_a_weights",
    loss_weights=perceptual_weights,
)
