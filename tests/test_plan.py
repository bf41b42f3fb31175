"""The cost planner (``python -m pipelines.plan``) and ``full.py --dry-run``: arithmetic, budgets, errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
import yaml

from cluster import costs, nodes
from cluster.local_cluster import free_port
from pipelines import demo_data, full, plan
from pipelines.chain_evaluation import RENDER_CHUNK
from pipelines.config import load_config
from pipelines.demo_data import DemoDataConfig
from pipelines.phases import PHASES
from pipelines.trainable import training_phases
from pipelines.trainable.text_conditioned import VALIDATION_TIMES
from stages.generate import GENERATE_CONFIGS


def _rows(overrides=(), **assumed) -> dict[str, costs.PhasePlan]:
    config = load_config("v2", list(overrides))
    assumptions = plan.Assumptions(
        samples=10**6, keep={"metadata_filter": 0.5}, **{"gpus": 8, "gpu": "a100", **assumed}
    )
    return {row.phase: row for row in plan.plan(config, list(PHASES), assumptions, costs.load_measured("v2_h200"))}


def test_hours_follow_the_work_the_gpu_count_and_the_gpu_kind():
    base = _rows()
    stage_c = base["train_stage_c"]
    assert stage_c.unit == "gpu" and stage_c.units == 8
    assert _rows(["train_c.steps=1836000"])["train_stage_c"].unit_hours == pytest.approx(2 * stage_c.unit_hours)
    wider = _rows(gpus=16)["train_stage_c"]  # same efficiency above one GPU: same GPU-hours, half the wall time
    assert wider.unit_hours == pytest.approx(stage_c.unit_hours) and wider.seconds == pytest.approx(stage_c.seconds / 2)
    assert _rows(gpu="h200")["train_stage_c"].unit_hours == pytest.approx(
        stage_c.unit_hours * costs.GPU_SPEED_VS_H200["a100"]
    )
    # The data volumes chain through the keep fractions; v2 loads its encoders, so it trains neither.
    assert base["decode"].samples == 500_000 and base["pre_encode"].samples == 500_000
    assert "train_stage_a" not in base and "train_semantic" not in base
    # Stage B's figure was measured at 512 px; at 1024 px it does four times the work per sample.
    at_512 = _rows(["decode.resolution=512"])["train_stage_b"]
    assert at_512.samples_per_second_per_unit > base["train_stage_b"].samples_per_second_per_unit * 3.5
    assert base["metadata_filter"].samples_per_second_per_unit is None, "no figure is invented"


def test_evaluation_hours_follow_the_evaluations_their_rows_and_the_gpus_held():
    config = load_config("v2", [])
    train = config.train_c
    stage_c = _rows()["train_stage_c"]
    hours = plan.evaluation_unit_hours(stage_c, train, VALIDATION_TIMES)
    # The 8 ranks share the rows batch by batch (a worker's batch each); the rank with the most
    # batches holds every GPU; each row runs forward once per fixed time, a third of a training sample.
    per_worker = train.global_batch_size // train.workers
    evaluations = train.steps // train.eval_every + 1
    batches_per_rank = math.ceil(math.ceil(train.eval_samples / per_worker) / 8)
    seconds = evaluations * batches_per_rank * per_worker * VALIDATION_TIMES / (3 * stage_c.samples_per_second_per_unit)
    assert batches_per_rank > 1 and hours == pytest.approx(seconds * 8 / 3600)
    # An image stage's row is one forward pass.
    assert plan.evaluation_unit_hours(stage_c, train, 1) == pytest.approx(hours / VALIDATION_TIMES)
    # One evaluation every eval_every steps and one at the end.
    only_at_the_end = load_config("v2", ["train_c.eval_every=0"]).train_c
    assert plan.evaluation_unit_hours(stage_c, only_at_the_end, VALIDATION_TIMES) == pytest.approx(hours / evaluations)
    # Twice the GPUs share the same batches: half the wall time, the same GPU-hours (a rank with no
    # batch still waits for the others).
    sixteen = _rows(gpus=16)["train_stage_c"]
    assert math.ceil(math.ceil(train.eval_samples / per_worker) / 16) * 2 == batches_per_rank
    assert plan.evaluation_unit_hours(sixteen, train, VALIDATION_TIMES) == pytest.approx(hours)
    no_rows = load_config("v2", ["train_c.eval_samples=0"]).train_c
    assert plan.evaluation_unit_hours(stage_c, no_rows, VALIDATION_TIMES) is None


def test_chain_scoring_hours_follow_the_captions_the_sampling_steps_and_the_image_size():
    config = load_config("v2", [])
    rows = _rows()
    stage_c, stage_b = rows["train_stage_c"], rows["train_stage_b"]
    hours = plan.chain_scoring_unit_hours(stage_c, stage_b, config)
    # 256 captions in chunks of 4 over 8 ranks: 32 images on each. An image is 60 Stage C steps with
    # guidance (two forwards each) and 12 Stage B steps without, at 1024 px, the training resolution.
    sampling = GENERATE_CONFIGS["v2"]()
    assert (sampling.prior_steps, sampling.decoder_steps, sampling.decoder_guidance) == (60, 12, 0.0)
    assert config.generate.size == config.decode.resolution and RENDER_CHUNK == 4
    image = 120 / (3 * stage_c.samples_per_second_per_unit) + 12 / (3 * stage_b.samples_per_second_per_unit)
    evaluations = config.train_c.steps // config.train_c.eval_every + 1
    assert hours == pytest.approx(evaluations * 32 * image * 8 / 3600)
    unguided = load_config("v2", ["generate.prior_guidance=1"])
    stage_c_image = 120 / (3 * stage_c.samples_per_second_per_unit)
    assert plan.chain_scoring_unit_hours(stage_c, stage_b, unguided) == pytest.approx(
        hours * (image - stage_c_image / 2) / image
    )
    smaller = load_config("v2", ["generate.size=512"])
    assert plan.chain_scoring_unit_hours(stage_c, stage_b, smaller) == pytest.approx(hours / 4)
    assert plan.chain_scoring_unit_hours(stage_c, stage_b, load_config("v2", ["generate.eval_captions=0"])) is None


def test_the_text_setting_moves_the_towers_time_between_pre_encode_and_training():
    towers = costs.load_measured("v2_h200")["text_towers"]
    hidden, tokens = _rows(["pre_encode.text=hidden_states"]), _rows(["pre_encode.text=tokens"])
    a100 = costs.GPU_SPEED_VS_H200["a100"] * 0.9  # slower GPUs, 90% efficiency over several

    def extra_seconds(phase: str) -> float:
        return (1 / tokens[phase].samples_per_second_per_unit - 1 / hidden[phase].samples_per_second_per_unit) * a100

    assert extra_seconds("train_stage_c") == pytest.approx(1 / towers["stage_c"])
    assert extra_seconds("train_stage_b") == pytest.approx(1 / towers["stage_b"])
    assert extra_seconds("pre_encode") == pytest.approx(-1 / towers["stage_c"] - 1 / towers["stage_b"])
    # The two towers' hidden states, 77 x (1280 + 1024) float16 values, leave the latent shards.
    assert hidden["pre_encode"].stored_bytes - tokens["pre_encode"].stored_bytes == 500_000 * 354_816
    # Stage C then reads its latent and 77 tokens instead of bigG's hidden states.
    assert tokens["train_stage_c"].read_bytes < hidden["train_stage_c"].read_bytes / 10


def test_storage_is_priced_by_the_month_and_reads_by_the_gigabyte():
    rows = list(_rows().values())
    month = costs.total_costs(rows, plan.Assumptions(samples=1, keep={}, storage_months=1))
    year = costs.total_costs(rows, plan.Assumptions(samples=1, keep={}, storage_months=12, usd_per_gb_read=0.02))
    stored = sum(row.stored_bytes for row in rows)
    assert month.storage == pytest.approx(stored / 1e9 * costs.USD_PER_GB_MONTH) and month.transfer == 0
    assert year.storage == pytest.approx(12 * month.storage) and year.compute == month.compute
    assert year.transfer == pytest.approx(sum(row.read_bytes for row in rows) / 1e9 * 0.02)
    # A training run keeps its checkpoints: weights, EMA and AdamW's two moments, 16 bytes a parameter.
    stage_c = _rows()["train_stage_c"]
    assert stage_c.stored_bytes == 3 * 16 * plan.parameter_count("stage_c", "v2")


def test_spot_adds_each_expected_preemptions_restart_and_lost_work_to_the_gpu_hours():
    # 16 GPUs on 2 nodes, 100 hours of wall time on demand; each node interrupted 3.65 times a month
    # (0.01 per hour of the run for the two), each interruption 20 minutes of restart and 40 of lost
    # work: T = 100 / (1 - 0.01 * 1) hours.
    run = costs.spot_run(
        gpu_hours=1600,
        gpus=16,
        gpus_per_node=8,
        lost_work_hours=40 / 60,
        interruptions_per_node_month=costs.HOURS_PER_MONTH * 0.005,
        restart_minutes=20,
    )
    assert run.lost_hours_per_preemption == pytest.approx(1.0)
    assert run.gpu_hours == pytest.approx(1600 / 0.99)
    assert run.preemptions == pytest.approx(0.01 * 100 / 0.99)

    # A partly filled node is a node to lose: 9 GPUs on 2 nodes are preempted twice as often as 8 on one.
    def per_hour(gpus: int) -> float:
        run = costs.spot_run(**{**_SPOT, "gpus": gpus})
        return run.preemptions / (run.gpu_hours / gpus)

    assert per_hour(9) == pytest.approx(2 * per_hour(8))
    assert costs.spot_run(**{**_SPOT, "interruptions_per_node_month": 0}).gpu_hours == _SPOT["gpu_hours"]
    with pytest.raises(ValueError, match="would not finish; checkpoint more often or use on-demand"):
        costs.spot_run(**{**_SPOT, "interruptions_per_node_month": costs.HOURS_PER_MONTH, "restart_minutes": 60})


_SPOT = dict(
    gpu_hours=800.0,
    gpus=8,
    gpus_per_node=8,
    lost_work_hours=0.5,
    interruptions_per_node_month=1.0,
    restart_minutes=15.0,
)


def _spot_rows(out: str) -> dict[str, list[float]]:
    """The planner's spot table: phase -> on-demand GPU-hours, USD, preemptions, spot GPU-hours, USD."""
    row = r"\| (train_stage_[bc]) \| ([\d,.]+) \| ([\d,]+) \| ([\d,.]+) \| [\d,]+ min \| ([\d,.]+) \| ([\d,]+) \|"
    return {match[0]: [float(value.replace(",", "")) for value in match[1:]] for match in re.findall(row, out)}


def test_the_planner_prices_training_on_spot_against_on_demand(capsys):
    plan.main(["--samples", "2e6", "--spot-usd-per-gpu-hour", "2", "--spot-interruptions-per-node-month", "30"])
    out = capsys.readouterr().out
    assert "Training on spot nodes ($2.00 per GPU-hour against $5.12 on demand; 30 interruptions" in out
    rows = _spot_rows(out)
    assert set(rows) == {"train_stage_b", "train_stage_c"}, out
    for on_demand_hours, on_demand_usd, preemptions, spot_hours, spot_usd in rows.values():
        assert preemptions > 1 and spot_hours > on_demand_hours
        assert spot_usd == pytest.approx(2 * spot_hours, abs=1) and on_demand_usd > spot_usd
    # Fewer checkpoints, more work lost to each preemption.
    plan.main(
        ["--samples", "2e6", "--spot-interruptions-per-node-month", "30", "--set", "train_c.checkpoint_every=20000"]
    )
    assert _spot_rows(capsys.readouterr().out)["train_stage_c"][3] > rows["train_stage_c"][3]


def test_the_planner_names_the_cheaper_text_setting(capsys):
    plan.main(["--storage-months", "0"])
    out = capsys.readouterr().out
    # With nothing stored, only compute counts: the towers run once per sample at pre-encode, but
    # once per sample seen in training (several epochs), so hidden states are cheaper.
    assert "cheaper: text=hidden_states" in out and "set pre_encode.text=hidden_states" in out
    plan.main(["--storage-months", "24"])
    assert re.search(r"cheaper: text=tokens, by \$[\d,]+\n", capsys.readouterr().out)


def test_planner_prints_the_table_the_paper_comparison_and_budgets(capsys):
    plan.main(
        [
            "--samples",
            "2e6",
            "--gpus",
            "16",
            "--set",
            "train_c.budget_gpu_hours=10",
            "--set",
            "train_b.budget_gpu_hours=1e9",
        ]
    )
    out = capsys.readouterr().out
    for phase in ("metadata_filter", "decode", "embed", "pre_encode", "train_stage_b", "train_stage_c"):
        assert f"| {phase} |" in out
    assert re.search(r"\| train_stage_c \|.*\| 10\.0: OVER \|", out)
    assert re.search(r"\| train_stage_b \|.*: fits \|", out)
    assert re.search(
        r"Training \(train_stage_b, train_stage_c\): [\d,]+ A100-hours predicted; the paper gives 24,602 "
        r"A100-hours for its whole training",
        out,
    )
    assert "cluster/measured.toml [v2_h200]" in out
    assert re.search(
        r"Held-out loss \(A100-hours, predicted: .*\): train_stage_b [\d.,]+ \([\d.]+% of its training\)", out
    )
    assert re.search(
        r"Chain scoring in train_stage_c \(A100-hours, predicted: .*\): [\d.,]+ \([\d.]+% of its training\)", out
    )


def test_latent_bytes_per_sample_are_the_v2_shard_payload_and_the_largest_bucket():
    text_states = 77 * (1280 + 1024) * 2  # bigG and H last hidden states, float16
    tokens = 77 * 4
    centre = load_config("v2", ["pre_encode.text=hidden_states"])
    assert plan.latent_bytes_per_sample(centre) == 16 * 24 * 24 * 2 + 4 * 256 * 256 * 2 + tokens + text_states
    # 1280x896 is the largest v2 bucket: Stage B at f4, Stage C from the semantic input scaled to 960x672 at f32
    buckets = load_config("v2", ["decode.crop=buckets"])  # v2 stores tokens alone
    assert plan.latent_bytes_per_sample(buckets) == 16 * 30 * 21 * 2 + 4 * 320 * 224 * 2 + tokens


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--keep", "decode=2"], "keep fraction for decode must be in [0, 1]"),
        (["--keep", "pre_encode=0.5"], "only metadata_filter, decode, embed drop samples"),
        (["--keep", "decode"], "--keep takes phase=fraction pairs"),
        (["--phases", "train_stage_d"], "unknown phase(s) train_stage_d"),
        (["--set", "train_c.steps=many"], "train_c.steps"),
    ],
)
def test_planner_errors_name_the_setting(argv, message, capsys):
    with pytest.raises(SystemExit):
        plan.main(argv)
    assert message in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    work = tmp_path / "work"
    full.main(["--dry-run", "--set", f"work_dir={work}", "--set", "train_c.budget_gpu_hours=0.001"])
    out = capsys.readouterr().out
    assert "nothing is started or written" in out
    assert "train_stage_c: 2 Ray Train workers x (0.5 CPU, 0 GPU), 700 steps at global batch 32" in out
    assert "320 input rows" in out  # the demo's 4 shards x 80
    assert re.search(r"\| train_stage_c \|.*\| 0\.0: (OVER|fits) \|", out)
    assert not work.exists(), "a dry run must not create the work dir, the demo data or an MLflow store"


def test_dry_run_says_what_this_machine_has_and_names_a_gpu_stand_in(tmp_path, capsys, monkeypatch):
    stand_in = [
        "--dry-run",
        "--phases",
        "embed",
        "--set",
        "embed.resources.num_gpus=1",
        "--set",
        "embed.resources.gpu_resource=fake_gpu",
        "--set",
        f"work_dir={tmp_path}/work",
    ]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    full.main(stand_in)
    out = capsys.readouterr().out
    assert f"Ray would start on this machine (no ray.address or RAY_ADDRESS): {torch.cuda.device_count()} GPU(s)" in out
    assert "embed: 1-1 actors x (1 CPU, 1 fake_gpu: a GPU stand-in, runs on CPU)" in out
    # A local Ray offers no stand-in, whatever GPUs the machine has.
    assert "REFUSED HERE: embed asks for 1 fake_gpu per actor (embed.resources.num_gpus) but this machine has 0" in out
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster: this machine's GPUs are not the run's
    full.main(stand_in)
    out = capsys.readouterr().out
    assert "this machine" not in out and "REFUSED HERE" not in out


def test_dry_run_counts_rows_from_the_shard_footers(tmp_path, capsys):
    demo = DemoDataConfig(num_shards=2, samples_per_shard=20)
    demo_data.generate(str(tmp_path / "demo"), demo)
    shards = demo_data.shards_url(str(tmp_path / "demo"))
    full.main(
        [
            "--dry-run",
            "--phases",
            "metadata_filter,decode",
            "--set",
            f"data.shards_url={shards}",
            "--set",
            f"work_dir={tmp_path}/work",
        ]
    )
    assert "40 input rows" in capsys.readouterr().out


def test_dry_run_of_a_missing_input_names_the_setting(tmp_path):
    with pytest.raises(SystemExit, match=re.escape("data.shards_url")):
        full.main(["--dry-run", "--set", f"data.shards_url={tmp_path}/absent", "--set", f"work_dir={tmp_path}/w"])


def test_every_v2_phase_fits_the_node_type_meant_for_it():
    types = nodes.worker_node_types()
    config = load_config("v2")
    assert nodes.node_type_for(config.decode.resources.num_cpus, 0, types) == "cpu_worker"
    assert nodes.node_type_for(config.pre_encode.resources.num_cpus, 1, types) == "gpu_worker"
    assert nodes.node_type_for(config.train_c.cpus_per_worker, config.train_c.gpus_per_worker, types) == "gpu_worker"
    # The planner's default scale is the GPU pool's: 8 nodes of 8 GPUs.
    gpu_pool = yaml.safe_load(nodes.CLUSTER_FILE.read_text())["available_node_types"]["gpu_worker"]
    assert gpu_pool["max_workers"] * types["gpu_worker"]["GPU"] == config.train_c.workers == 64


def test_dry_run_flags_a_request_no_node_can_hold(tmp_path, capsys):
    full.main(
        [
            "--dry-run",
            "--config",
            "v2",
            "--phases",
            "train_stage_c",
            "--set",
            "data.shards_url=demo",
            "--set",
            "train_c.gpus_per_worker=9",
            "--set",
            f"work_dir={tmp_path}/work",
        ]
    )
    assert "train_stage_c: 64 Ray Train workers x (10 CPU, 9 GPU)" in (out := capsys.readouterr().out)
    assert "FITS NO NODE TYPE" in out


def test_a_gpu_config_on_a_local_ray_without_gpus_stops_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    work = tmp_path / "work"
    with pytest.raises(SystemExit, match=re.escape("embed asks for 1 GPU(s) per actor (embed.resources.num_gpus)")):
        full.main(["--config", "v2", "--set", "data.shards_url=demo", "--set", f"work_dir={work}"])
    assert not work.exists()
    # One GPU holds every v2 actor and worker; a cluster (ray.address) is never checked here.
    plan.check_local_gpus(load_config("v2"), list(PHASES), gpus_here=1)
    with pytest.raises(ValueError, match=re.escape("train_c.gpus_per_worker=0")):
        plan.check_local_gpus(load_config("v2", ["train_c.gpus_per_worker=2"]), ["train_stage_c"], gpus_here=1)


def test_unreachable_object_storage_names_the_settings(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(
        SystemExit,
        match=re.escape(f"cannot reach data.shards_url 's3://corpus/shards' (storage.endpoint_url='{closed}'"),
    ):
        full.main(
            [
                "--dry-run",
                "--set",
                "data.shards_url=s3://corpus/shards",
                "--set",
                f"storage.endpoint_url={closed}",
                "--set",
                "storage.key=k",
                "--set",
                "storage.secret=s",
                "--set",
                f"work_dir={tmp_path}/w",
            ]
        )


def test_v2_training_steps_fit_the_gpus_of_ray_cluster_yaml():
    config = load_config("v2")
    assert plan.training_gpu_memory(config, list(PHASES)) == 80
    for phase in ("train_stage_b", "train_stage_c"):
        step = plan.phase_memory(config, training_phases()[phase].name)
        assert step is not None and step.fits(80), phase
    plan.check_training_memory(config, list(PHASES))  # the dry run's check passes


def test_v2_on_40_gb_gpus_is_flagged_with_what_would_fit(capsys):
    plan.main(["--samples", "2e6", "--gpu-memory-gib", "40"])
    out = capsys.readouterr().out
    assert re.search(r"\| train_stage_c \|.*\| 4\d\.\d GiB: OVER \|", out)
    problem = next(line for line in out.splitlines() if line.startswith("DOES NOT FIT: train_stage_b"))
    # Every remedy names the setting to change and its predicted peak.
    assert "train_b.activation_checkpointing=true (" in problem
    assert re.search(r"train_b\.workers=\d+ \(\d+ samples per GPU, \d+\.\d GiB\)", problem)
    assert "A100 80 GB: p4de.24xlarge" in problem


def test_dry_run_refuses_a_step_that_does_not_fit_and_says_what_would(tmp_path, capsys):
    with pytest.raises(
        SystemExit,
        match=r"train_stage_c: \d+\.\d GiB per GPU predicted \(80 samples of 24x24 latents, "
        r"eager\) does not fit 90% of 80 GiB GPUs; would fit: train_c\.workers=",
    ):
        full.main(
            [
                "--dry-run",
                "--config",
                "v2",
                "--phases",
                "train_stage_c",
                "--set",
                "data.shards_url=demo",
                "--set",
                "train_c.workers=16",
                "--set",
                f"work_dir={tmp_path}/work",
            ]
        )
    assert "OVER |" in capsys.readouterr().out, "the plan is printed before the refusal"


def test_a_throughput_measured_at_another_setting_is_flagged():
    config = load_config("v2", ["train_b.activation_checkpointing=true"])
    assumptions = plan.Assumptions(samples=10**6, keep={}, gpus=8, gpu="a100")
    rows = {row.phase: row for row in plan.plan(config, list(PHASES), assumptions, costs.load_measured("v2_h200"))}
    assert "MEASURED eager, BUT train_b RUNS checkpointing" in rows["train_stage_b"].source
    assert "MEASURED" not in rows["train_stage_c"].source
