"""What a train step keeps for backward: saved-activation bytes of ours vs the diffusers reference.

Peak training memory on a GPU is about the static part (fp32 weights, gradients and AdamW's two
moments: 16 bytes per parameter) plus what the forward pass saves for backward. The second part
does not depend on the device: this script counts it on any machine, with autograd's
saved-tensor hooks, under the run's autocast. Each distinct storage is counted once; parameters
are not counted, the bf16 copies autocast makes of them are (in the fixed part). Variants of ours
(``--ours``, as in bench/train_step.py): checkpointed, ours saves only what the checkpointed blocks
do not recompute; not counted then: the inputs each checkpoint holds for its recompute (mostly the
previous block's output) and the transient recompute of one block during backward. Compiled (per
block, as the training loop compiles), ours saves what inductor's partitioner keeps for each
block's backward, within the memory budget if one is given; what a compiled block saves is
counted as saved by the module around it (its hooks run inside the compiled code).

Two forward passes (batch 1 and 2) split the saved bytes into a per-sample part and a fixed part,
then the script predicts the peak at the batch of bench/train_step.py (static + fixed + batch x
per-sample) for comparison with the peaks measured there on a GPU, and lists where
the per-sample bytes are saved (by module class, and by the model's top-level parts).

    python bench/activation_memory.py --stage b                 # reduced config, bf16 autocast
    python bench/activation_memory.py --stage b --config v2     # official v2 config (CPU: ~10 GB RAM)
    python bench/activation_memory.py --stage b --config v2 --ours compile,compile+budget=0.3
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import multiprocessing
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.train_step import SETUPS, build, inputs, label, memory_budget, parse_variants  # noqa: E402
from pipelines.trainable import REGISTRY  # noqa: E402
from pipelines.training.parallel import compile_blocks  # noqa: E402
from stages.diffusion import CosineDiffusion, DiffusionConfig  # noqa: E402

STATIC_BYTES_PER_PARAM = 16  # fp32 weight, fp32 gradient, AdamW exp_avg and exp_avg_sq
TOP_ROWS = 12


@dataclasses.dataclass
class Saved:
    """Bytes saved for backward by one forward pass, by where they were saved."""

    by_class: collections.Counter
    by_part: collections.Counter

    @property
    def activations(self) -> int:
        return sum(self.by_class.values())


def saved_for_backward(model: torch.nn.Module, x: torch.Tensor, r: torch.Tensor, cond: dict, autocast) -> Saved:
    names = {module: name for name, module in model.named_modules()}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack: list[torch.nn.Module] = [model]

    def enter(module: torch.nn.Module, args) -> None:
        stack.append(module)

    def leave(module: torch.nn.Module, args, out) -> None:  # returns None: the output stays the module's
        stack.pop()

    handles = [
        hook
        for module in model.modules()
        for hook in (module.register_forward_pre_hook(enter), module.register_forward_hook(leave))
    ]
    seen: dict[int, tuple[torch.nn.Module, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer and pointer not in params and pointer not in seen:
            seen[pointer] = (stack[-1], storage.nbytes())
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
            out = model(x, r, **cond)  # kept until counted: its graph holds every saved storage alive
    finally:
        for handle in handles:
            handle.remove()
    by_class, by_part = collections.Counter(), collections.Counter()
    for module, nbytes in seen.values():
        by_class[type(module).__name__] += nbytes
        by_part[".".join(names[module].split(".")[:2]) or "(top level)"] += nbytes
    del out
    return Saved(by_class, by_part)


def measure(stage: str, impl: str, options: frozenset[str], config_name: str, bf16: bool) -> dict:
    torch.manual_seed(0)
    factory, batch, side = SETUPS[config_name][stage]
    config = dataclasses.replace(factory(), checkpointing="checkpointing" in options)  # the reference ignores it
    model = build(stage, impl, config).train()
    if "compile" in options:
        compile_blocks(model, REGISTRY[f"stage_{stage}"].parallelism, memory_budget(options))
    diffusion = CosineDiffusion(DiffusionConfig())
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    passes = {}
    for pass_batch in (1, 2):
        generator = torch.Generator().manual_seed(1)
        x0, cond = inputs(stage, config, pass_batch, side, generator)
        noised, _, r = diffusion.noise_batch(x0, generator=generator)
        passes[pass_batch] = saved_for_backward(model, noised, r, cond, autocast)
    one, two = passes[1], passes[2]
    params = sum(p.numel() for p in model.parameters())
    return {
        "params": params,
        "batch": batch,
        "per_sample": two.activations - one.activations,
        "fixed": 2 * one.activations - two.activations,
        "by_class": two.by_class - one.by_class,
        "by_part": two.by_part - one.by_part,
    }


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="b", choices=["c", "b"])
    parser.add_argument("--config", default="reduced", choices=sorted(SETUPS))
    parser.add_argument(
        "--ours",
        default="eager",
        type=parse_variants,
        help="comma-separated variants of ours, as in bench/train_step.py (e.g. 'eager,checkpointing')",
    )
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    args = parser.parse_args()
    print(f"stage {args.stage.upper()}, config {args.config}, bf16 autocast {args.bf16}; torch {torch.__version__}")
    results = {}
    # One process each: a v2 model and its graph fill a small machine.
    for impl, options in [("reference", frozenset()), *[("ours", options) for options in args.ours]]:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            results[label(impl, options)] = pool.apply(measure, (args.stage, impl, options, args.config, args.bf16))
    for impl, res in results.items():
        static = STATIC_BYTES_PER_PARAM * res["params"]
        peak = static + res["fixed"] + res["batch"] * res["per_sample"]
        print(
            f"\n{impl}: {res['params'] / 1e6:,.1f}M params; saved for backward: {_mib(res['per_sample'])} per "
            f"sample + {_mib(res['fixed'])} fixed (autocast's weight copies, mostly); predicted peak at "
            f"batch {res['batch']}: {peak / 2**30:,.2f} GiB (static {static / 2**30:,.2f} GiB)"
        )
        for title, counter in (("by module class", res["by_class"]), ("by top-level part", res["by_part"])):
            rows = ", ".join(f"{name} {share / res['per_sample']:.0%}" for name, share in counter.most_common(TOP_ROWS))
            print(f"  per sample {title}: {rows}")
    print()
    reference = results.pop("reference")
    for name, ours in results.items():
        print(f"{name} / reference: {ours['per_sample'] / reference['per_sample']:.2f}x saved bytes per sample")


if __name__ == "__main__":
    main()
