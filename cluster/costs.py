"""What compute and object storage cost, and the throughputs the benches measured: the arithmetic
of a plan, on plain rows (the planner of a run config, ``pipelines/plan.py``, builds the rows).

The measured figures ship with the package (``cluster/measured.toml``, one table per (models,
device), one figure per phase from the bench scripts).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from importlib import resources
from typing import Protocol

from cluster.memory import StepMemory

MEASURED_FILE = resources.files("cluster") / "measured.toml"
# Throughput of a GPU kind relative to the H200 the v2 figures were measured on. A100: 312 vs 989
# dense bf16 TFLOP/s (~0.32, 40 and 80 GB alike) and 1.56 (40 GB) or 2.04 (80 GB) vs 4.8 TB/s of
# memory bandwidth (0.32-0.43); the lower ratio, of peaks, not a measurement.
GPU_SPEED_VS_H200 = {"h200": 1.0, "a100": 0.32}
# On-demand us-east-1 list prices, assumed (not checked against AWS's price list from here, and they
# change: override with --usd-per-gpu-hour): p4de.24xlarge $40.97/h for 8 A100s of 80 GB
# (ray_cluster.yaml's GPU nodes: the v2 steps need more than the 40 GB of p4d's, docs/memory.md);
# c6i.16xlarge $2.72/h for 64 vCPUs.
A100_USD_PER_GPU_HOUR = 40.97 / 8
USD_PER_CPU_HOUR = 2.72 / 64
# S3 Standard in us-east-1, assumed list prices like the instances': storage per GB-month (the
# first 50 TB; beyond, $0.022 and $0.021); reads by instances in the bucket's region carry no
# transfer charge (override --usd-per-gb-read for another region). Requests are left out: shards
# are tens of MB and more, so a LAION run makes millions of requests, a few dollars.
USD_PER_GB_MONTH = 0.023
# Spot capacity, assumed as well: a spot GPU-hour at this fraction of the on-demand price (AWS
# advertises up to 90% off; the price moves with demand: take yours from the region's spot price
# history, --spot-usd-per-gpu-hour). Interruptions per node and month: AWS's Spot Instance Advisor
# gives each instance type's share of instances interrupted in the past month in bands (<5%, 5-10%,
# 10-15%, 15-20%, >20%); this is the lower edge of its top band, where large GPU instances are often
# found (--spot-interruptions-per-node-month). A restart: a new node launched, the image pulled, the
# checkpoint loaded, the data pipeline started again, while the run's other nodes wait.
SPOT_PRICE_VS_ON_DEMAND = 0.35
SPOT_INTERRUPTIONS_PER_NODE_MONTH = 0.2
RESTART_MINUTES = 15.0
HOURS_PER_MONTH = 730.0


def load_measured(name: str) -> dict:
    """One table of the measured figures, by name (``v2_h200``, ``tiny_cpu``)."""
    tables = tomllib.loads(MEASURED_FILE.read_text())
    if name not in tables:
        raise ValueError(f"no measured table {name!r} in cluster/{MEASURED_FILE.name}; available: {', '.join(tables)}")
    return tables[name]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PhasePlan:
    phase: str
    unit: str
    """"gpu" or "cpu": what the phase holds while it runs."""
    units: float
    samples: int
    samples_per_second_per_unit: float | None
    """After scaling to the GPU kind and resolution; none: no measured figure."""
    budget: float | None = None
    """The phase's GPU-hour budget (training only)."""
    source: str = ""
    memory: StepMemory | None = None
    """Predicted peak of a training step on one GPU (training on GPUs only; none: not modelled)."""
    stored_bytes: float = 0.0
    """What the phase leaves in object storage: its output shards, or a training run's checkpoints."""
    read_bytes: float = 0.0
    """What the phase reads of earlier phases' outputs (not the input data set's own shards)."""

    @property
    def seconds(self) -> float | None:
        if self.samples_per_second_per_unit is None:
            return None
        return self.samples / (self.samples_per_second_per_unit * self.units) if self.samples else 0.0

    @property
    def unit_hours(self) -> float | None:
        """GPU-hours (GPU phases) or CPU core-hours (CPU phases)."""
        return None if self.seconds is None else self.seconds * self.units / 3600


class Prices(Protocol):
    """What a plan's costs are priced at (the planner's assumptions carry these)."""

    usd_per_gpu_hour: float
    usd_per_cpu_hour: float
    usd_per_gb_month: float
    storage_months: float
    """How long each phase's output stays in object storage."""
    usd_per_gb_read: float


@dataclasses.dataclass(frozen=True)
class Costs:
    compute: float
    storage: float
    transfer: float

    @property
    def total(self) -> float:
        return self.compute + self.storage + self.transfer


def row_costs(row: PhasePlan, prices: Prices) -> Costs:
    """USD of a phase: its GPU- or core-hours (0 without a figure), its output kept in object storage
    for the assumed months, and what it reads."""
    hours = row.unit_hours or 0.0
    compute = hours * (prices.usd_per_gpu_hour if row.unit == "gpu" else prices.usd_per_cpu_hour)
    return Costs(
        compute=compute,
        storage=row.stored_bytes / 1e9 * prices.usd_per_gb_month * prices.storage_months,
        transfer=row.read_bytes / 1e9 * prices.usd_per_gb_read,
    )


def total_costs(rows: list[PhasePlan], prices: Prices) -> Costs:
    costs = [row_costs(row, prices) for row in rows]
    return Costs(
        compute=sum(c.compute for c in costs),
        storage=sum(c.storage for c in costs),
        transfer=sum(c.transfer for c in costs),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpotRun:
    """A GPU phase on spot capacity: what its preemptions add to its GPU-hours."""

    preemptions: float
    """Expected preemptions over the run (its restarts)."""
    lost_hours_per_preemption: float
    """Wall-clock hours each one costs every GPU of the run: the restart and the work lost."""
    gpu_hours: float
    """The phase's GPU-hours on spot, its restarts and lost work included."""


def spot_run(
    *,
    gpu_hours: float,
    gpus: float,
    gpus_per_node: float,
    lost_work_hours: float,
    interruptions_per_node_month: float,
    restart_minutes: float,
) -> SpotRun:
    """Expected cost of running a phase of ``gpu_hours`` (on-demand, uninterrupted) on spot nodes.

    Each of the run's nodes is interrupted at a constant rate, and every interruption stops the
    whole run for the restart plus ``lost_work_hours`` (the work done since the last checkpoint).
    The run so takes ``T = T0 + rate * T * lost``, i.e. ``T0 / (1 - rate * lost)``, every GPU held
    all along; raises ValueError where it would never finish (a node lost faster than it recovers)."""
    nodes = math.ceil(gpus / gpus_per_node)
    rate = nodes * interruptions_per_node_month / HOURS_PER_MONTH  # preemptions per hour of the run
    lost = restart_minutes / 60 + lost_work_hours
    if rate * lost >= 1:
        raise ValueError(
            f"on spot, {nodes} node(s) interrupted {interruptions_per_node_month:g} times a month each lose "
            f"{lost:.2f} h per interruption: the run would not finish; checkpoint more often or use on-demand"
        )
    hours = gpu_hours / gpus / (1 - rate * lost)
    return SpotRun(preemptions=rate * hours, lost_hours_per_preemption=lost, gpu_hours=hours * gpus)
