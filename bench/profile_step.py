"""Where a train step's time goes: torch.profiler's operator table for one implementation's step.

The same step, config, batch and weights as ``bench/train_step.py`` (whose helpers it uses); prints
the operators with the most device time (CPU time on a CPU), so an optimisation starts from a
measurement.

    python bench/profile_step.py --stage b                            # CPU, reduced config
    python bench/profile_step.py --device cuda --stage b --impl ours  # GPU, v2 config, bf16 autocast
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.train_step import SETUPS, adamw, build, inputs, one_step  # noqa: E402
from stages.diffusion import CosineDiffusion, DiffusionConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--stage", default="c", choices=["c", "b"])
    parser.add_argument("--impl", default="ours", choices=["ours", "reference"])
    parser.add_argument("--steps", type=int, default=3, help="profiled steps, after one warm-up step")
    parser.add_argument("--rows", type=int, default=25, help="operators listed")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    device = torch.device(args.device)
    factory, batch, side = SETUPS["v2" if cuda else "reduced"][args.stage]
    config = factory()
    torch.manual_seed(0)
    model = build(args.stage, args.impl, config).to(device).train()
    optimizer = adamw(model, device)
    diffusion = CosineDiffusion(DiffusionConfig())
    x0, cond = inputs(args.stage, config, batch, side, torch.Generator(device).manual_seed(1))

    step = functools.partial(
        one_step, model, optimizer, diffusion, x0, cond, torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    )
    step()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as profiler:
        for _ in range(args.steps):
            step()
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"stage {args.stage.upper()} {args.impl}, batch {batch}, {args.steps} steps on "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}")  # fmt: skip
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
