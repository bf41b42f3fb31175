"""Diffusion recipe: schedule, noising, P2 weight, caption dropout, and the official v2 sampler's math."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import DEFAULT_STAGE_C_TIMESTEPS

from stages.diffusion import (
    DIFFUSION_CONFIGS,
    CosineDiffusion,
    DiffusionConfig,
    drop_conditioning,
    guided_denoiser,
    linear_timesteps,
    stage_c_fast_timesteps,
)

DIFFUSION = CosineDiffusion(DIFFUSION_CONFIGS["v2"]())


def test_schedule_and_noising_match_the_reference_scheduler() -> None:
    scheduler = DDPMWuerstchenScheduler()
    r = torch.linspace(0, 1, 101)
    expected = scheduler._alpha_cumprod(r, "cpu")
    torch.testing.assert_close(DIFFUSION.alpha_cumprod(r), expected)
    assert expected.min() == pytest.approx(1e-4) and expected.max() == pytest.approx(0.9999)  # the clamps

    x0, noise = torch.randn(101, 4, 3, 3), torch.randn(101, 4, 3, 3)
    torch.testing.assert_close(DIFFUSION.add_noise(x0, noise, r), scheduler.add_noise(x0, noise, r))


def test_p2_weight_is_one_over_one_plus_snr() -> None:
    r = torch.tensor([0.0, 0.3, 0.7, 1.0])
    a = DIFFUSION.alpha_cumprod(r)
    torch.testing.assert_close(DIFFUSION.p2_weight(r), 1 / (1 + a / (1 - a)))
    assert DIFFUSION.p2_weight(r).tolist() == sorted(DIFFUSION.p2_weight(r).tolist())  # noisier: more weight


def test_loss_is_the_p2_weighted_per_sample_mse() -> None:
    predicted, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    r = torch.tensor([0.1, 0.5, 0.9])
    per_sample = ((predicted - noise) ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * DIFFUSION.p2_weight(r)).mean()
    torch.testing.assert_close(DIFFUSION.loss(predicted, noise, r), expected)
    torch.testing.assert_close(DIFFUSION.loss(predicted.bfloat16(), noise, r), expected, rtol=1e-2, atol=0)


def test_training_times_follow_the_original_code() -> None:
    r = DIFFUSION.sample_t(100_000, generator=torch.Generator().manual_seed(0))
    assert r.min() >= 0.001 and r.max() == 1.0
    assert (r == 1.0).float().mean().item() == pytest.approx(0.08 / 1.08, abs=0.005)  # clamped overshoot


def test_noise_batch_returns_the_noise_as_target() -> None:
    x0 = torch.randn(5, 4, 2, 2)
    noised, noise, r = DIFFUSION.noise_batch(x0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noised, DIFFUSION.add_noise(x0, noise, r))
    assert r.shape == (5,) and noise.shape == x0.shape


@pytest.mark.parametrize("timesteps", [linear_timesteps(12), stage_c_fast_timesteps()], ids=["linear", "stage-c"])
def test_sampler_reproduces_the_reference_scheduler_loop(timesteps: tuple[float, ...]) -> None:
    """Same denoiser, same seed: our sampler and the pipelines' scheduler loop give the same sample."""

    def denoise(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:  # a smooth stand-in for a model
        return torch.tanh(x) * (0.5 + r.view(-1, 1, 1, 1)) + 0.1

    shape = (2, 4, 6, 6)
    ours = DIFFUSION.sample(denoise, shape, timesteps=timesteps, generator=torch.Generator().manual_seed(7))

    # The loop of diffusers' Würstchen pipelines: initial noise, then one step per time but the last.
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(timesteps=list(timesteps))
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=generator)
    for t in scheduler.timesteps[:-1]:
        r = t.expand(shape[0])
        x = scheduler.step(denoise(x, r), r, x, generator=generator).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_time_grids_are_the_pipelines_float32_values() -> None:
    expected = torch.tensor(DEFAULT_STAGE_C_TIMESTEPS, dtype=torch.float32)  # as the scheduler holds them
    assert torch.equal(torch.tensor(stage_c_fast_timesteps()), expected)
    assert torch.equal(torch.tensor(linear_timesteps(12)), torch.linspace(1.0, 0.0, 13))


def test_sampler_rejects_times_that_do_not_run_down_to_zero() -> None:
    with pytest.raises(ValueError, match="ending at 0"):
        DIFFUSION.sample(lambda x, r: x, (1, 1), timesteps=[1.0, 0.5])
    with pytest.raises(ValueError, match=">= 1"):
        linear_timesteps(0)


def test_guidance_extrapolates_from_unconditional_in_one_batched_call() -> None:
    calls = []

    def model(x: torch.Tensor, r: torch.Tensor, *, c: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x * c.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    x, r = torch.randn(2, 4, 3, 3), torch.rand(2)
    cond, uncond = torch.full((2, 7, 5), 3.0), torch.full((2, 7, 5), 1.0)
    guided = guided_denoiser(model, scale=4.0, cond={"c": cond}, uncond={"c": uncond})(x, r)
    torch.testing.assert_close(guided, x * 1.0 + 4.0 * (x * 3.0 - x * 1.0))
    assert calls == [4]
    # At scale <= 1 the official pipelines skip guidance: the conditional prediction only.
    torch.testing.assert_close(guided_denoiser(model, scale=1.0, cond={"c": cond}, uncond=None)(x, r), x * 3.0)
    with pytest.raises(ValueError, match="needs uncond"):
        guided_denoiser(model, scale=4.0, cond={"c": cond}, uncond=None)


def test_caption_dropout_replaces_whole_samples_at_the_given_rate() -> None:
    cond = torch.randn(10_000, 77, 8)
    uncond = torch.zeros(1, 77, 8)
    out = drop_conditioning(cond, uncond, 0.05, generator=torch.Generator().manual_seed(0))
    dropped = (out == 0).all(dim=(1, 2))
    kept = (out == cond).all(dim=(1, 2))
    assert bool((dropped | kept).all())  # per sample: all of it or none of it
    assert dropped.float().mean().item() == pytest.approx(0.05, abs=0.01)
    assert torch.equal(drop_conditioning(cond, uncond, 0.0), cond)
    assert bool((drop_conditioning(cond, uncond, 1.0) == 0).all())
    tokens = torch.randint(1, 49406, (4, 77))  # token ids work too, e.g. when text is encoded at train time
    assert drop_conditioning(tokens, torch.zeros(1, 77, dtype=torch.long), 1.0).sum() == 0
    with pytest.raises(ValueError, match="drop probability"):
        drop_conditioning(cond, uncond, 1.5)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="alpha_cumprod_min"):
        DiffusionConfig(alpha_cumprod_min=0.5, alpha_cumprod_max=0.4)
    with pytest.raises(ValueError, match="caption_dropout"):
        DiffusionConfig(caption_dropout=-0.1)
