"""The skip rule (``pipelines/fingerprints.py``), the same for every phase: the same input and settings
skip, a changed setting that decides the output or a changed input reruns, a changed resource or
budget does not; and the fingerprint reads back equal from every place an output stores it."""

from __future__ import annotations

import shutil
import time

import pyarrow as pa
import pytest
import torch
from safetensors.torch import save_file

from pipelines import (
    decode,
    demo_data,
    embed,
    fingerprints,
    generate_phase,
    metadata_filter,
    pre_encode,
    shard_phase,
    trained_weights,
)
from pipelines.config import load_config
from pipelines.ledger import Manifest, ShardCounts, read_manifest, write_manifest
from pipelines.phases import PHASES
from pipelines.storage import StorageConfig, filesystem
from pipelines.train_phase import training_fingerprint

STORAGE = StorageConfig()
# Tuples (the config's lists), nested settings and floats: what JSON gives back differently if at all.
FINGERPRINT = fingerprints.of(
    input={"input": {"url": "demo", "files": "ab12"}, "crops": ((64, 64),)},
    settings={"resolution": 64, "bucket_aspect_ratios": (1.0, 1.5), "lr": 3e-3},
)


# Each phase's fingerprint as the phase forms it, from the run's config and its input's fingerprint;
# then a setting that decides its output and one that does not.
PHASE_FINGERPRINTS = {
    metadata_filter.PHASE: (
        lambda config, input: metadata_filter.fingerprint(input, config.filter),
        "filter.min_side=32",
        "filter.resources.max_actors=4",
    ),
    decode.PHASE: (
        lambda config, input: (
            decode.phase(
                shards_url="in",
                filtered_url="filtered",
                output_url="out",
                filtered_fingerprint=input,
                config=config.decode,
                storage=STORAGE,
            ).fingerprint
        ),
        "decode.resolution=32",
        "decode.resources.max_actors=4",
    ),
    embed.PHASE: (
        lambda config, input: (
            embed.phase(
                decoded_url="decoded", output_url="out", decoded_fingerprint=input, config=config.embed, storage=STORAGE
            ).fingerprint
        ),
        "embed.min_clip_similarity=0.2",
        "embed.budget_gpu_hours=2",
    ),
    pre_encode.PHASE: (
        lambda config, input: (
            pre_encode.phase(
                decoded_url="decoded",
                embedded_url="embedded",
                output_url="out",
                embedded_fingerprint=input,
                crops=config.decode.crop_sizes(),
                resolution=config.decode.resolution,
                config=config.pre_encode,
                validation_threshold=0,
                storage=STORAGE,
            ).fingerprint
        ),
        "pre_encode.validation_fraction=0.1",
        "pre_encode.budget_gpu_hours=2",
    ),
    **{
        f"train_{name}": (
            lambda config, input, section=section: training_fingerprint(config, section, input),
            f"{section}.lr=0.01",
            f"{section}.workers=1",
        )
        for name, section in (
            ("stage_a", "train_a"),
            ("semantic", "train_semantic"),
            ("stage_b", "train_b"),
            ("stage_c", "train_c"),
        )
    },
    generate_phase.PHASE: (
        lambda config, input: generate_phase.fingerprint(config.generate, config.pre_encode.models, input),
        "generate.seed=1",
        "generate.num_gpus=1",
    ),
}


def test_every_phase_is_under_the_rule():
    assert set(PHASE_FINGERPRINTS) == set(PHASES)


@pytest.mark.parametrize("phase", list(PHASE_FINGERPRINTS))
def test_each_phase_skips_and_reruns_by_the_same_rule(phase):
    form, deciding, not_deciding = PHASE_FINGERPRINTS[phase]
    tiny, upstream = load_config("tiny"), {"input": "the earlier phase's fingerprint", "crops": ((64, 64),)}
    stored = form(tiny, upstream)
    assert stored["input"] == fingerprints.of(input=upstream, settings={})["input"]
    assert fingerprints.is_complete(stored, form(load_config("tiny"), upstream))
    assert fingerprints.is_complete(stored, form(load_config("tiny", [not_deciding]), upstream))
    assert not fingerprints.is_complete(stored, form(load_config("tiny", [deciding]), upstream))
    assert not fingerprints.is_complete(stored, form(tiny, {**upstream, "crops": ((32, 32),)}))
    assert not fingerprints.is_complete(None, form(tiny, upstream))


def _parquet_footer(url: str, fingerprint):
    fs, path = filesystem(url, STORAGE)
    if fingerprint is not None:
        with shard_phase.ShardOutput(fs, path, pa.schema([("x", pa.int64())])) as output:
            output.write([{"x": 1}])
            output.commit(ShardCounts(samples_in=1, kept=1, dropped={}), fingerprint)
    ledger = shard_phase.read_shard_ledger(fs, path)
    return ledger and ledger[1]


def _safetensors_header(url: str, fingerprint):
    if fingerprint is not None:
        trained_weights.write(url, {"w": torch.zeros(2)}, fingerprint, STORAGE)
    return trained_weights.fingerprint_of(url, STORAGE)


def _manifest(url: str, fingerprint):
    if fingerprint is not None:
        fs, folder = filesystem(url, STORAGE)
        fs.makedirs(folder, exist_ok=True)  # as the phase makes it for its shards
        write_manifest(url, Manifest(phase="p", config=fingerprint, shards={}), STORAGE)
    manifest = read_manifest(url, STORAGE)
    return manifest and manifest.config


def _generate_summary(url: str, fingerprint):
    if fingerprint is not None:
        generate_phase.write_summary(url, fingerprint, {"colour_accuracy": 0.5}, STORAGE)
    summary = generate_phase.read_summary(url, STORAGE)
    return summary and summary["fingerprint"]


@pytest.mark.parametrize(
    "store, name",
    [
        (_parquet_footer, "00000.parquet"),
        (_safetensors_header, "final.safetensors"),
        (_manifest, "phase"),
        (_generate_summary, "generate"),
    ],
)
def test_a_stored_fingerprint_reads_back_as_complete_and_only_for_itself(store, name, tmp_path):
    url = str(tmp_path / name)
    assert not fingerprints.is_complete(store(url, None), FINGERPRINT)  # nothing there yet
    stored = store(url, FINGERPRINT)
    assert fingerprints.is_complete(stored, FINGERPRINT)
    settings = {name: value for name, value in FINGERPRINT.items() if name != "input"}
    other = fingerprints.of(input=FINGERPRINT["input"], settings={**settings, "lr": 1e-3})
    assert not fingerprints.is_complete(stored, other)


def test_a_fingerprint_not_formed_by_the_rule_is_refused():
    with pytest.raises(AssertionError, match="fingerprints.of"):
        fingerprints.is_complete(FINGERPRINT, {"input": None, "crops": ((64, 64),)})
    with pytest.raises(AssertionError, match="hide the input"):
        fingerprints.of(input=None, settings={"input": 1})


def test_an_input_folder_rewritten_in_place_gets_another_fingerprint(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "00000.parquet").write_bytes(b"one")
    first = fingerprints.folder_fingerprint(str(folder), STORAGE)
    assert fingerprints.folder_fingerprint(str(folder), STORAGE) == first
    (folder / "00000.parquet").write_bytes(b"other")
    rewritten = fingerprints.folder_fingerprint(str(folder), STORAGE)
    (folder / "00001.parquet").write_bytes(b"two")
    assert len({str(first), str(rewritten), str(fingerprints.folder_fingerprint(str(folder), STORAGE))}) == 3


@pytest.mark.slow
def test_the_metadata_filter_reruns_for_new_shards_at_the_same_url(tmp_path, local_ray):
    """A phase run end to end by the rule: skipped with the same input and settings (whatever its
    resources), rerun for another threshold or for demo data regenerated in place."""
    root = str(tmp_path / "demo")
    demo = demo_data.DemoDataConfig(num_shards=2, samples_per_shard=20)
    demo_data.generate(root, demo)
    shards, output = demo_data.shards_url(root), str(tmp_path / "filtered")
    config = load_config("tiny").filter

    def run(config=config):
        return metadata_filter.run(shards, output, config, STORAGE)

    first, metrics = run()
    assert metrics
    assert run(load_config("tiny", ["filter.resources.max_actors=3"]).filter) == (first, {})
    changed, metrics = run(load_config("tiny", ["filter.min_side=100"]).filter)
    assert metrics and changed.config != first.config
    shutil.rmtree(root)
    demo_data.generate(root, demo_data.DemoDataConfig(num_shards=2, samples_per_shard=20, seed=1))
    regenerated, metrics = run()
    assert metrics and regenerated.config["input"] != first.config["input"]
    assert run() == (regenerated, {})


def test_weights_are_known_by_their_phases_fingerprint_or_by_their_files_size_and_mark(tmp_path, s3_server):
    written = str(tmp_path / "final.safetensors")
    trained_weights.write(written, {"w": torch.zeros(2)}, FINGERPRINT, STORAGE)
    assert trained_weights.weights_fingerprint(written, STORAGE) == FINGERPRINT
    hub = "https://huggingface.co/warp-ai/wuerstchen/resolve/main/vqgan/diffusion_pytorch_model.safetensors"
    assert trained_weights.weights_fingerprint(hub, STORAGE) == hub  # no request: a hub URL names a revision
    assert trained_weights.weights_fingerprint("", STORAGE) == ""
    missing = str(tmp_path / "missing.pt#effnet_state_dict")
    assert trained_weights.weights_fingerprint(missing, STORAGE) == missing

    local = tmp_path / "aesthetic.pt"
    local.write_bytes(b"one")
    first = trained_weights.weights_fingerprint(str(local), STORAGE)
    assert trained_weights.weights_fingerprint(str(local), STORAGE) == first
    time.sleep(0.05)  # past the file system's timestamp granularity
    local.write_bytes(b"two")  # the same size
    assert trained_weights.weights_fingerprint(str(local), STORAGE) != first

    storage = StorageConfig(endpoint_url=s3_server, key="test-key", secret="test-secret")
    fs, _ = filesystem("s3://weights", storage)
    fs.mkdir("weights")
    fs.pipe("weights/effnet.pt", b"one")
    on_s3 = trained_weights.weights_fingerprint("s3://weights/effnet.pt#effnet_state_dict", storage)
    fs.pipe("weights/effnet.pt", b"two")
    replaced = trained_weights.weights_fingerprint("s3://weights/effnet.pt#effnet_state_dict", storage)
    fs.pipe("weights/effnet.pt", b"one")
    # The ETag is a digest of the content: the same bytes again are the same weights.
    assert replaced != on_s3 == trained_weights.weights_fingerprint("s3://weights/effnet.pt#effnet_state_dict", storage)


@pytest.mark.parametrize(
    "phase, setting",
    [
        (embed.PHASE, "embed.aesthetic_weights"),
        (pre_encode.PHASE, "pre_encode.stage_a_weights"),
        (pre_encode.PHASE, "pre_encode.semantic_weights"),
        ("train_stage_c", "train_c.init_weights"),
        ("train_stage_a", "train_a.stage_a_losses.perceptual_weights"),
    ],
)
def test_a_phase_reruns_when_weights_it_reads_are_replaced_at_the_same_path(phase, setting, tmp_path):
    form = PHASE_FINGERPRINTS[phase][0]
    weights = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, weights)
    config, upstream = load_config("tiny", [f"{setting}={weights}"]), {"input": "earlier", "crops": ((64, 64),)}
    stored = form(config, upstream)
    assert fingerprints.is_complete(stored, form(config, upstream))
    time.sleep(0.05)
    save_file({"w": torch.ones(2)}, weights)
    assert not fingerprints.is_complete(stored, form(config, upstream))
