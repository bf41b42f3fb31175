"""Stage A's optional perceptual and adversarial terms: the modules, the checkpoint format, and who
each term trains."""

from __future__ import annotations

import pytest
import torch
import torchvision

from pipelines.config import load_config
from pipelines.trainable import build_model, build_task
from pipelines.trainable.base import StageALosses, TaskSpec
from pipelines.trainable.stage_a import STAGE_A, StageAWithCritic
from pipelines.training.config import TrainConfig
from pipelines.training.step import train_step
from stages.stage_a import STAGE_A_CONFIGS, StageA
from stages.stage_a_losses import (
    STAGE_A_LOSS_CONFIGS,
    CriticConfig,
    PatchCritic,
    PerceptualConfig,
    PerceptualDistance,
    critic_hinge_loss,
    generator_adversarial_loss,
)


def _images(seed: int, n: int = 4, side: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_perceptual_distance_is_zero_for_equal_images_and_frozen():
    distance = PerceptualDistance(STAGE_A_LOSS_CONFIGS["tiny"]().perceptual).train()
    a, b = _images(0), _images(1)
    assert not distance.training and not any(p.requires_grad for p in distance.parameters())
    assert torch.all(distance(a, a) == 0)
    d = distance(a, b)
    assert d.shape == (4,) and torch.all(d > 0)
    moved = a.clone().requires_grad_()
    distance(moved, b).mean().backward()
    assert moved.grad.abs().sum() > 0, "the distance must pass gradients to the reconstruction"


def test_vgg16_taps_and_torchvision_checkpoint(tmp_path):
    # torchvision's checkpoint layout: features.* and classifier.* in one weights-only pickle.
    reference = torchvision.models.vgg16(weights=None).features
    state = {f"features.{name}": t for name, t in reference.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    torch.save(state, tmp_path / "vgg16.pth")
    distance = PerceptualDistance(PerceptualConfig(network="vgg16")).load_torchvision_vgg16(tmp_path / "vgg16.pth")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(distance.features.state_dict()[name], tensor)
    # relu1_2 ... relu5_3: five taps, the deepest at 1/16 of the input side.
    taps = distance._tapped(_images(0, n=1, side=64))
    assert [t.shape[1] for t in taps] == [64, 128, 256, 512, 512] and taps[-1].shape[-1] == 4
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not torchvision's VGG16"):
        distance.load_torchvision_vgg16(tmp_path / "other.pth")


def test_critic_is_a_patch_map_with_the_gan_init():
    critic = PatchCritic(CriticConfig(channels=16, layers=3))
    logits = critic(_images(0, side=64))
    assert logits.shape == (4, 1, 6, 6)  # three stride-2 layers, then two stride-1 4x4 convs
    first = critic.layers[0].weight
    assert abs(first.std().item() - 0.02) < 0.005


def test_each_player_gets_only_its_own_gradients():
    model = StageAWithCritic(StageA(STAGE_A_CONFIGS["tiny"]()), PatchCritic(STAGE_A_LOSS_CONFIGS["tiny"]().critic))
    images = _images(0, side=64)
    _, _, fake_logits, critic_loss = model(images)
    critic_loss.backward(retain_graph=True)
    assert all(p.grad is None for p in model.autoencoder.parameters())
    assert all(p.grad is not None for p in model.critic.parameters())
    model.zero_grad(set_to_none=True)
    generator_adversarial_loss(fake_logits).backward()
    assert all(p.grad is None for p in model.critic.parameters())
    assert sum(p.grad.abs().sum() for p in model.autoencoder.parameters() if p.grad is not None) > 0


def test_hinge_loss_is_zero_once_the_critic_separates_by_the_margin():
    assert critic_hinge_loss(torch.full((2,), 1.5), torch.full((2,), -1.5)) == 0
    assert critic_hinge_loss(torch.zeros(2), torch.zeros(2)) == 2


def test_training_with_both_terms_counts_the_critic_from_its_start_step():
    losses = StageALosses(perceptual_weight=1.0, adversarial_weight=0.5, adversarial_start_step=2)
    spec = TaskSpec(
        stage="stage_a",
        models="tiny",
        caption_dropout=0,
        semantic_dropout=0,
        semantic_noise=0,
        text_from_tokens=False,
        stage_a_losses=losses,
    )
    torch.manual_seed(0)
    model = build_model(spec)
    assert isinstance(model, StageAWithCritic)
    with pytest.warns(UserWarning, match="random features"):
        task = build_task(spec, torch.device("cpu"))
    config = TrainConfig(steps=4, global_batch_size=4, warmup_steps=0, lr=1e-3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = {"image": (_images(0, side=64).permute(0, 2, 3, 1) * 255).to(torch.uint8)}
    for step in range(4):
        loss, _ = train_step(model, optimizer, schedule, task, batch, config, seed=step)
        assert torch.isfinite(torch.tensor(loss))
        critic_gradient = sum(p.grad.abs().sum() for p in model.critic.parameters())
        # Before its start step the critic runs, weighted 0: every parameter has a (zero) gradient.
        assert (critic_gradient > 0) == (step >= 2), (step, critic_gradient)
    exported_model = STAGE_A.export(model)
    assert isinstance(exported_model, StageA) and not any("critic" in k for k in exported_model.state_dict())


def test_loss_terms_outside_train_a_are_refused():
    with pytest.raises(
        ValueError, match="train_b.stage_a_losses sets Stage A's loss terms: they apply to train_a only"
    ):
        load_config("tiny", ["train_b.stage_a_losses.adversarial_weight=0.5"])
    assert load_config("v2").train_a.stage_a_losses.perceptual_weights.endswith("vgg16-397923af.pth")
