"""A user's mistakes on ``pipelines/full.py``'s command line stop it before any work, with one line
that says what to change (the demo's whole run is in test_full.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import full

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "filter.min_sid=3"], "unknown config key 'filter.min_sid'"),
        (["--set", "filter.min_side=big"], "filter.min_side: 'big' is not an integer"),
        (["--phases", "train_stage_c"], "phase 'pre_encode' has no finished output"),
        (["--set", "train_c.global_batch_size=33"], "global_batch_size (33) must be a multiple of workers (2)"),
        (["--phases", "everything"], "unknown phase 'everything'"),
        (["--set", "data.shards_url="], "data.shards_url is empty"),
        (["--set", "data.shards_url=/no/such/folder"], "data.shards_url '/no/such/folder' does not exist"),
    ],
)
def test_user_errors_stop_before_work_with_a_message(args, message, tmp_path, local_ray):
    with pytest.raises(SystemExit, match=re.escape(message)):
        full.main([*args, "--set", f"work_dir={tmp_path}/work"])
    assert not (tmp_path / "work" / "metadata_filter").exists()


def test_a_user_error_reaches_the_console_as_one_line_without_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    result = subprocess.run(
        [sys.executable, "pipelines/full.py", "--set", "filter.min_sid=3", "--set", f"work_dir={tmp_path}/work"],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown config key 'filter.min_sid'")
    assert "Traceback" not in result.stderr
