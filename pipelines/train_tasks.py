"""What each training run fits: its model, its inputs, its loss and the pictures it shows.

Stage C and Stage B learn from the latent shards (no pixels); Stage A and the semantic compressor,
which only a from-scratch run trains, learn from the decoded crops. The training loop in
``pipelines/train.py`` is the same for all four; a task is everything that differs.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from pipelines import schema, trained_weights
from pipelines.reports import image_grid, to_uint8
from pipelines.storage import StorageConfig, local_copy
from stages.diffusion import DIFFUSION_CONFIGS, CosineDiffusion, drop_conditioning, linear_timesteps
from stages.generate import GENERATE_CONFIGS, Wuerstchen, generate
from stages.semantic import SEMANTIC_CONFIGS, SemanticCompressor, from_stage_c_latents
from stages.stage_a import STAGE_A_CONFIGS, StageA
from stages.stage_a_losses import (
    STAGE_A_LOSS_CONFIGS,
    PatchCritic,
    PerceptualDistance,
    critic_hinge_loss,
    generator_adversarial_loss,
)
from stages.stage_b import STAGE_B_CONFIGS, StageB
from stages.stage_c import STAGE_C_CONFIGS, StageC
from stages.text import TEXT_CONFIGS, TextEncoder, attention_mask

STAGES = ("stage_a", "semantic", "stage_b", "stage_c")
# The low resolution the semantic compressor learns to reconstruct when trained from scratch.
SEMANTIC_TARGET_SIZE = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageALosses:
    """Stage A's optional loss terms beside reconstruction and quantisation (``train_a`` only):
    VQGAN's perceptual and adversarial terms (stages/stage_a_losses.py). The logged loss is the sum
    of every term, the critic's own hinge loss included."""

    perceptual_weight: float = 0.0
    """Weight of the perceptual distance; 0: not computed (VQGAN uses 1.0)."""
    perceptual_weights: str = ""
    """Path or URL of torchvision's VGG16 checkpoint for the v2 network; empty: random features
    (the tiny network is always random)."""
    adversarial_weight: float = 0.0
    """Weight of the patch critic's term for the autoencoder; 0: no critic is built (VQGAN: 0.8)."""
    adversarial_start_step: int = 0
    """First step at which the critic and its term count (VQGAN waits for decent reconstructions)."""

    def __post_init__(self):
        for name in ("perceptual_weight", "adversarial_weight", "adversarial_start_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def active(self) -> bool:
        return self.perceptual_weight > 0 or self.adversarial_weight > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """Everything a worker needs to build a task; small and picklable."""

    stage: str
    models: str
    """Size in the stage registries (tiny, v2)."""
    caption_dropout: float
    semantic_dropout: float
    semantic_noise: float
    text_from_tokens: bool
    """The latent shards hold tokens only: encode the text on the worker."""
    empty_caption: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """Hidden states of the empty caption per text column (classifier-free guidance)."""
    sample_prompts: tuple[str, ...] = ()
    """Fixed prompts of the sample grids (Stage C)."""
    sample_batch: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """Fixed held-in samples for the grids of Stage B, Stage A and the semantic compressor."""
    partner_weights: dict[str, str] = dataclasses.field(default_factory=dict)
    """Weights of already trained stages, used to render samples (stage name -> path or URL, read on
    the worker: a copy the driver made would be on the driver's node only)."""
    resolution: int = 64
    """Side of the decoded crops, pixels."""
    stage_a_losses: StageALosses = dataclasses.field(default_factory=StageALosses)
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)
    """Where the weights URLs above and ``TrainConfig.init_weights`` are read from."""
    activation_checkpointing: bool = False
    """Stage B and Stage C recompute each block's activations in backward."""


def input_columns(spec: TaskSpec) -> list[str]:
    """Columns of the training data set that the task reads."""
    text_c = schema.TEXT_TOKENS if spec.text_from_tokens else schema.TEXT_STAGE_C
    text_b = schema.TEXT_TOKENS if spec.text_from_tokens else schema.TEXT_STAGE_B
    return {
        "stage_c": [schema.STAGE_C_LATENT, text_c],
        "stage_b": [schema.STAGE_B_LATENT, schema.STAGE_C_LATENT, text_b],
        "stage_a": [schema.IMAGE],
        "semantic": [schema.IMAGE],
    }[spec.stage]


def build_model(spec: TaskSpec) -> nn.Module:
    """The freshly initialised model the task trains."""
    return {
        "stage_c": lambda: StageC(dataclasses.replace(STAGE_C_CONFIGS[spec.models](),
                                                      checkpointing=spec.activation_checkpointing)),
        "stage_b": lambda: StageB(dataclasses.replace(STAGE_B_CONFIGS[spec.models](),
                                                      checkpointing=spec.activation_checkpointing)),
        "stage_a": lambda: (
            StageAWithCritic(StageA(STAGE_A_CONFIGS[spec.models]()), PatchCritic(STAGE_A_LOSS_CONFIGS[spec.models]().critic))
            if spec.stage_a_losses.adversarial_weight > 0 else StageA(STAGE_A_CONFIGS[spec.models]())),
        "semantic": lambda: SemanticWithProbe(SemanticCompressor(SEMANTIC_CONFIGS[spec.models]())),
    }[spec.stage]()


def exported(spec: TaskSpec, model: nn.Module) -> nn.Module:
    """The part of the trained model that later phases load: the semantic compressor leaves its probe
    behind and takes its output scale (the probe trained on the normalised latent)."""
    if isinstance(model, StageAWithCritic):
        return model.autoencoder
    if spec.stage != "semantic":
        return model
    model.compressor.scale_output_()
    return model.compressor


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
            nn.Conv2d(c, 64, kernel_size=1), nn.GELU(), nn.Upsample(scale_factor=SEMANTIC_TARGET_SIZE // side),
            nn.Conv2d(64, 3, kernel_size=3, padding=1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.probe(self.compressor(images))


class Task:
    """Loss and sample pictures of one stage, on one worker."""

    def __init__(self, spec: TaskSpec, device: torch.device):
        self.spec, self.device = spec, device
        self.diffusion = CosineDiffusion(DIFFUSION_CONFIGS[spec.models]())
        text = TEXT_CONFIGS[spec.models]()
        self.text_encoder = None
        if spec.text_from_tokens and spec.stage in ("stage_b", "stage_c"):
            encoder_config = text.stage_c if spec.stage == "stage_c" else text.stage_b
            self.text_encoder = TextEncoder(encoder_config).to(device)
        self.empty = {name: torch.tensor(value).float().to(device) for name, value in spec.empty_caption.items()}
        self.perceptual = None
        if spec.stage == "stage_a" and spec.stage_a_losses.perceptual_weight > 0:
            self.perceptual = PerceptualDistance(STAGE_A_LOSS_CONFIGS[spec.models]().perceptual)
            if spec.stage_a_losses.perceptual_weights:
                self.perceptual.load_torchvision_vgg16(local_copy(spec.stage_a_losses.perceptual_weights, spec.storage))
            else:
                warnings.warn("train_a.stage_a_losses.perceptual_weights is empty: the perceptual distance "
                              "uses random features", stacklevel=2)
            self.perceptual.to(device)

    def text(self, batch: dict[str, torch.Tensor], column: str) -> torch.Tensor:
        """Text hidden states of a batch: read from the shards, or encoded from the tokens."""
        if self.text_encoder is None:
            return batch[column].float()
        tokens = batch[schema.TEXT_TOKENS].long()
        with torch.no_grad():
            return self.text_encoder(tokens, attention_mask(tokens))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator,
             step: int) -> torch.Tensor:
        """The training loss of one batch at optimizer step ``step`` (counted from 0)."""
        spec = self.spec
        if spec.stage == "stage_c":
            text = drop_conditioning(self.text(batch, schema.TEXT_STAGE_C), self.empty[schema.TEXT_STAGE_C],
                                     spec.caption_dropout, generator=generator)
            noised, noise, r = self.diffusion.noise_batch(batch[schema.STAGE_C_LATENT].float(), generator=generator)
            return self.diffusion.loss(model(noised, r, text), noise, r)
        if spec.stage == "stage_b":
            text = drop_conditioning(self.text(batch, schema.TEXT_STAGE_B), self.empty[schema.TEXT_STAGE_B],
                                     spec.caption_dropout, generator=generator)
            semantic = from_stage_c_latents(batch[schema.STAGE_C_LATENT].float())
            if spec.semantic_noise:
                semantic = semantic + spec.semantic_noise * torch.randn(
                    semantic.shape, generator=generator, device=generator.device).to(semantic.device)
            # As the unconditional pass of the official decoder pipeline: no semantics at all.
            semantic = drop_conditioning(semantic, torch.zeros_like(semantic[:1]), spec.semantic_dropout, generator=generator)
            noised, noise, r = self.diffusion.noise_batch(batch[schema.STAGE_B_LATENT].float(), generator=generator)
            return self.diffusion.loss(model(noised, r, semantic, text), noise, r)
        images = batch[schema.IMAGE].permute(0, 3, 1, 2).float() / 255  # (B, 3, R, R) in [0, 1]
        if spec.stage == "stage_a":
            return self._stage_a_loss(model, images, step)
        target = F.interpolate(images, size=SEMANTIC_TARGET_SIZE, mode="area")
        return F.mse_loss(model(images), target)

    def _stage_a_loss(self, model: nn.Module, images: torch.Tensor, step: int) -> torch.Tensor:
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

    @torch.no_grad()
    def samples(self, model: nn.Module, step: int) -> Image.Image | None:
        """A grid a person can look at: what the model makes of fixed inputs at this step."""
        spec = self.spec
        model.eval()
        try:
            if spec.stage == "stage_c":
                return self._stage_c_samples(model, step)
            images = torch.tensor(spec.sample_batch[schema.IMAGE]).permute(0, 3, 1, 2).float().to(self.device) / 255 \
                if schema.IMAGE in spec.sample_batch else None
            captions = list(spec.sample_batch.get(schema.CAPTION, []))
            if spec.stage == "stage_a":
                autoencoder = exported(spec, model)
                shown = autoencoder.decode(autoencoder.encode(images)).clamp(0, 1)
            elif spec.stage == "semantic":
                shown = F.interpolate(model(images), size=images.shape[-1], mode="nearest").clamp(0, 1)
            else:
                shown = self._stage_b_samples(model, step)
                if shown is None:
                    return None
            return image_grid(_pil_images(shown), captions)
        finally:
            model.train()

    def _partner(self, stage: str) -> nn.Module | None:
        url = self.spec.partner_weights.get(stage)
        if url is None:
            return None
        model = build_model(dataclasses.replace(self.spec, stage=stage))
        return trained_weights.load(model, url, self.spec.storage).to(self.device).eval()

    def _stage_b_samples(self, model: nn.Module, step: int) -> torch.Tensor | None:
        stage_a = self._partner("stage_a")
        if stage_a is None:
            return None
        batch = {name: torch.tensor(value).to(self.device) for name, value in self.spec.sample_batch.items()
                 if name != schema.CAPTION}
        semantic = from_stage_c_latents(batch[schema.STAGE_C_LATENT].float())
        text = self.text(batch, schema.TEXT_STAGE_B)
        generator = torch.Generator(self.device).manual_seed(step)
        latents = self.diffusion.sample(lambda x, r: model(x, r, semantic, text), batch[schema.STAGE_B_LATENT].shape,
                                        timesteps=linear_timesteps(GENERATE_CONFIGS[self.spec.models]().decoder_steps),
                                        generator=generator, device=self.device)
        return stage_a.decode_stage_b_latents(latents)

    def _stage_c_samples(self, model: nn.Module, step: int) -> Image.Image | None:
        stage_b, stage_a = self._partner("stage_b"), self._partner("stage_a")
        if stage_b is None or stage_a is None:
            return None
        text = TEXT_CONFIGS[self.spec.models]()
        models = Wuerstchen(text_c=TextEncoder(text.stage_c).to(self.device), stage_c=model,
                            text_b=TextEncoder(text.stage_b).to(self.device), stage_b=stage_b, stage_a=stage_a)
        side = self.spec.resolution
        generated = generate(list(self.spec.sample_prompts), models=models, config=GENERATE_CONFIGS[self.spec.models](),
                             height=side, width=side, generator=torch.Generator(self.device).manual_seed(step))
        return image_grid(_pil_images(generated.images), list(self.spec.sample_prompts))


def _pil_images(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(image) for image in to_uint8(images)]


def decode_images(batch: dict[str, Any], resolution: int) -> dict[str, Any]:
    """Ray Data step for the image-trained stages: encoded crops -> uint8 arrays (B, R, R, 3). The
    encoders learn from squares: a crop of an aspect-ratio bucket gives its centre square."""
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in batch[schema.IMAGE]]
    batch[schema.IMAGE] = np.stack([np.asarray(ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC)
                                               if image.size != (resolution, resolution) else image)
                                    for image in images])
    return batch

