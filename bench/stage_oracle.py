"""The diffusers reference implementations, built from our stage configs: the oracle of the stage
tests and what bench/train_step.py races ours against; never used by shipped code.
"""

from __future__ import annotations

from unittest import mock

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_common import AttnBlock, ResBlock, TimestepBlock
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext import ResBlockStageB
from torch import nn

from stages.stage_a import StageA, StageAConfig
from stages.stage_b import StageB, StageBConfig
from stages.stage_c import StageC, StageCConfig


def reference_stage_c(config: StageCConfig) -> WuerstchenPrior:
    return WuerstchenPrior(
        c_in=config.c_in,
        c=config.c,
        c_cond=config.c_cond,
        c_r=config.c_r,
        depth=config.depth,
        nhead=config.nhead,
        dropout=config.dropout,
    )


def reference_stage_b(config: StageBConfig) -> WuerstchenDiffNeXt:
    # Its init loops over all mappers and blocks for every module (seconds at v2 size) and is always
    # overwritten here by loading our weights, so it is skipped.
    with mock.patch.object(WuerstchenDiffNeXt, "_init_weights", lambda self, module: None):
        return WuerstchenDiffNeXt(
            c_in=config.c_in,
            c_out=config.c_out,
            c_r=config.c_r,
            patch_size=config.patch_size,
            c_cond=config.c_cond,
            c_hidden=list(config.c_hidden),
            nhead=list(config.nhead),
            blocks=list(config.blocks),
            level_config=list(config.level_config),
            inject_effnet=list(config.inject_effnet),
            effnet_embd=config.effnet_embd,
            clip_embd=config.clip_embd,
            kernel_size=config.kernel_size,
            dropout=config.dropout,
        )


def reference_stage_a(config: StageAConfig) -> PaellaVQModel:
    return PaellaVQModel(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        up_down_scale_factor=config.up_down_scale_factor,
        levels=config.levels,
        bottleneck_blocks=config.bottleneck_blocks,
        embed_dim=config.embed_dim,
        latent_channels=config.latent_channels,
        num_vq_embeddings=config.codebook_size,
        scale_factor=config.scale_factor,
    )


def reference_like(model: StageA | StageB | StageC) -> nn.Module:
    """The reference implementation of `model`'s stage and config, holding `model`'s weights."""
    build = {StageA: reference_stage_a, StageB: reference_stage_b, StageC: reference_stage_c}[type(model)]
    reference = build(model.config).train(model.training)
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference


def use_fused_attention_(reference: nn.Module) -> nn.Module:
    """The reference with every attention on `F.scaled_dot_product_attention`: what a diffusers user gets
    from one `set_attn_processor(AttnProcessor2_0())` call. The prior's constructor picks the unfused
    processor, which keeps every attention matrix for backward; the decoder already uses this one."""
    for module in reference.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor2_0())
    return reference


REFERENCE_BLOCKS = (ResBlock, ResBlockStageB, TimestepBlock, AttnBlock)
"""The reference's repeated blocks, which a user compiles one by one (regional compilation)."""


@torch.no_grad()
def perturb_(module: nn.Module, std: float, seed: int = 0) -> nn.Module:
    """Add seeded Gaussian noise to every parameter and BatchNorm statistic, so that the parts a
    fresh init leaves at zero (output convs, GRN, timestep mappers, gates) are exercised too."""
    generator = torch.Generator().manual_seed(seed)
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * std)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.abs_().add_(0.5)  # variances must stay positive
    return module


def shapes(module: nn.Module) -> dict[str, torch.Size]:
    """State-dict names and shapes: what strict checkpoint loading depends on."""
    return {name: tensor.shape for name, tensor in module.state_dict().items()}
