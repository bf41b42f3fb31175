"""One optimizer step and the EMA after it, and the seeds that make every step's draws repeatable."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from pipelines.trainable.base import Task
from pipelines.training.config import TrainConfig


def step_seed(seed: int, rank: int, step: int) -> int:
    # A function of (seed, rank, step) alone, so a resumed run draws exactly what it would have.
    return (seed * 1_000_003 + rank) * 10_000_019 + step


def lr_factor(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Fused on CUDA: the default foreach AdamW took 16% of a v2 Stage B step on an H200.
    return torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=device.type == "cuda"
    )


def build_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak learning rate, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config.warmup_steps))


def train_step(model, optimizer, schedule, task: Task, batch, config: TrainConfig, seed: int) -> tuple[float, float]:
    """One optimizer step on ``batch`` whose random draws all follow from ``seed``; returns the loss and
    the gradient norm before clipping."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    # Dropout inside the models draws from the global generators: seeded per step as well (with a seed
    # the task's generator never gets, so the two streams differ), a resumed run draws the masks that
    # the uninterrupted one would have.
    torch.manual_seed(seed ^ (1 << 63))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = task.loss(model, batch, generator, step=schedule.last_epoch)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{task.spec.stage}: loss is {loss.item()} at step {schedule.last_epoch + 1}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    schedule.step()
    return loss.item(), float(grad_norm)


def update_ema(ema: list[torch.Tensor], model: nn.Module, step: int, config: TrainConfig) -> None:
    """After optimizer step ``step``: move the EMA towards the model, or copy it before ``ema_start``."""
    with torch.no_grad():
        if step < config.ema_start:
            for e, p in zip(ema, model.parameters()):
                e.copy_(p.detach())
        elif step % config.ema_every == 0:
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p.detach(), 1 - config.ema_beta)


@contextlib.contextmanager
def swapped_in(model: nn.Module, weights: list[torch.Tensor]):
    """Temporarily give ``model``'s (local) parameters the values ``weights`` (the EMA)."""
    originals = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, o in zip(model.parameters(), originals):
                p.copy_(o)
