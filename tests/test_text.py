"""Text encoders: tokenisation, attention masks, and agreement with the official pipelines' encoding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDPMWuerstchenScheduler, WuerstchenPriorPipeline

from stages.text import TEXT_CONFIGS, TextEncoder, TextEncoderConfig, build_clip_text_model, clip_tokenizer, tokenize

CAPTIONS = ["a red circle on a blue background", "", "Two CATS,  sitting: 3 of them? 'quoted'", "x " * 100]


def test_tokenizer_matches_open_clip_on_plain_captions() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    input_ids, _ = tokenize(CAPTIONS)
    assert len(clip_tokenizer()) == 49408
    assert torch.equal(input_ids, SimpleTokenizer()(CAPTIONS))


def test_tokens_are_77_padded_with_zero_and_masked_after_the_end_token() -> None:
    input_ids, mask = tokenize(CAPTIONS)
    assert input_ids.shape == mask.shape == (4, 77)
    assert (input_ids[:, 0] == 49406).all()  # start of text
    ends = (input_ids == 49407).int().argmax(dim=1)  # end of text
    assert ends.tolist() == [8, 1, 13, 76]  # the long caption is truncated to keep its end token
    for row, end in enumerate(ends.tolist()):
        assert mask[row].tolist() == [1] * (end + 1) + [0] * (76 - end)
        assert (input_ids[row, end + 1 :] == 0).all()  # the LAION tokenizers pad with "!" = 0


def test_encoder_passes_the_mask_and_returns_last_hidden_states() -> None:
    encoder = TextEncoder(TEXT_CONFIGS["tiny"]().stage_c)
    hidden = encoder.encode(CAPTIONS[:2])
    assert hidden.shape == (2, 77, 32)
    input_ids, mask = tokenize(CAPTIONS[:2])
    model = encoder.model
    torch.testing.assert_close(hidden, model(input_ids, attention_mask=mask).last_hidden_state)
    unmasked = model(input_ids).last_hidden_state
    # Causal attention: tokens up to the end token never see padding; the padding positions do.
    torch.testing.assert_close(hidden[0, :9], unmasked[0, :9])
    assert not torch.allclose(hidden[0, 9:], unmasked[0, 9:])
    # The conditioning is taken after the final layer norm (DESIGN.md), not the last layer's raw output.
    last_layer = model(input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(hidden, model.final_layer_norm(last_layer))


def test_encoding_matches_the_official_prior_pipeline() -> None:
    """The diffusers pipeline, given our tokenizer and text model, encodes prompts exactly as we do."""
    encoder = TextEncoder(TEXT_CONFIGS["tiny"]().stage_c)
    pipeline = WuerstchenPriorPipeline(
        tokenizer=clip_tokenizer(), text_encoder=encoder.model, prior=None, scheduler=DDPMWuerstchenScheduler()
    )
    prompts = CAPTIONS[:3]
    cond, uncond = pipeline.encode_prompt(
        device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True, prompt=prompts
    )
    torch.testing.assert_close(encoder.encode(prompts), cond)
    torch.testing.assert_close(encoder.encode([""] * 3), uncond)


def test_tiny_encoders_are_reproducible_and_distinct() -> None:
    config = TEXT_CONFIGS["tiny"]()
    first, again = TextEncoder(config.stage_c), TextEncoder(config.stage_c)
    for (name, p), q in zip(first.model.named_parameters(), again.model.parameters()):
        assert torch.equal(p, q), name
    assert TextEncoder(config.stage_b).encode(["a"]).shape == (1, 77, 24)  # B and C widths differ on purpose


@pytest.mark.parametrize("which, params", [("stage_c", 695e6), ("stage_b", 354e6)])
def test_v2_architectures_are_the_laion_text_towers(which: str, params: float) -> None:
    """Built on the meta device as random towers of the v2 fields (from_pretrained needs the network)."""
    config = getattr(TEXT_CONFIGS["v2"](), which)
    assert config.pretrained.startswith("laion/CLIP-ViT-")
    random = getattr(TEXT_CONFIGS["v2"]().with_random_weights(), which)
    assert random == dataclasses.replace(config, pretrained=None)
    with torch.device("meta"):
        model = build_clip_text_model(random)
    assert model.config.hidden_size == config.hidden_size
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)  # DESIGN.md


def test_rejects_bad_configs_and_a_lone_string() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        TextEncoderConfig(pretrained=None, hidden_size=30, num_layers=1, num_heads=4, intermediate_size=8)
    with pytest.raises(ValueError, match="sequence of captions"):
        tokenize("a red circle")
