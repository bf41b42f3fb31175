"""Text -> image through the whole chain, as the official v2 pipelines do it (docs/design.md).

prompts -> CLIP bigG hidden states -> Stage C sampled with classifier-free guidance -> x 42 - 1
-> Stage B sampled with the CLIP H hidden states -> x 0.3764 -> Stage A decode -> images in [0, 1].

Given the same weights, prompts and seeded generator, `generate` reproduces diffusers'
`WuerstchenPriorPipeline` followed by `WuerstchenDecoderPipeline` (tests/test_generate.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from stages.diffusion import (
    CosineDiffusion,
    DiffusionConfig,
    guided_denoiser,
    linear_timesteps,
)
from stages.semantic import from_stage_c_latents
from stages.stage_a import STAGE_A_CONFIGS, StageA
from stages.stage_b import STAGE_B_CONFIGS, StageB
from stages.stage_c import STAGE_C_CONFIGS, StageC
from stages.text import TEXT_CONFIGS, TextEncoder


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """Sampling settings and the size ratios between image and latents."""

    prior_steps: int = 60
    """Stage C sampling steps on the linear time grid."""
    prior_timesteps: tuple[float, ...] | None = None
    """Explicit Stage C time grid from 1 down to 0 (overrides prior_steps), e.g. stage_c_fast_timesteps()."""
    prior_guidance: float = 4.0
    """Classifier-free guidance scale of Stage C (no guidance at <= 1)."""
    decoder_steps: int = 12
    """Stage B sampling steps on the linear time grid."""
    decoder_guidance: float = 0.0
    """Classifier-free guidance scale of Stage B (no guidance at <= 1)."""
    resolution_multiple: float
    """Image pixels per Stage C latent pixel (42.67 in v2: 1024 px -> 24)."""
    latent_dim_scale: float
    """Stage B latent pixels per Stage C latent pixel (10.67 in v2: 24 -> 256)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Noise schedule the stages were trained with."""

    def __post_init__(self) -> None:
        for name in ("prior_steps", "decoder_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"GenerateConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("resolution_multiple", "latent_dim_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GenerateConfig.{name} must be > 0, got {getattr(self, name)}")


def tiny() -> GenerateConfig:
    """64 px images -> 4x4 Stage C latents -> 16x16 Stage B latents (the tiny stages' sizes)."""
    return GenerateConfig(prior_steps=20, resolution_multiple=16.0, latent_dim_scale=4.0)


def v2() -> GenerateConfig:
    """The defaults of diffusers' combined Würstchen pipeline."""
    return GenerateConfig(resolution_multiple=42.67, latent_dim_scale=10.67)


GENERATE_CONFIGS: dict[str, Callable[[], GenerateConfig]] = {"tiny": tiny, "v2": v2}


@dataclass
class Wuerstchen:
    """The models generation needs, all on one device."""

    text_c: TextEncoder
    stage_c: StageC
    text_b: TextEncoder
    stage_b: StageB
    stage_a: StageA


def build_models(name: str) -> Wuerstchen:
    """Fresh models of size `name` (a key of every stage registry); load trained weights afterwards."""
    if name not in STAGE_C_CONFIGS:
        raise ValueError(f"unknown model size {name!r}; choose from {sorted(STAGE_C_CONFIGS)}")
    text = TEXT_CONFIGS[name]()
    return Wuerstchen(
        text_c=TextEncoder(text.stage_c),
        stage_c=StageC(STAGE_C_CONFIGS[name]()),
        text_b=TextEncoder(text.stage_b),
        stage_b=StageB(STAGE_B_CONFIGS[name]()),
        stage_a=StageA(STAGE_A_CONFIGS[name]()),
    )


@dataclass
class Generated:
    """Output of `generate`."""

    images: torch.Tensor
    """(B, 3, H, W) float32 in [0, 1]; H, W are the requested size rounded as the latents allow."""
    stage_c_latents: torch.Tensor
    """(B, 16, h, w) Stage C samples, in Stage C's (e + 1) / 42 space."""
    stage_b_latents: torch.Tensor
    """(B, 4, h', w') Stage B samples, in Stage B's (raw / scale_factor) space."""


@torch.no_grad()
def generate(
    prompts: Sequence[str],
    *,
    models: Wuerstchen,
    config: GenerateConfig,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    negative_prompts: Sequence[str] | None = None,
) -> Generated:
    """Generate one image per prompt; `negative_prompts` (default: empty) steer the guidance.

    The models should be in eval mode (dropout, BatchNorm); all random draws come from `generator`.
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty sequence of strings")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}x{width}")
    negative_prompts = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    diffusion = CosineDiffusion(config.diffusion)
    batch = len(prompts)

    def encode(encoder: TextEncoder, guidance: float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        cond = encoder.encode(prompts).to(like)
        # The unconditional pass only runs with guidance.
        uncond = encoder.encode(negative_prompts).to(like) if guidance > 1 else None
        return cond, uncond

    prior_param = next(models.stage_c.parameters())
    text_c, uncond_c = encode(models.text_c, config.prior_guidance, prior_param)
    latent_height = math.ceil(height / config.resolution_multiple)
    latent_width = math.ceil(width / config.resolution_multiple)
    prior_times = config.prior_timesteps if config.prior_timesteps is not None else linear_timesteps(config.prior_steps)
    stage_c_latents = diffusion.sample(
        guided_denoiser(
            models.stage_c,
            scale=config.prior_guidance,
            cond={"c": text_c},
            uncond=None if uncond_c is None else {"c": uncond_c},
        ),
        (batch, models.stage_c.config.c_in, latent_height, latent_width),
        timesteps=prior_times,
        generator=generator,
        device=prior_param.device,
        dtype=prior_param.dtype,
    )

    decoder_param = next(models.stage_b.parameters())
    semantic = from_stage_c_latents(stage_c_latents).to(decoder_param)
    text_b, uncond_b = encode(models.text_b, config.decoder_guidance, decoder_param)
    stage_b_latents = diffusion.sample(
        guided_denoiser(
            models.stage_b,
            scale=config.decoder_guidance,
            cond={"effnet": semantic, "clip": text_b},
            # Unconditional also drops the image semantics, as the official decoder pipeline does.
            uncond=None if uncond_b is None else {"effnet": torch.zeros_like(semantic), "clip": uncond_b},
        ),
        (
            batch,
            models.stage_b.config.c_in,
            int(latent_height * config.latent_dim_scale),
            int(latent_width * config.latent_dim_scale),
        ),
        timesteps=linear_timesteps(config.decoder_steps),
        generator=generator,
        device=decoder_param.device,
        dtype=decoder_param.dtype,
    )
    vqgan_param = next(models.stage_a.parameters())
    images = models.stage_a.decode_stage_b_latents(stage_b_latents.to(vqgan_param))
    return Generated(images=images.float(), stage_c_latents=stage_c_latents, stage_b_latents=stage_b_latents)
