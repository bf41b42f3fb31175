"""How the loop spreads a stage's model over the workers and compiles it: DDP or FSDP2, and
torch.compile block by block, as the stage's ``Parallelism`` says (its model code stays single-device)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import ray.train.torch
import torch
import torch._functorch.config
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from pipelines.trainable.base import Parallelism
from pipelines.training.config import TrainConfig


def data_parallel(model: nn.Module, parallelism: Parallelism, config: TrainConfig, device: torch.device) -> nn.Module:
    """``model`` on ``device``, replicated over the workers (DDP) or sharded (FSDP)."""
    if config.strategy == "fsdp":
        return fully_sharded(model.to(device), parallelism, device)
    return ray.train.torch.prepare_model(model, parallel_strategy="ddp")


def fully_sharded(model: nn.Module, parallelism: Parallelism, device: torch.device) -> nn.Module:
    """``model`` sharded over all workers with FSDP2: each of the stage's sharded blocks is gathered
    only while it runs forward or backward; the rest (embeddings, timestep blocks, heads) with the root."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in model.modules():
        if isinstance(module, parallelism.sharded_blocks):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def compile_blocks(
    model: nn.Module, parallelism: Parallelism, memory_budget: tuple[float, ...] = (1.0,), backend: str = "inductor"
) -> nn.Module:
    """``model`` with each of the stage's compiled blocks compiled in place, or compiled whole if the
    stage has none, each graph keeping at most its budget's share of its default saved activations:
    one budget for every block, or one per level of the stage's levels (TrainConfig.activation_memory_budget).
    ``backend``: inductor to train; bench/peak_memory.py runs the same partitioned graphs op by op
    (``aot_eager_decomp_partition``), which fake tensors can go through.

    Sets torch settings process-wide (dynamo's recompile limit; the budget of a model compiled whole):
    they are read whenever a graph compiles, long after this returns. The training loop runs inside
    ``worker_torch_settings`` (pipelines/train.py), which puts them back.

    Compiled whole, a checkpointed v2 Stage B kept far more alive in backward than eager
    checkpointing (25.6 against 17.6 GiB on an H200, docs/benchmarks.md): per block, inductor's
    backward of one block is all that a checkpoint recomputes. Static shapes: a run has a handful of
    batch shapes, and with dynamic ones inductor (torch 2.14.1) fails on the second shape of tiny
    Stage B and Stage C (ordering the symbolic strides of a convolution's input)."""
    blocks = _blocks_with_budgets(unwrapped(model), parallelism, memory_budget)
    if not blocks:
        (budget,) = memory_budget
        torch._functorch.config.activation_memory_budget = budget
        return torch.compile(model, backend=backend, dynamic=False)
    # Every block runs through one compiled function, so each (block shape, budget, batch shape)
    # counts against one recompile limit: the v2 Stage B has 14 block shapes, and each of up to 9
    # aspect-ratio buckets compiles them again, far past the default of 8. Set once, not patched per
    # call like the budget: a patch of dynamo's config costs several times one of functorch's.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    compiled = torch.compile(_block_forward, backend=backend, dynamic=False)
    for block, budget in blocks:
        # Forward hooks (FSDP's gathers) stay eager around it, as with torchtitan's per-block compile.
        block.forward = functools.partial(_call_within_budget, compiled, block, budget)
    return model


def _blocks_with_budgets(
    model: nn.Module, parallelism: Parallelism, memory_budget: tuple[float, ...]
) -> list[tuple[nn.Module, float]]:
    """The blocks ``compile_blocks`` compiles, each with its budget."""
    levels = parallelism.levels(model) if parallelism.levels is not None else [[model]]
    if len(memory_budget) == 1:
        groups = [[model]]
    elif parallelism.levels is not None and len(memory_budget) == len(levels):
        groups = levels
    else:
        raise ValueError(
            f"activation_memory_budget has {len(memory_budget)} shares: give one for every block, or for "
            f"Stage B one per level ({len(levels)} here)"
        )
    return [
        (block, budget)
        for group, budget in zip(groups, memory_budget)
        for module in group
        for block in module.modules()
        if isinstance(block, parallelism.compiled_blocks)
    ]


def _call_within_budget(
    compiled: Callable[..., Any], block: nn.Module, budget: float, *args: Any, **kwargs: Any
) -> Any:
    """``block``'s compiled forward, partitioned under ``budget`` when it compiles, which happens
    inside this call (at the first one and at every recompile). The process-wide setting, patched
    per call, not torch's ``region_activation_memory_budget``: that came after torch 2.11, which the
    lent GPU machines run."""
    with torch._functorch.config.patch(activation_memory_budget=budget):
        return compiled(block, budget, *args, **kwargs)


def _block_forward(block: nn.Module, budget: float, *args: Any, **kwargs: Any) -> Any:
    # Reading the budget makes it part of what the compiled code is cached under, so blocks of one
    # shape with different budgets compile apart instead of reusing each other's partition.
    assert 0 <= budget <= 1, budget
    return type(block).forward(block, *args, **kwargs)


def unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, gathered from shards under FSDP, in tensors of its own."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # On CPU without FSDP there is nothing to gather or move, and the state dict holds the parameters
    # themselves: a caller that reads it with the EMA swapped in would otherwise find the trained
    # weights in it once they are swapped back.
    live = {tensor.data_ptr() for tensor in (*model.parameters(), *model.buffers())}
    return {name: value.clone() if value.data_ptr() in live else value for name, value in state.items()}


def all_agree(fits: bool, device: torch.device) -> bool:
    """Every rank stops at the same step: rank 0's decision holds for all."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fits
    flag = torch.tensor([1.0 if fits else 0.0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def every_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on all of them."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())
