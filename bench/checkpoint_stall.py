"""Step time while a checkpoint is written: the synchronous save of the training loop before it
wrote in the background (full state gathered, written and hashed on rank 0, uploaded before the step
returns) against ``pipelines.training.checkpoint.Checkpointer`` (each rank copies its part to CPU,
then writes, hashes and uploads it while training goes on), and its durable form (the preemption's
and the final checkpoint's: the same files, written and uploaded before the step returns).

One Ray Train run (``--workers`` DDP workers) trains an MLP of ``--megabytes`` of fp32 weights
(checkpoint: weights, EMA and AdamW's two moments, 4x that) with AdamW and an EMA, and checkpoints
every ``--every`` steps, the three kinds in turn, ``--repeats`` times each, into the run's storage
in a local temp dir. Per kind: the checkpointing step's time, and the time the steps after it (up
to the next checkpoint) took beyond the median step without a checkpoint in flight: the cost that
overlapping moves there.

    python bench/checkpoint_stall.py                                  # CPU, 100 MB of weights
    python bench/checkpoint_stall.py --device cuda --megabytes 2000 --batch 256
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.train.torch  # noqa: E402
import torch  # noqa: E402
from ray.train import Checkpoint, RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict  # noqa: E402

from cluster.budget import BudgetMeter  # noqa: E402
from pipelines.training.checkpoint import STATE_FILE, Checkpointer, TrainingState, file_record  # noqa: E402
from pipelines.training.parallel import full_state  # noqa: E402
from pipelines.training.step import swapped_in  # noqa: E402

KINDS = ("gathered-sync", "sharded-async", "sharded-sync")


def gathered_save(model: nn.Module, ema: list[torch.Tensor], optimizer, state: TrainingState, folder: Path) -> None:
    """The reference: the synchronous save the training loop made before ``Checkpointer``."""
    model_state = full_state(model)
    with swapped_in(model, ema):
        ema_state = full_state(model)
    optimizer_state = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report({"step": state.step}, checkpoint=None)
        return
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model_state.items()}, folder / "model.safetensors")
    save_file({k: v.contiguous() for k, v in ema_state.items()}, folder / "ema.safetensors")
    torch.save(optimizer_state, folder / "optimizer.pt")
    files = {name: file_record(folder / name) for name in ("model.safetensors", "ema.safetensors", "optimizer.pt")}
    (folder / STATE_FILE).write_text(json.dumps({**dataclasses.asdict(state), "files": files}))
    ray.train.report({"step": state.step}, checkpoint=Checkpoint.from_directory(str(folder)))


def worker(args: dict) -> None:
    device = ray.train.torch.get_device()
    torch.manual_seed(0)
    width = args["width"]
    layers = max(1, round(args["megabytes"] * 2**20 / (4 * width * width)))
    model = nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(layers)))
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = [p.detach().clone() for p in model.parameters()]
    checkpoints = Checkpointer(model, optimizer, ema, device)
    meter = BudgetMeter(units_held=1, budget=None)
    state = TrainingState()
    batch = torch.randn(args["batch"], width, device=device)
    kinds = [kind for _ in range(args["repeats"]) for kind in KINDS]
    seconds: list[float] = []
    checkpointed: dict[int, str] = {}  # step -> the kind of checkpoint written at it
    scratch = Path(tempfile.mkdtemp(prefix="checkpoint-stall-"))
    for step in range(1, args["every"] * (len(kinds) + 1) + 1):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(batch).square().mean().backward()
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p.detach(), 0.001)
        state.step = step
        checkpoints.report_written(step)
        if step % args["every"] == 0 and step // args["every"] <= len(kinds):
            kind = checkpointed[step] = kinds[step // args["every"] - 1]
            if kind == "gathered-sync":
                gathered_save(model, ema, optimizer, state, scratch / f"step_{step}")
            else:
                checkpoints.save(state, meter, durable=kind == "sharded-sync")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    checkpoints.report_written(state.step, wait=True)
    # Rank 0's timings travel as the last checkpoint: the run's result holds the latest checkpoint's
    # metrics, not the latest report's.
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report({"step": state.step}, checkpoint=None)
        return
    timings = scratch / "timings"
    timings.mkdir()
    state_bytes = 4 * sum(p.numel() * p.element_size() for p in model.parameters())
    (timings / "timings.json").write_text(
        json.dumps({"seconds": seconds, "checkpointed": checkpointed, "state_bytes": state_bytes})
    )
    ray.train.report({"step": state.step}, checkpoint=Checkpoint.from_directory(str(timings)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--megabytes", type=float, default=100.0, help="fp32 weights of the model")
    parser.add_argument("--width", type=int, default=1024, help="of each of the MLP's square layers")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--every", type=int, default=8, help="steps between checkpoints")
    parser.add_argument("--repeats", type=int, default=2, help="checkpoints of each kind")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, ray {ray.__version__}")
    if args.device == "cuda":
        print("gpu:", torch.cuda.get_device_name())
    ray.init(num_cpus=max(2, args.workers), include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory() as storage:
            result = TorchTrainer(
                worker,
                train_loop_config=vars(args),
                scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.device == "cuda"),
                run_config=RunConfig(name="checkpoint-stall", storage_path=storage),
            ).fit()
            with result.checkpoint.as_directory() as folder:
                timings = json.loads((Path(folder) / "timings.json").read_text())
    finally:
        ray.shutdown()
    summarise(timings, args.every)


def summarise(metrics: dict, every: int) -> None:
    """Per kind of checkpoint, the mean over its repeats of the checkpointing step's time and of the
    time the steps after it took beyond the median step of the first and last intervals (no
    checkpoint written or in flight; the first step, which warms up, left out)."""
    seconds, checkpointed = metrics["seconds"], {int(k): v for k, v in metrics["checkpointed"].items()}
    median = statistics.median(seconds[1 : every - 1] + seconds[-every + 1 :])
    print(f"state {metrics['state_bytes'] / 2**20:.0f} MiB; median step without a checkpoint {median:.3f} s")
    print(f"{'kind':<15} {'checkpoint step':>16} {'steps after, extra':>19} {'total extra':>12}")
    for kind in KINDS:
        steps = [step for step, name in checkpointed.items() if name == kind]
        stall = statistics.mean(seconds[step - 1] - median for step in steps)
        after = statistics.mean(sum(s - median for s in seconds[step : step + every - 1]) for step in steps)
        print(f"{kind:<15} {median + stall:>14.3f} s {after:>17.3f} s {stall + after:>10.3f} s")


if __name__ == "__main__":
    main()
