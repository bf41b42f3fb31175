"""The demo data set: img2dataset's layout, readable by webdataset and pyarrow, defects as recorded."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image, ImageOps

from pipelines import demo_data, schema
from pipelines.demo_data import BACKGROUNDS, COLOURS, DEFECTS, DemoDataConfig


def _tar_samples(root: str) -> dict[str, dict]:
    urls = sorted(f"{root}/shards/{name}" for name in os.listdir(f"{root}/shards") if name.endswith(".tar"))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def _parquet_rows(root: str) -> dict[str, dict]:
    return {
        row["key"]: row
        for index in range(DemoDataConfig().num_shards)
        for row in pq.read_table(f"{root}/shards/{schema.shard_name(index)}.parquet").to_pylist()
    }


def _truth_of(truth: dict, defect: str) -> tuple[str, dict]:
    (match,) = [(key, r) for key, r in truth["samples"].items() if r["defect"] == defect]
    return match


def test_layout_is_img2dataset_and_laion(demo_set):
    root, truth = demo_set
    config = DemoDataConfig()
    for index in range(config.num_shards):
        shard = schema.shard_name(index)
        for name in (schema.shard_tar(shard), schema.shard_parquet(shard), schema.shard_stats(shard)):
            assert os.path.isfile(f"{root}/shards/{name}"), name
    laion = pq.read_table(f"{root}/{demo_data.LAION_METADATA_FILE}")
    assert tuple(laion.column_names) == schema.LAION_METADATA_COLUMNS
    assert laion.num_rows == len(truth["samples"]) == config.num_shards * config.samples_per_shard


def test_shards_read_back_with_pyarrow_and_webdataset(demo_set):
    root, truth = demo_set
    rows = list(_parquet_rows(root).values())
    assert {row["key"] for row in rows} == set(truth["samples"])
    assert {
        "url",
        "caption",
        "key",
        "status",
        "error_message",
        "width",
        "height",
        "original_width",
        "original_height",
        "exif",
        "similarity",
        "punsafe",
        "pwatermark",
        "AESTHETIC_SCORE",
        "hash",
    } <= set(rows[0])
    samples = _tar_samples(root)
    successes = {row["key"] for row in rows if row["status"] == "success"}
    assert set(samples) == successes  # a failed download writes nothing to the tar
    for row in rows:
        if row["key"] in samples and truth["samples"][row["key"]]["defect"] == "none":
            sample = samples[row["key"]]
            assert sample["txt"].decode() == row["caption"]
            assert json.loads(sample["json"])["key"] == row["key"]
            assert hashlib.sha256(sample["jpg"]).hexdigest() == row["sha256"]
            assert Image.open(io.BytesIO(sample["jpg"])).size == (row["width"], row["height"])


def test_stats_match_the_parquet(demo_set):
    root, _ = demo_set
    for index in range(DemoDataConfig().num_shards):
        shard = schema.shard_name(index)
        rows = pq.read_table(f"{root}/shards/{shard}.parquet").to_pylist()
        with open(f"{root}/shards/{shard}_stats.json") as file:
            stats = json.load(file)
        assert stats["count"] == len(rows)
        assert stats["successes"] == sum(r["status"] == "success" for r in rows)
        assert stats["successes"] + stats["failed_to_download"] == stats["count"]
        assert sum(stats["status_dict"].values()) == stats["count"]


def test_every_defect_is_planted_once_and_recorded(demo_set):
    _, truth = demo_set
    planted = [r["defect"] for r in truth["samples"].values() if r["defect"] != "none"]
    assert sorted(planted) == sorted(DEFECTS)
    for record in truth["samples"].values():
        phase, expected = DEFECTS.get(record["defect"], (None, demo_data.KEEP))
        assert (record["phase"], record["expected"]) == (phase, expected)


def test_planted_image_defects_are_what_they_claim(demo_set):
    root, truth = demo_set
    samples = _tar_samples(root)

    def image_of(defect):
        key, _ = _truth_of(truth, defect)
        return samples[key]

    truncated = image_of("truncated_jpeg")["jpg"]
    assert truncated[:2] == b"\xff\xd8"
    with pytest.raises(OSError):
        Image.open(io.BytesIO(truncated)).load()
    assert image_of("zero_byte_image")["jpg"] == b""
    assert image_of("png_bytes_as_jpg")["jpg"][:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(image_of("cmyk")["jpg"])).mode == "CMYK"
    assert Image.open(io.BytesIO(image_of("grayscale")["jpg"])).mode == "L"
    assert Image.open(io.BytesIO(image_of("sixteen_bit")["jpg"])).mode.startswith("I;16")
    assert "json" not in image_of("missing_json")
    with pytest.raises(UnicodeDecodeError):
        image_of("non_utf8_caption")["txt"].decode("utf-8")


def test_exif_rotated_image_is_upright_after_transpose(demo_set):
    root, truth = demo_set
    key, _ = _truth_of(truth, "exif_rotated")
    sample = _tar_samples(root)[key]
    meta = json.loads(sample["json"])
    stored = Image.open(io.BytesIO(sample["jpg"]))
    assert stored.size == (meta["height"], meta["width"]) and meta["width"] != meta["height"]
    assert ImageOps.exif_transpose(stored).size == (meta["width"], meta["height"])


def test_metadata_defects_are_in_the_metadata(demo_set):
    root, truth = demo_set
    rows = _parquet_rows(root)

    def row(defect):
        return rows[_truth_of(truth, defect)[0]]

    assert row("download_failed")["status"] != "success"
    assert max(row("too_small")["original_width"], row("too_small")["original_height"]) < 64
    assert row("extreme_aspect_ratio")["original_width"] / row("extreme_aspect_ratio")["original_height"] > 3
    assert row("empty_caption")["caption"] == ""
    assert row("watermark")["pwatermark"] > 0.5
    assert row("unsafe")["punsafe"] > 0.99
    assert row("low_aesthetic")["AESTHETIC_SCORE"] < 5
    duplicate = row("duplicate")
    originals = [r for r in rows.values() if r["hash"] == duplicate["hash"] and r["key"] != duplicate["key"]]
    assert len(originals) == 1 and originals[0]["key"] < duplicate["key"]
    clean = [r for key, r in rows.items() if truth["samples"][key]["defect"] == "none"]
    assert all(r["pwatermark"] <= 0.5 and r["punsafe"] <= 0.99 and r["AESTHETIC_SCORE"] >= 5.1 for r in clean)


def test_captions_describe_the_pictures(demo_set):
    root, truth = demo_set
    samples = _tar_samples(root)
    named = {**COLOURS, **BACKGROUNDS}
    checked = 0
    for key, record in truth["samples"].items():
        if record["defect"] != "none":
            continue
        labels = record["labels"]
        assert record["caption"] == f"a {labels['colour']} {labels['shape']} on a {labels['background']} background"
        pixels = np.asarray(Image.open(io.BytesIO(samples[key]["jpg"])).convert("RGB"), dtype=np.float32)
        nearest = np.argmin(np.stack([np.abs(pixels - rgb).sum(-1) for rgb in named.values()]), axis=0)
        share = {name: float((nearest == i).mean()) for i, name in enumerate(named)}
        assert share[labels["background"]] > 0.4, (key, share)  # shape covers at most 36% of the short side squared
        assert share[labels["colour"]] > 0.03, (key, share)
        assert max(share[c] for c in COLOURS if c != labels["colour"]) < 0.01, (key, share)
        checked += 1
    assert checked > 250


def test_backgrounds_are_never_a_shape_colour():
    assert not set(BACKGROUNDS) & set(COLOURS)
    for background in BACKGROUNDS.values():
        for colour in COLOURS.values():
            assert sum(abs(a - b) for a, b in zip(background, colour)) > 150


def test_sizes_vary(demo_set):
    root, truth = demo_set
    rows = [r for key, r in _parquet_rows(root).items() if truth["samples"][key]["defect"] == "none"]
    short_sides = [min(r["width"], r["height"]) for r in rows]
    ratios = {round(r["width"] / r["height"], 1) for r in rows}
    assert min(short_sides) < 100 and max(short_sides) >= 512
    assert len(ratios) >= 5


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    small = DemoDataConfig(num_shards=2, samples_per_shard=20, large_fraction=0.0)
    demo_data.generate(str(tmp_path / "a"), small)
    demo_data.generate(str(tmp_path / "b"), small)
    demo_data.generate(
        str(tmp_path / "c"), DemoDataConfig(num_shards=2, samples_per_shard=20, large_fraction=0.0, seed=1)
    )
    for name in ("shards/00000.tar", "shards/00001.parquet", demo_data.GROUND_TRUTH_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "shards/00000.tar").read_bytes() != (tmp_path / "c" / "shards/00000.tar").read_bytes()


def test_runs_as_a_module_with_overrides(tmp_path):
    demo_data.main([str(tmp_path / "set"), "--set", "num_shards=2", "--set", "samples_per_shard=20"])
    assert sorted(os.listdir(tmp_path / "set" / "shards")) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "00001.parquet",
        "00001.tar",
        "00001_stats.json",
    ]
    with pytest.raises(ValueError, match="samples_per_shar"):
        demo_data.main([str(tmp_path / "x"), "--set", "samples_per_shar=3"])


def test_too_few_slots_for_the_defects_is_a_clear_error():
    with pytest.raises(ValueError, match="plant_defects=false"):
        DemoDataConfig(num_shards=1, samples_per_shard=10)
    assert DemoDataConfig(num_shards=1, samples_per_shard=10, plant_defects=False).plant_defects is False
