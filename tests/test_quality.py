"""The metric maths: FID against closed forms and pytorch-fid's formula, streamed feature statistics
against numpy on the whole set, CLIP score against a hand computation with a tiny random CLIP."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from pipelines import quality
from pipelines.config import load_config
from pipelines.embed import load_clip


def _closed_form(mu1, eigenvalues1, mu2, eigenvalues2) -> float:
    """FID of Gaussians whose covariances share their eigenvectors: the square roots of the
    eigenvalues subtract pairwise."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(eigenvalues1) - np.sqrt(eigenvalues2)) ** 2))


def test_fid_of_diagonal_covariances_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
    s1, s2 = rng.uniform(0.1, 5, size=64), rng.uniform(0.1, 5, size=64)
    expected = _closed_form(mu1, s1, mu2, s2)
    assert quality.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)
    assert quality.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0, abs=1e-12)


def test_fid_of_commuting_covariances_singular_ones_included_is_the_closed_form():
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.normal(size=(48, 48)))
    a, b = rng.uniform(0, 3, size=48), rng.uniform(0, 3, size=48)
    a[:20] = 0  # rank 28: the covariance of fewer samples than features
    mu1, mu2 = rng.normal(size=48), rng.normal(size=48)
    sigma1, sigma2 = (rotation * a) @ rotation.T, (rotation * b) @ rotation.T
    # An eigenvalue that is zero but for rounding (~1e-16) has a square root of up to ~1e-8: 20 of them
    # move the result by ~1e-7 at most.
    assert quality.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(_closed_form(mu1, a, mu2, b), abs=1e-6)
    assert quality.frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0, abs=1e-6)


def _pytorch_fid_formula(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's ``calculate_frechet_distance`` (as the TTUR reference code): a general matrix square
    root of S1 S2 (scipy), its real part. Written out: pytorch-fid 0.3.0 passes scipy's ``disp``
    argument, which SciPy 1.18 removes."""
    root = linalg.sqrtm(sigma1 @ sigma2)
    assert np.allclose(np.diagonal(root).imag, 0, atol=1e-3)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root.real))


def test_fid_agrees_with_pytorch_fids_formula_on_full_covariances():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32))
    generated = rng.normal(0.3, 1, size=(300, 32)) @ rng.normal(size=(32, 32)) + 2
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (generated, real)]
    expected = _pytorch_fid_formula(*stats[0], *stats[1])
    assert expected > 1
    assert quality.frechet_distance(*stats[0], *stats[1]) == pytest.approx(expected, rel=1e-7)


def test_streamed_statistics_are_numpys_mean_and_covariance_of_the_whole_set():
    rng = np.random.default_rng(3)
    # Far from the origin relative to their spread, as Inception's all-positive pool3 features are.
    features = 1e4 + rng.normal(size=(100, 24)) @ rng.normal(size=(24, 24))
    streamed, halves = quality.FeatureStatistics(24), [quality.FeatureStatistics(24), quality.FeatureStatistics(24)]
    for start, stop in [(0, 1), (1, 8), (8, 8), (8, 72), (72, 100)]:  # uneven batches, an empty one among them
        streamed.add(torch.from_numpy(features[start:stop]))
        halves[start >= 50].add(torch.from_numpy(features[start:stop]))
    assert streamed.count == 100
    np.testing.assert_allclose(streamed.mean.numpy(), features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(streamed.covariance().numpy(), np.cov(features, rowvar=False), rtol=1e-8, atol=1e-8)
    # Accumulators of parts merged (the features of several workers) equal one over the whole.
    merged = halves[0]
    merged.merge(halves[1])
    np.testing.assert_allclose(merged.mean.numpy(), features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.covariance().numpy(), np.cov(features, rowvar=False), rtol=1e-8, atol=1e-8)
    assert merged.frechet_distance(merged) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="a covariance needs at least 2 feature vectors, got 1"):
        one = quality.FeatureStatistics(24)
        one.add(torch.from_numpy(features[:1]))
        one.covariance()


def test_clip_score_is_100_times_the_positive_cosine_of_the_embed_phases_model():
    config = dataclasses.replace(load_config("tiny").embed, seed=3)
    model, preprocess, tokenizer = load_clip(config, torch.device("cpu"))
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)) for _ in range(12)]
    captions = [
        f"a {colour} {shape}"
        for colour in ("red", "green", "blue")
        for shape in ("square", "circle", "triangle", "star")
    ]
    scores = quality.clip_scores(model, preprocess, tokenizer, images, captions, torch.device("cpu"))

    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(i) for i in images])).double().numpy()
        text = model.encode_text(tokenizer(captions)).double().numpy()
    cosine = (image * text).sum(1) / np.linalg.norm(image, axis=1) / np.linalg.norm(text, axis=1)
    assert (cosine > 0).any() and (cosine < 0).any(), cosine  # both sides of the clamp are exercised
    np.testing.assert_allclose(scores.numpy(), 100 * np.maximum(cosine, 0), rtol=1e-6, atol=1e-6)


def test_feature_extractors_by_name():
    extractor = quality.feature_extractor("tiny")
    assert not any(p.requires_grad for p in extractor.parameters()) and not extractor.training
    images = torch.rand(5, 3, 64, 48)
    features = extractor(images)
    assert features.shape == (5, 16)
    torch.testing.assert_close(quality.feature_extractor("tiny")(images), features)  # seeded: the same every time
    with pytest.raises(
        ValueError, match="unknown FID feature extractor 'inception': choose one of inception-v3-fid, tiny"
    ):
        quality.feature_extractor("inception")
