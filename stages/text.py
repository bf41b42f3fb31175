"""CLIP text encoders: captions -> last hidden states (docs/design.md, "Text encoders").

Stage C is conditioned on CLIP ViT-bigG/14 (77 x 1280), Stage B on CLIP ViT-H/14 (77 x 1024), both
as the official v2 pipelines do it: captions tokenised to 77 tokens (truncated, padded with id 0,
the LAION tokenizers' "!" pad token), the attention mask passed to the text model, and its
`last_hidden_state` (final layer norm applied) used for every token, padding included.

The tokenizer is transformers' `CLIPTokenizer` built from the CLIP BPE vocabulary that ships with
open_clip, so it needs no network and tokenises exactly as the hub tokenizers of those models
(including their treatment of "!" as the pad token, where open_clip's own tokenizer differs).
`v2` configs load the real text towers by hub name (`CLIPTextModel.from_pretrained`); `tiny`
configs build small random ones, seeded so that every process gets the same weights.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CLIP_VOCAB_SIZE = 49408
CLIP_MERGES = 49152 - 256 - 2  # BPE merges in the CLIP vocabulary (the rest: bytes, byte+</w>, 2 specials)
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
PAD_TOKEN = "!"  # id 0; the pad token of the LAION CLIP tokenizers on the hub
MAX_LENGTH = 77


@dataclass(frozen=True, kw_only=True)
class TextEncoderConfig:
    """One CLIP text tower and its tokenisation."""

    pretrained: str | None
    """Hub name to load (e.g. laion/CLIP-ViT-bigG-14-laion2B-39B-b160k); None builds a random model."""
    hidden_size: int
    """Width of the hidden states (the conditioning width the stage expects)."""
    num_layers: int
    """Transformer layers (used when pretrained is None)."""
    num_heads: int
    """Attention heads (used when pretrained is None)."""
    intermediate_size: int
    """MLP width (used when pretrained is None)."""
    hidden_act: str = "gelu"
    """MLP activation (used when pretrained is None)."""
    max_length: int = MAX_LENGTH
    """Tokens per caption after truncation and padding."""
    init_seed: int = 0
    """Seed of the random weights when pretrained is None."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TextEncoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"TextEncoderConfig.num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})"
            )
        if not 2 <= self.max_length <= MAX_LENGTH:
            raise ValueError(f"TextEncoderConfig.max_length must be in [2, {MAX_LENGTH}], got {self.max_length}")


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """The two text encoders of Würstchen."""

    stage_c: TextEncoderConfig
    """Conditioning of Stage C (CLIP bigG in v2)."""
    stage_b: TextEncoderConfig
    """Conditioning of Stage B (CLIP H in v2)."""

    def with_random_weights(self) -> TextConfig:
        """The same towers built random (seeded by their ``init_seed``) instead of loaded by hub name: the
        architecture and cost of the real ones where their weights cannot be fetched (offline benchmarks)."""
        return replace(
            self, stage_c=replace(self.stage_c, pretrained=None), stage_b=replace(self.stage_b, pretrained=None)
        )


def tiny() -> TextConfig:
    """Small random towers; different widths for B and C so swapped conditionings fail loudly."""
    return TextConfig(
        stage_c=TextEncoderConfig(pretrained=None, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        stage_b=TextEncoderConfig(
            pretrained=None, hidden_size=24, num_layers=2, num_heads=2, intermediate_size=48, init_seed=1
        ),
    )


def v2() -> TextConfig:
    """The text towers of the official v2 pipelines (695M and 354M parameters)."""
    return TextConfig(
        stage_c=TextEncoderConfig(
            pretrained="laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
            hidden_size=1280,
            num_layers=32,
            num_heads=20,
            intermediate_size=5120,
        ),
        stage_b=TextEncoderConfig(
            pretrained="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            hidden_size=1024,
            num_layers=24,
            num_heads=16,
            intermediate_size=4096,
        ),
    )


TEXT_CONFIGS: dict[str, Callable[[], TextConfig]] = {"tiny": tiny, "v2": v2}


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible map from bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@functools.cache
def clip_tokenizer() -> CLIPTokenizer:
    """The CLIP BPE tokenizer (vocabulary of 49408), built offline from open_clip's vocabulary file."""
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations, "open_clip_torch is a dependency"
    bpe_file = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_file, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_MERGES]]  # line 0 is a header
    symbols = list(_bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN]
    tokenizer = CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=merges,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_LENGTH,
    )
    # A wrong vocabulary tokenises silently into garbage, so check it (docs/design.md, "Text encoders").
    assert len(tokenizer) == CLIP_VOCAB_SIZE and tokenizer.pad_token_id == 0, len(tokenizer)
    return tokenizer


def tokenize(captions: Sequence[str], *, max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (input_ids, attention_mask), both int64 (B, max_length), as the official pipelines do."""
    if isinstance(captions, str):
        raise ValueError("tokenize expects a sequence of captions, not one string")
    out = clip_tokenizer()(
        list(captions), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    return out.input_ids, out.attention_mask


def attention_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """The mask `tokenize` returns, rebuilt from stored ids: tokens up to and including the first end-of-text."""
    first_end = (input_ids == clip_tokenizer().eos_token_id).int().argmax(dim=1, keepdim=True)  # (B, 1)
    return (torch.arange(input_ids.shape[1], device=input_ids.device) <= first_end).long()


def build_clip_text_model(config: TextEncoderConfig) -> CLIPTextModel:
    """The transformers CLIP text model: loaded by hub name, or random from the config's fields."""
    if config.pretrained is not None:
        model = CLIPTextModel.from_pretrained(config.pretrained)
        if model.config.hidden_size != config.hidden_size:
            raise ValueError(
                f"{config.pretrained} has hidden size {model.config.hidden_size}, "
                f"but TextEncoderConfig.hidden_size is {config.hidden_size}"
            )
        return model
    clip_config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=MAX_LENGTH,
        hidden_act=config.hidden_act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        return CLIPTextModel(clip_config)


class TextEncoder(nn.Module):
    """A frozen-by-default CLIP text tower: captions or tokens -> (B, max_length, hidden_size)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = build_clip_text_model(config).eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Tokens from `tokenize` (B, L) -> last hidden states (B, L, hidden_size)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> last hidden states (B, max_length, hidden_size) on the model's device."""
        input_ids, attention_mask = tokenize(captions, max_length=self.config.max_length)
        device = self.model.device
        return self(input_ids.to(device), attention_mask.to(device))
