"""Text encoders: tokenisation, attention masks, and agreement with the official pipelines' encoding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDPMWuerstchenScheduler, WuerstchenPriorPipeline
from transformers import CLIPConfig, CLIPModel

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
    # The conditioning is taken after the final layer norm (docs/design.md), not the last layer's raw output.
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
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)  # docs/design.md


def test_rejects_bad_configs_and_a_lone_string() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        TextEncoderConfig(pretrained=None, hidden_size=30, num_layers=1, num_heads=4, intermediate_size=8)
    with pytest.raises(ValueError, match="sequence of captions"):
        tokenize("a red circle")


def hub_text_names(hidden: int, layers: int, mlp: int) -> dict[str, tuple[int, ...]]:
    """The `text_model.*` tensors of the LAION CLIP checkpoints on the hub (transformers' CLIPModel layout,
    as the v2 towers are loaded): 49408 tokens, 77 positions, pre-norm layers, a final layer norm."""
    names = {
        "text_model.embeddings.token_embedding.weight": (49408, hidden),
        "text_model.embeddings.position_embedding.weight": (77, hidden),
        "text_model.final_layer_norm.weight": (hidden,),
        "text_model.final_layer_norm.bias": (hidden,),
    }
    for i in range(layers):
        layer = f"text_model.encoder.layers.{i}"
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            names |= {
                f"{layer}.self_attn.{projection}.weight": (hidden, hidden),
                f"{layer}.self_attn.{projection}.bias": (hidden,),
            }
        for norm in ("layer_norm1", "layer_norm2"):
            names |= {f"{layer}.{norm}.weight": (hidden,), f"{layer}.{norm}.bias": (hidden,)}
        names |= {
            f"{layer}.mlp.fc1.weight": (mlp, hidden),
            f"{layer}.mlp.fc1.bias": (mlp,),
            f"{layer}.mlp.fc2.weight": (hidden, mlp),
            f"{layer}.mlp.fc2.bias": (hidden,),
        }
    return names


def module_names(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """A text model's tensors under the checkpoint's names (transformers versions differ on the prefix)."""
    return {f"text_model.{k.removeprefix('text_model.')}": tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("which, layers, mlp", [("stage_c", 32, 5120), ("stage_b", 24, 4096)])
def test_v2_towers_have_the_hub_checkpoints_names_and_shapes(which: str, layers: int, mlp: int) -> None:
    config = getattr(TEXT_CONFIGS["v2"]().with_random_weights(), which)
    with torch.device("meta"):
        model = build_clip_text_model(config)
    assert module_names(model) == hub_text_names(config.hidden_size, layers, mlp)
    assert model.config.hidden_act == "gelu"  # the LAION towers' MLP (OpenAI's CLIP uses quick_gelu)


def test_a_full_clip_checkpoint_loads_as_the_text_tower_by_name(tmp_path) -> None:
    """The hub repos hold a whole CLIPModel (text and vision); `from_pretrained` takes its text tower."""
    torch.manual_seed(0)
    text = dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        pad_token_id=0,
        bos_token_id=49406,
        eos_token_id=49407,
    )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    clip.save_pretrained(tmp_path / "laion-clip")
    config = TextEncoderConfig(
        pretrained=str(tmp_path / "laion-clip"), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
    )
    encoder = TextEncoder(config)
    assert module_names(encoder.model) == hub_text_names(32, 2, 64)
    input_ids, mask = tokenize(CAPTIONS[:2])
    hidden = encoder(input_ids, mask)
    assert hidden.shape == (2, 77, 32)
    torch.testing.assert_close(hidden, clip.text_model(input_ids=input_ids, attention_mask=mask).last_hidden_state)
    with pytest.raises(ValueError, match="TextEncoderConfig.hidden_size is 48"):
        TextEncoder(dataclasses.replace(config, hidden_size=48))
