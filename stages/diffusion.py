"""The diffusion recipe shared by Stage B and Stage C (docs/design.md, "Training recipe").

Continuous time r in [0, 1] (0 clean, 1 pure noise), cosine schedule with offset s = 0.008 and
alpha-bar clamped to [1e-4, 0.9999], epsilon prediction, MSE weighted per sample by P2 =
1 / (1 + SNR), per-sample caption dropout for classifier-free guidance, and the DDPM sampler of the
official v2 pipelines (diffusers' `DDPMWuerstchenScheduler`), including the order in which it
draws random numbers, so a seeded generator reproduces their samples.

A training step, for either stage:

    diffusion = CosineDiffusion(DIFFUSION_CONFIGS["v2"]())
    text = drop_conditioning(text, empty_caption_text, diffusion.config.caption_dropout)
    noised, noise, r = diffusion.noise_batch(latents)
    loss = diffusion.loss(model(noised, r, text), noise, r)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    """Noise schedule, loss weighting and training-time sampling."""

    s: float = 0.008
    """Offset of the cosine schedule."""
    alpha_cumprod_min: float = 1e-4
    """Lower clamp of alpha-bar (the signal fraction at r = 1)."""
    alpha_cumprod_max: float = 0.9999
    """Upper clamp of alpha-bar (at r = 0)."""
    p2_k: float = 1.0
    """P2 loss weight (k + SNR)^-gamma: k."""
    p2_gamma: float = 1.0
    """P2 loss weight (k + SNR)^-gamma: gamma."""
    t_min: float = 0.001
    """Smallest training time r."""
    t_overshoot: float = 0.08
    """Training times are drawn on [t_min, 1 + t_overshoot] and clamped to 1, so ~7% are pure noise
    (the original training code)."""
    caption_dropout: float = 0.05
    """Probability that a training sample gets the empty caption (classifier-free guidance)."""

    def __post_init__(self) -> None:
        if self.s <= 0:
            raise ValueError(f"DiffusionConfig.s must be > 0, got {self.s}")
        if not 0 < self.alpha_cumprod_min < self.alpha_cumprod_max < 1:
            raise ValueError(
                "DiffusionConfig needs 0 < alpha_cumprod_min < alpha_cumprod_max < 1, got "
                f"{self.alpha_cumprod_min}, {self.alpha_cumprod_max}"
            )
        if not 0 <= self.t_min < 1:
            raise ValueError(f"DiffusionConfig.t_min must be in [0, 1), got {self.t_min}")
        if self.t_overshoot < 0:
            raise ValueError(f"DiffusionConfig.t_overshoot must be >= 0, got {self.t_overshoot}")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"DiffusionConfig.caption_dropout must be in [0, 1], got {self.caption_dropout}")


def v2() -> DiffusionConfig:
    """The recipe of the original training code; the tiny runs use it unchanged."""
    return DiffusionConfig()


DIFFUSION_CONFIGS: dict[str, Callable[[], DiffusionConfig]] = {"tiny": v2, "v2": v2}


def _random(
    kind: Callable[..., torch.Tensor],
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """torch.rand/randn drawn on the generator's device, then moved (diffusers' `randn_tensor` rule)."""
    source = generator.device if generator is not None else device
    return kind(tuple(shape), generator=generator, device=source, dtype=dtype).to(device)


def linear_timesteps(steps: int) -> tuple[float, ...]:
    """The official pipelines' default time grid: `steps` + 1 points from 1 to 0 (float32 values)."""
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
    return tuple(torch.linspace(1.0, 0.0, steps + 1).tolist())


def stage_c_fast_timesteps() -> tuple[float, ...]:
    """diffusers' DEFAULT_STAGE_C_TIMESTEPS: 19 steps down to r = 2/3, then 10 down to 0 (29 steps)."""
    high = torch.linspace(1.0, 2 / 3, 20, dtype=torch.float64)
    low = torch.linspace(2 / 3, 0.0, 11, dtype=torch.float64)[1:]
    return tuple(torch.cat([high, low]).float().tolist())


class CosineDiffusion:
    """Continuous-time cosine-schedule diffusion: noising, loss, and the v2 DDPM sampler."""

    def __init__(self, config: DiffusionConfig) -> None:
        self.config = config
        s = config.s
        self._alpha_cumprod_0 = math.cos(s / (1 + s) * math.pi / 2) ** 2

    def alpha_cumprod(self, r: torch.Tensor) -> torch.Tensor:
        """Signal fraction alpha-bar(r), float32, same shape as r."""
        s = self.config.s
        raw = torch.cos((r.float() + s) / (1 + s) * math.pi / 2) ** 2 / self._alpha_cumprod_0
        return raw.clamp(self.config.alpha_cumprod_min, self.config.alpha_cumprod_max)

    def _per_sample(self, r: torch.Tensor, ndim: int) -> torch.Tensor:
        return self.alpha_cumprod(r).view(-1, *[1] * (ndim - 1))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """x_r = sqrt(alpha-bar) x0 + sqrt(1 - alpha-bar) noise, in x0's dtype; r: (B,)."""
        a = self._per_sample(r, x0.ndim)
        return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)

    def sample_t(
        self, batch_size: int, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training times (B,) float32: uniform on [t_min, 1 + t_overshoot], clamped to [t_min, 1]."""
        cfg = self.config
        u = _random(torch.rand, (batch_size,), generator, device)
        return ((1 - u) * (1 + cfg.t_overshoot) + cfg.t_min).clamp(cfg.t_min, 1.0)

    def noise_batch(
        self, x0: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clean latents (B, ...) -> (noised latents, the noise (the target), times r (B,))."""
        r = self.sample_t(x0.shape[0], device=x0.device, generator=generator)
        noise = _random(torch.randn, x0.shape, generator, x0.device, x0.dtype)
        return self.add_noise(x0, noise, r), noise, r

    def p2_weight(self, r: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weight (k + SNR)^-gamma, 1 / (1 + SNR) by default: float32 (B,)."""
        a = self.alpha_cumprod(r)
        return (self.config.p2_k + a / (1 - a)) ** -self.config.p2_gamma

    def loss(self, predicted_noise: torch.Tensor, noise: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """P2-weighted MSE between predicted and true noise: a float32 scalar."""
        return self.per_sample_loss(predicted_noise, noise, r).mean()

    def per_sample_loss(self, predicted_noise: torch.Tensor, noise: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Each sample's P2-weighted MSE between predicted and true noise: float32 (B,)."""
        per_sample = (predicted_noise.float() - noise.float()).square().flatten(1).mean(dim=1)
        return per_sample * self.p2_weight(r)

    def step(
        self, predicted_noise: torch.Tensor, x: torch.Tensor, r: torch.Tensor, r_prev: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """One ancestral DDPM step from time r to r_prev < r (both (B,)); `noise` is unused at r_prev = 0."""
        a = self._per_sample(r, x.ndim)
        a_prev = self._per_sample(r_prev, x.ndim)
        alpha = a / a_prev
        mean = (1 / alpha).sqrt() * (x - (1 - alpha) * predicted_noise / (1 - a).sqrt())
        std = ((1 - alpha) * (1 - a_prev) / (1 - a)).sqrt()
        last = (r_prev == 0).view(-1, *[1] * (x.ndim - 1))
        return torch.where(last, mean, mean + std * noise).to(x.dtype)

    @torch.no_grad()
    def sample(
        self,
        denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: Sequence[int],
        *,
        timesteps: Sequence[float],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Sample (B, ...) from pure noise: `denoise(x, r)` predicts the noise; times from 1 down to 0."""
        times = torch.as_tensor(timesteps, dtype=torch.float32, device=device)
        if times.ndim != 1 or len(times) < 2 or not bool((times[1:] < times[:-1]).all()) or times[-1] != 0:
            raise ValueError(f"timesteps must be a strictly decreasing sequence ending at 0, got {times.tolist()}")
        batch = shape[0]
        x = _random(torch.randn, shape, generator, device, dtype)
        for r, r_prev in zip(times[:-1], times[1:]):
            r = r.expand(batch).to(dtype)
            predicted = denoise(x, r)
            # Drawn at every step, the last included, as the reference scheduler does.
            noise = _random(torch.randn, shape, generator, device, predicted.dtype)
            x = self.step(predicted, x, r, r_prev.expand(batch), noise)
        return x


def guided_denoiser(
    model: Callable[..., torch.Tensor],
    *,
    scale: float,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor] | None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`denoise(x, r)` for `CosineDiffusion.sample` with classifier-free guidance.

    `model(x, r, **cond)` predicts the noise. For scale > 1 the conditional and unconditional
    predictions come from one batched call and are extrapolated, uncond + scale (cond - uncond);
    for scale <= 1 only the conditional one is used (the official pipelines' rule) and `uncond`
    may be None.
    """
    if scale <= 1:
        return lambda x, r: model(x, r, **cond)
    if uncond is None or cond.keys() != uncond.keys():
        raise ValueError(f"guidance scale {scale} needs uncond with the keys of cond {sorted(cond)}, got {uncond}")
    both = {name: torch.cat([cond[name], uncond[name]]) for name in cond}

    def denoise(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        predicted, predicted_uncond = model(torch.cat([x, x]), torch.cat([r, r]), **both).chunk(2)
        return torch.lerp(predicted_uncond, predicted, scale)

    return denoise


def drop_conditioning(
    cond: torch.Tensor, uncond: torch.Tensor, p: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each sample's conditioning by `uncond` with probability p (classifier-free guidance).

    cond: (B, ...) e.g. text hidden states, token ids, or semantic latents; uncond: broadcastable
    to one sample, e.g. the empty caption's hidden states (1, 77, D) or zeros.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"drop probability must be in [0, 1], got {p}")
    dropped = _random(torch.rand, (cond.shape[0],), generator, cond.device) < p
    return torch.where(dropped.view(-1, *[1] * (cond.ndim - 1)), uncond.to(cond.dtype), cond)
