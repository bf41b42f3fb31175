"""Peak GPU memory of one train step, predicted on any machine: ours (variants) vs the diffusers reference.

bench/train_step.py measures the peak on a GPU (`torch.cuda.max_memory_allocated`). This script
predicts it without one, in about a minute per v2 run and with little RAM: the same step (config,
batch, initial weights, bf16 autocast, fused AdamW, the variants of ``--ours``) runs on fake tensors
(torch's FakeTensorMode: shapes, dtypes and storages, no data, no arithmetic), and a dispatch mode
adds up the bytes of every storage from the op that creates it until it is freed, rounded up as the
CUDA caching allocator rounds. The peak is that of the second step, the first one with AdamW's
state; the script says where in the step it falls and what made it up, and the step's FLOPs in
matrix products, convolutions and attention, forward and backward: what checkpointing or a memory
budget recomputes shows as FLOPs above the eager step's (in arithmetic; the time it costs a GPU is
also memory traffic, which this does not count).

How it differs from the GPU run:
- Autocast is the CPU's. Ours runs layer norm and GRN outside autocast on every device, so this
  changes nothing for ours; the reference's layer norms and softmax run in fp32 under CUDA
  autocast and keep those copies, which this run does not: the reference is predicted low (v2
  Stage C: 82 GiB against the 130 GiB measured), so compare ours with the measured reference
  (``--reference-peak``).
- Eager dropout runs CUDA's fused kernel (`native_dropout`, a 1-byte mask for backward), not the
  CPU's own, which keeps its mask in the activation dtype.
- Compiled variants compile each block as the training loop does, through the same partitioner
  and memory budget, but run the partitioned graphs op by op (``aot_eager_decomp_partition``)
  instead of inductor's kernels: what each graph saves for backward is inductor's choice, how long
  it keeps its temporaries is not (a fused kernel keeps fewer; inductor's order of a graph's
  kernels can keep some longer).

Against the H200 (docs/benchmarks.md), eager ours is predicted within 2%: v2 Stage C 57.4 GiB
(57.55 measured), v2 Stage B 32.7 (33.02), v2 Stage B checkpointed per block 17.3 (17.62); the
whole v2 Stage B compiled as one graph 29.7 (29.03), but compiled whole and checkpointed 18.6
against 25.58: inductor's one backward graph for the whole model kept 7 GiB more than its
partition alone does. Per block, a graph holds one block's temporaries.

    python bench/peak_memory.py --stage b --ours eager,checkpointing --reference-peak 41.62   # v2, batch 16
    python bench/peak_memory.py --stage b --ours compile,compile+budget=0.3
    python bench/peak_memory.py --stage b --ours eager,checkpointing --batch 8 --side 256   # v2 Stage B at 1024 px
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import multiprocessing
import sys
import weakref
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench.train_step import SETUPS, build, inputs, label, memory_budget, parse_variants  # noqa: E402
from pipelines.flops import FLOP_FORMULAS  # noqa: E402
from pipelines.trainable import REGISTRY  # noqa: E402
from pipelines.training.parallel import compile_blocks  # noqa: E402
from stages.diffusion import CosineDiffusion, DiffusionConfig  # noqa: E402

CUDA_BLOCK_BYTES = 512  # the caching allocator's smallest block: every allocation is a multiple of it
GIB = 2**30


class LiveStorages(TorchDispatchMode):
    """The bytes of all live storages created under this mode, their peak, and what the peak held;
    and the FLOPs of the matrix products, convolutions and attention run in each phase, by the
    formulas of pipelines/flops.py (what recomputation for backward adds shows there).

    Not torch's MemTracker (torch.distributed._tools), which counts the same way: its module and
    gradient hooks hold references that keep autograd from taking a compiled block's gradients as
    they are, so it copies them, and it counted 2.0 GiB more gradients than the v2 Stage B has
    (checked: with it 24 of the reduced Stage B's 210 gradients are taken as they are, without it 204).
    """

    # Compiled checkpointed blocks save and replay their RNG state through higher-order operators.
    supports_higher_order_operators = True

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # torch.compile traces the blocks without this mode and runs their graphs under it

    def __init__(self) -> None:
        super().__init__()
        self.model: torch.nn.Module | None = None  # whose gradients the peak counts
        self.nbytes: dict[int, int] = {}  # by StorageImpl address
        self.current = 0
        self.phase = "build"
        self.peak = 0
        self.peak_phase = ""
        self.peak_gradients = 0
        self.flops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in FLOP_FORMULAS:
            flops = FLOP_FORMULAS[func.overloadpacket](*args, **kwargs, out_val=out)
            self.flops[self.phase] = self.flops.get(self.phase, 0) + flops
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor.untyped_storage())
        return out

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self.nbytes:  # a view, or an op that wrote in place
            return
        nbytes = math.ceil(storage.nbytes() / CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES
        self.nbytes[key] = nbytes
        self.current += nbytes
        weakref.finalize(storage, self._free, key)
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.phase
            if self.model is not None:
                self.peak_gradients = sum(p.grad.nbytes for p in self.model.parameters() if p.grad is not None)

    def _free(self, key: int) -> None:
        self.current -= self.nbytes.pop(key)

    def start_peak(self) -> None:
        self.peak, self.peak_phase, self.peak_gradients = self.current, self.phase, 0
        self.flops = {}


CPU_DROPOUT = F.dropout


def fused_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """F.dropout as CUDA runs it: the fused kernel, which keeps a 1-byte mask for backward."""
    if training and 0 < p < 1 and not inplace:
        return torch.native_dropout(input, p, True)[0]
    return CPU_DROPOUT(input, p, training, inplace)


def train_steps(
    model, optimizer, diffusion: CosineDiffusion, x0: torch.Tensor, cond: dict, tracker: LiveStorages
) -> None:
    """bench/train_step.py's step, twice: the tracker's peak is the second step's, the first one that
    starts with AdamW's state."""
    # nn.Dropout looks F.dropout up at each call, the recompute of a checkpoint included.
    with mock.patch.object(F, "dropout", fused_dropout):
        for step in range(2):
            if step == 1:
                tracker.start_peak()
            noised, noise, r = diffusion.noise_batch(x0)
            tracker.phase = "forward"
            with torch.autocast(x0.device.type, dtype=torch.bfloat16):
                loss = diffusion.loss(model(noised, r, **cond), noise, r)
            tracker.phase = "backward"
            loss.backward()
            tracker.phase = "optimizer step"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del noised, noise, r, loss


def predict(
    stage: str, impl: str, options: frozenset[str], config_name: str, batch: int | None, side: int | None = None
) -> dict:
    """One implementation's train steps on fake tensors; executed in its own process (compile settings
    are process-wide)."""
    factory, default_batch, default_side = SETUPS[config_name][stage]
    batch, side = batch or default_batch, side or default_side
    tracker = LiveStorages()
    # The real RNG state that checkpointed compiled blocks save is the one tensor that is not fake.
    with FakeTensorMode(allow_non_fake_inputs=True), tracker:
        config = dataclasses.replace(factory(), checkpointing="checkpointing" in options)  # the reference ignores it
        model = tracker.model = build(stage, impl, config).train()
        if "compile" in options:
            compile_blocks(
                model,
                REGISTRY[f"stage_{stage}"].parallelism,
                memory_budget(options),
                backend="aot_eager_decomp_partition",
            )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as on CUDA (bench/train_step.py)
        diffusion = CosineDiffusion(DiffusionConfig())
        x0, cond = inputs(stage, config, batch, side, torch.Generator().manual_seed(1))
        train_steps(model, optimizer, diffusion, x0, cond, tracker)
        params = sum(p.nbytes for p in model.parameters())
        optimizer_state = sum(t.nbytes for state in optimizer.state.values() for t in state.values() if t.dim())
    return {
        "peak": tracker.peak,
        "phase": tracker.peak_phase,
        "gradients": tracker.peak_gradients,
        "static": params + optimizer_state,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": batch,
        "side": side,
        "forward_flops": tracker.flops.get("forward", 0),
        "backward_flops": tracker.flops.get("backward", 0),
    }


def describe(name: str, res: dict) -> str:
    rest = res["peak"] - res["static"] - res["gradients"]
    return (
        f"{name:30s}: {res['params_m']:8.1f}M params, batch {res['batch']} of {res['side']}x{res['side']} latents: "
        f"peak {res['peak'] / GIB:6.2f} GiB in "
        f"the {res['phase']:>14s} = weights and AdamW state {res['static'] / GIB:5.2f} + gradients "
        f"{res['gradients'] / GIB:5.2f} + activations and temporaries {rest / GIB:5.2f}; "
        f"{res['forward_flops'] / 1e9:,.0f} GFLOP forward, {res['backward_flops'] / 1e9:,.0f} backward"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="b", choices=["c", "b"])
    parser.add_argument("--config", default="v2", choices=sorted(SETUPS))
    parser.add_argument("--batch", type=int, default=None, help="default: the config's, as in bench/train_step.py")
    parser.add_argument("--side", type=int, default=None,
                        help="side of the square latent, default the config's (SETUPS); v2 Stage B: 256 at 1024 px, "
                             "Stage C: 24 at 1024 px")  # fmt: skip
    parser.add_argument("--ours", default="eager", type=parse_variants,
                        help="comma-separated variants of ours, as in bench/train_step.py "
                             "(e.g. 'eager,compile+budget=0.3')")  # fmt: skip
    parser.add_argument("--reference-peak", type=float, default=None, metavar="GIB",
                        help="the reference's peak measured on the GPU, for the ratios (docs/benchmarks.md: 41.62 "
                             "for the v2 Stage B at batch 16, 130.17 for the v2 Stage C at 32): the CPU's autocast "
                             "predicts the reference low")  # fmt: skip
    args = parser.parse_args()
    print(f"stage {args.stage.upper()}, config {args.config}, bf16 autocast, fused AdamW; torch {torch.__version__}")
    context = multiprocessing.get_context("spawn")
    results = {}
    for impl, options in [("reference", frozenset()), *[("ours", options) for options in args.ours]]:
        with context.Pool(1) as pool:
            res = pool.apply(functools.partial(predict, args.stage, impl, options, args.config, args.batch, args.side))
        name = label(impl, options)
        print(describe(name, res), flush=True)
        results[name] = res
    reference = results.pop("reference")
    for name, ours in results.items():
        against_measured = (f", {ours['peak'] / GIB / args.reference_peak:.2f}x the reference's measured "
                            f"{args.reference_peak:.2f} GiB" if args.reference_peak else "")  # fmt: skip
        flops = (ours["forward_flops"] + ours["backward_flops"]) / (
            reference["forward_flops"] + reference["backward_flops"]
        )
        print(
            f"{name} / reference: {ours['peak'] / reference['peak']:.2f}x the reference's predicted peak"
            f"{against_measured}; {flops:.2f}x its FLOPs"
        )


if __name__ == "__main__":
    main()
