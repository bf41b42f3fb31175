"""Parts of the trainable stages (pipelines/trainable) that a training run leans on without showing:
the crop check that stops a Stage B run before Ray Train starts, the semantic compressor's export,
and the diffusion tasks' text on tokens-only shards."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipelines import schema
from pipelines.config import load_config
from pipelines.trainable.base import TaskSpec
from pipelines.trainable.semantic import SemanticWithProbe, export
from pipelines.trainable.stage_b import check_crop
from pipelines.trainable.stage_c import StageCTask
from pipelines.trainable.text_conditioned import TextConditionedTask
from stages.semantic import SEMANTIC_CONFIGS, SemanticCompressor
from stages.stage_c import STAGE_C_CONFIGS, StageC
from stages.text import TEXT_CONFIGS, attention_mask, clip_tokenizer


def test_a_crop_whose_latent_stage_b_cannot_take_names_the_setting_that_fixes_it():
    config = load_config("tiny")
    check_crop(config, (64, 64))  # 16x16 latents: multiples of the tiny Stage B's 8
    with pytest.raises(ValueError, match=r"48x80 crops have 12x20 Stage A latents.*set decode.bucket_multiple"):
        check_crop(config, (48, 80))


def test_the_exported_semantic_compressor_leaves_its_probe_and_takes_its_output_scale():
    torch.manual_seed(0)
    config = SEMANTIC_CONFIGS["tiny"]()
    model = SemanticWithProbe(SemanticCompressor(config)).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = model.compressor(images)
        exported = export(model)
        after = exported(images)
    assert set(exported.state_dict()) == set(SemanticCompressor(config).state_dict())
    torch.testing.assert_close(after, config.output_scale * before)


def test_tokens_only_shards_train_as_the_hidden_states_their_tokens_encode_to():
    text = TEXT_CONFIGS["tiny"]().stage_c
    empty = {schema.TEXT_STAGE_C: np.zeros((1, 77, text.hidden_size), np.float32)}
    spec = TaskSpec(
        stage="stage_c",
        models="tiny",
        caption_dropout=0.5,
        semantic_dropout=0.0,
        semantic_noise=0.0,
        text_from_tokens=True,
        empty_caption=empty,
    )
    torch.manual_seed(0)
    from_tokens = StageCTask(spec, torch.device("cpu"))
    from_hidden = StageCTask(dataclasses.replace(spec, text_from_tokens=False), torch.device("cpu"))
    assert isinstance(from_tokens, TextConditionedTask) and from_hidden.text_encoder is None
    tokens = torch.randint(1, 1000, (4, 77))
    tokens[:, 9] = clip_tokenizer().eos_token_id  # captions of 9 tokens
    with torch.no_grad():
        hidden = from_tokens.text_encoder(tokens, attention_mask(tokens))
    latents = torch.randn(4, 16, 4, 4)
    model = StageC(STAGE_C_CONFIGS["tiny"]())

    def loss(task, batch):
        return task.loss(model, batch, torch.Generator().manual_seed(3), step=0)

    torch.testing.assert_close(
        loss(from_tokens, {schema.STAGE_C_LATENT: latents, schema.TEXT_TOKENS: tokens}),
        loss(from_hidden, {schema.STAGE_C_LATENT: latents, schema.TEXT_STAGE_C: hidden}),
    )
