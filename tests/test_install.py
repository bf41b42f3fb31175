"""The project as a user installs it: a wheel (not editable), run from a folder that is not the
checkout. What the package reads at run time must ship in it as package data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "pipelines", "stages")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The folder the wheel is installed into (``pip install --target``, no dependencies: they are
    this interpreter's). Built from a copy of the sources, so nothing is written into the checkout."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "ray_cluster.yaml"):
        shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", source], check=True)
    [wheel] = (tmp / "dist").glob("*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", tmp / "site", wheel], check=True)
    return tmp / "site"


def run_installed(site: Path, cwd: Path, *argv: str) -> str:
    """A command of the installed package, with the checkout off the path: PYTHONPATH names the
    install only (the editable install of a development venv looks last, after it)."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_installed_planner_and_dry_run_read_their_data_from_the_package(installed, tmp_path):
    where = run_installed(
        installed,
        tmp_path,
        "-c",
        "import importlib.util, cluster.costs, cluster.nodes; "
        f"print(*(importlib.util.find_spec(name).origin for name in {PACKAGES})); "
        "print(cluster.costs.MEASURED_FILE, cluster.nodes.CLUSTER_FILE)",
    )
    assert all(Path(line).is_relative_to(installed) for line in where.split()), where
    assert (installed / "pipelines" / "model_configs" / "tiny-clip.json").is_file()  # pipelines/embed.py's

    plan = run_installed(installed, tmp_path, "-m", "pipelines.plan", "--samples", "1e6")
    assert "| train_stage_c | 64 GPU |" in plan and "cluster/measured.toml [v2_h200]" in plan
    assert "A100 GPUs of 80 GiB" in plan  # the GPU memory of ray_cluster.yaml's training nodes

    dry_run = run_installed(installed, tmp_path, "-m", "pipelines.full", "--dry-run")
    assert "Dry run of the 'tiny' config" in dry_run and "ray_cluster.yaml node type" in dry_run
    assert "cluster/measured.toml [tiny_cpu]" in dry_run
    assert not list(tmp_path.iterdir()), "the dry run writes nothing"


def test_the_shipped_cluster_file_is_the_one_ray_up_takes():
    # A link, so the two cannot differ; a copy in its place would need this test to compare them.
    assert (ROOT / "cluster" / "ray_cluster.yaml").resolve() == (ROOT / "ray_cluster.yaml").resolve()
