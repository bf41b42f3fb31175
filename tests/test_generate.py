"""generate(): prompts -> images with tiny models, against diffusers' official Würstchen pipelines."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDPMWuerstchenScheduler, WuerstchenDecoderPipeline, WuerstchenPriorPipeline

from bench.stage_oracle import perturb_, reference_like
from stages.generate import GENERATE_CONFIGS, Wuerstchen, build_models, generate
from stages.text import clip_tokenizer

CONFIG = dataclasses.replace(GENERATE_CONFIGS["tiny"](), prior_steps=8, decoder_steps=6)


@pytest.fixture(scope="module")
def models() -> Wuerstchen:
    torch.manual_seed(0)
    models = build_models("tiny")
    # Fresh stages predict nearly nothing (zero output convs); perturbed ones make every step count.
    for seed, stage in enumerate((models.stage_c, models.stage_b, models.stage_a)):
        perturb_(stage, std=0.02, seed=seed).eval()
    return models


def pipelines(models: Wuerstchen) -> tuple[WuerstchenPriorPipeline, WuerstchenDecoderPipeline]:
    """The official pipelines holding the same weights, text models and (offline-built) tokenizer."""
    prior, decoder, vqgan = (reference_like(stage) for stage in (models.stage_c, models.stage_b, models.stage_a))
    prior_pipeline = WuerstchenPriorPipeline(
        tokenizer=clip_tokenizer(),
        text_encoder=models.text_c.model,
        prior=prior,
        scheduler=DDPMWuerstchenScheduler(),
        resolution_multiple=CONFIG.resolution_multiple,
    )
    decoder_pipeline = WuerstchenDecoderPipeline(
        tokenizer=clip_tokenizer(),
        text_encoder=models.text_b.model,
        decoder=decoder,
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=vqgan,
        latent_dim_scale=CONFIG.latent_dim_scale,
    )
    for pipeline in (prior_pipeline, decoder_pipeline):
        pipeline.set_progress_bar_config(disable=True)
    return prior_pipeline, decoder_pipeline


def test_generate_reproduces_the_official_pipelines(models: Wuerstchen) -> None:
    """Prior pipeline then decoder pipeline on one seeded generator, as the combined pipeline runs them.

    One prompt: diffusers' decoder pipeline repeats the text per image embedding, so it cannot
    take a batch of different prompts (tested for the prior alone below).
    """
    prior_pipeline, decoder_pipeline = pipelines(models)
    prompt = ["a red circle!"]
    generator = torch.Generator().manual_seed(3)
    image_embeddings = prior_pipeline(
        prompt,
        height=64,
        width=64,
        num_inference_steps=CONFIG.prior_steps,
        guidance_scale=CONFIG.prior_guidance,
        generator=generator,
        output_type="pt",
    ).image_embeddings
    expected = decoder_pipeline(
        image_embeddings,
        prompt,
        num_inference_steps=CONFIG.decoder_steps,
        guidance_scale=CONFIG.decoder_guidance,
        generator=generator,
        output_type="pt",
    ).images

    generator = torch.Generator().manual_seed(3)
    out = generate(prompt, models=models, config=CONFIG, height=64, width=64, generator=generator)
    # Image embeddings are x 42 latents (magnitudes in the tens): atol 1e-3 is ~1e-5 relative.
    torch.testing.assert_close(out.stage_c_latents * 42 - 1, image_embeddings, rtol=1e-4, atol=1e-3)
    assert out.images.shape == (1, 3, 64, 64)
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0 and out.images.std() > 0.01
    torch.testing.assert_close(out.images, expected, rtol=1e-4, atol=1e-4)


def test_batched_prior_with_negative_prompts_matches_the_official_pipeline(models: Wuerstchen) -> None:
    prior_pipeline, _ = pipelines(models)
    prompts, negatives = ["a red circle", "a blue square"], ["green", ""]
    expected = prior_pipeline(
        prompts,
        negative_prompt=negatives,
        height=64,
        width=128,
        num_inference_steps=CONFIG.prior_steps,
        guidance_scale=CONFIG.prior_guidance,
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
    ).image_embeddings
    out = generate(
        prompts,
        models=models,
        config=dataclasses.replace(CONFIG, decoder_steps=1),
        height=64,
        width=128,
        negative_prompts=negatives,
        generator=torch.Generator().manual_seed(5),
    )
    torch.testing.assert_close(out.stage_c_latents * 42 - 1, expected, rtol=1e-4, atol=1e-3)
    assert out.images.shape == (2, 3, 64, 128)


def test_generate_rejects_bad_requests(models: Wuerstchen) -> None:
    with pytest.raises(ValueError, match="non-empty sequence"):
        generate("a red circle", models=models, config=CONFIG, height=64, width=64)
    with pytest.raises(ValueError, match="negative prompts"):
        generate(["a", "b"], models=models, config=CONFIG, height=64, width=64, negative_prompts=["c"])
    with pytest.raises(ValueError, match="multiple of 8"):  # 40 px -> 3x3 Stage C -> 12x12 Stage B latents
        generate(["a"], models=models, config=CONFIG, height=40, width=64)
