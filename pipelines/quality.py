"""Quality metrics of generated images: FID against real images, and CLIP score against their prompts.

Definitions and sources (docs/evaluation.md):

- FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium"): the Fréchet distance between two Gaussians fitted to a feature extractor's
  features of the generated and of the real images,
  ``|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))``.
- CLIP score (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
  Captioning"): ``w * max(cos(image embedding, caption embedding), 0)``, with w = 100 as torchmetrics
  scales it (the paper's 2.5 only rescales).

The maths here is plain PyTorch in float64 on the CPU; which images, which model and where the
results go is the evaluation phase's business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from pytorch_fid.inception import InceptionV3
from torch import nn

CLIP_SCORE_SCALE = 100.0
# pytorch-fid's index of Inception's final average pooling (pool3, 2048 features) among its output blocks.
_POOL3_BLOCK = 3


class FeatureStatistics:
    """Mean and covariance of feature vectors, accumulated batch by batch in float64.

    Batches are merged with Chan et al.'s pairwise update (each batch's own mean and centred sum of
    squares, then the correction for the distance between the means), not from raw sums of squares:
    features far from the origin relative to their spread (Inception's pool3 activations are all
    positive) would lose their covariance to cancellation in ``E[x x^T] - mu mu^T``.
    """

    def __init__(self, dim: int):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.centred_squares = torch.zeros(dim, dim, dtype=torch.float64)  # sum of (x - mean)(x - mean)^T

    def add(self, features: torch.Tensor) -> None:
        """Adds a (B, dim) batch."""
        features = features.detach().to("cpu", torch.float64)
        assert features.ndim == 2 and features.shape[1] == self.mean.numel(), features.shape
        if not len(features):
            return
        batch = FeatureStatistics(features.shape[1])
        batch.count, batch.mean = len(features), features.mean(0)
        centred = features - batch.mean
        batch.centred_squares = centred.T @ centred
        self.merge(batch)

    def merge(self, other: FeatureStatistics) -> None:
        """Adds another accumulator's features (of another worker, say)."""
        assert other.mean.shape == self.mean.shape
        count = self.count + other.count
        if not other.count:
            return
        delta = other.mean - self.mean
        self.centred_squares += other.centred_squares + torch.outer(delta, delta) * (self.count * other.count / count)
        self.mean += delta * (other.count / count)
        self.count = count

    def covariance(self) -> torch.Tensor:
        """The unbiased sample covariance (divided by count - 1, as ``numpy.cov``)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        return self.centred_squares / (self.count - 1)

    def frechet_distance(self, other: FeatureStatistics) -> float:
        return frechet_distance(self.mean, self.covariance(), other.mean, other.covariance())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``Tr((S1 S2)^(1/2))`` is taken as the sum of the square roots of the eigenvalues of the symmetric
    ``S1^(1/2) S2 S1^(1/2)``, which has the eigenvalues of ``S1 S2``: symmetric eigensolvers only, so
    no complex intermediate and no general matrix square root, which is unstable for the nearly
    singular covariances of fewer samples than features. Eigenvalues that rounding pushed below zero
    count as zero.
    """
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(x, dtype=torch.float64) for x in (mu1, mu2, sigma1, sigma2))
    assert mu1.shape == mu2.shape and sigma1.shape == sigma2.shape == (mu1.numel(), mu1.numel()), (
        mu1.shape,
        mu2.shape,
        sigma1.shape,
        sigma2.shape,
    )
    values, vectors = torch.linalg.eigh(sigma1)
    root1 = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    product = root1 @ sigma2 @ root1
    trace_root = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_root
    return distance.item()


@torch.inference_mode()
def clip_scores(
    model: nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    device: torch.device,
) -> torch.Tensor:
    """(N,) CLIP score of each image against its caption, with an open_clip model and its image
    preprocessing and tokenizer (``pipelines.embed.load_clip``: the embed phase's model)."""
    assert len(images) == len(captions), (len(images), len(captions))
    pixels = torch.stack([preprocess(image) for image in images]).to(device)
    image_embedding = model.encode_image(pixels).double()
    text_embedding = model.encode_text(tokenizer(list(captions)).to(device)).double()
    cosine = torch.nn.functional.cosine_similarity(image_embedding, text_embedding, dim=-1)
    return (CLIP_SCORE_SCALE * cosine.clamp(min=0)).cpu()


class TinyFeatures(nn.Module):
    """A small random convolutional extractor with the interface of the real ones: tests and tiny runs,
    where the numbers exercise the maths and mean nothing."""

    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.layers = nn.Sequential(
                nn.Conv2d(3, dim // 2, 3, stride=2),
                nn.ReLU(),
                nn.Conv2d(dim // 2, dim, 3, stride=2),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images).flatten(1)


class FidInceptionFeatures(nn.Module):
    """The pool3 features (2048) of the Inception-v3 that FID is defined with: pytorch-fid's port of
    the TensorFlow FID Inception weights, which it fetches from its release page when built and torch
    keeps in its hub cache. It resizes the images to 299 px (bilinear) and scales [0, 1] to [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.inception = InceptionV3([_POOL3_BLOCK], resize_input=True, normalize_input=True, use_fid_inception=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (pool3,) = self.inception(images)
        return pool3.flatten(1)


# Feature extractors for FID by name: each maps (B, 3, H, W) images in [0, 1] to (B, dim) features.
# FID values are comparable only between runs that name the same extractor.
FEATURE_EXTRACTORS: dict[str, Callable[[], nn.Module]] = {
    "inception-v3-fid": FidInceptionFeatures,
    "tiny": TinyFeatures,
}


def feature_extractor(name: str) -> nn.Module:
    """The named extractor, in eval mode and frozen."""
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(f"unknown FID feature extractor {name!r}: choose one of {', '.join(FEATURE_EXTRACTORS)}")
    return FEATURE_EXTRACTORS[name]().eval().requires_grad_(False)
