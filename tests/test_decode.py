"""The decode phase: image checks one by one, tar reading, then the Ray phase against the ground truth."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.local_cluster import kill_session
from pipelines import decode, demo_data, metadata_filter, schema, shard_phase
from pipelines.config import load_config
from pipelines.decode import DecodeConfig, decode_image, tar_samples
from pipelines.schema import DropReason
from pipelines.storage import StorageConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = DecodeConfig(resolution=32, image_format="png")


def _encoded(image: Image.Image, format_: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format_, **options)
    return buffer.getvalue()


def _halves(width: int = 80, height: int = 60) -> Image.Image:
    """Left half red, right half blue: any wrong rotation or flip shows."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = (255, 0, 0)
    array[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(array)


def _left_is_red(crop: Image.Image) -> bool:
    pixels = np.asarray(crop, np.float32)
    left, right = pixels[:, :4].mean((0, 1)), pixels[:, -4:].mean((0, 1))
    return left[0] > 200 > left[2] and right[2] > 200 > right[0]


def test_jpeg_png_webp_decode_to_rgb_crops():
    for format_ in ("JPEG", "PNG", "WEBP"):
        crop = decode_image(_encoded(_halves(), format_), (80, 60), CONFIG)
        assert isinstance(crop, Image.Image) and crop.mode == "RGB" and crop.size == (32, 32), format_
        assert _left_is_red(crop), format_


@pytest.mark.parametrize(
    "orientation, stored",
    [
        (3, lambda image: image.rotate(180)),
        (6, lambda image: image.rotate(90, expand=True)),
        (8, lambda image: image.rotate(-90, expand=True)),
    ],
)
def test_exif_orientation_is_applied(orientation, stored):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encoded(stored(_halves()), "JPEG", exif=exif.tobytes(), quality=95)
    crop = decode_image(data, (80, 60), CONFIG)
    assert isinstance(crop, Image.Image) and _left_is_red(crop)


def test_modes_become_rgb_with_their_content():
    grey = Image.new("L", (40, 40), 100)
    sixteen = Image.fromarray(np.full((40, 40), 100 * 257, np.uint16))
    cmyk = _halves(40, 40).convert("CMYK")
    alpha = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red: white after compositing
    palette = _halves(40, 40).convert("P")
    for image, format_, expected in [
        (grey, "JPEG", (100, 100, 100)),
        (sixteen, "PNG", (100, 100, 100)),
        (alpha, "PNG", (255, 255, 255)),
    ]:
        crop = decode_image(_encoded(image, format_), (40, 40), CONFIG)
        assert np.abs(np.asarray(crop, np.float32).mean((0, 1)) - expected).max() < 3, (image.mode, format_)
    for image, format_ in [(cmyk, "JPEG"), (palette, "PNG")]:
        assert _left_is_red(decode_image(_encoded(image, format_), (40, 40), CONFIG)), image.mode


def test_large_jpeg_decoded_at_reduced_scale_matches_full_decode():
    rng = np.random.default_rng(0)
    big = Image.fromarray(np.kron(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), np.ones((64, 64, 1), np.uint8)))
    data = _encoded(big, "JPEG", quality=95)  # 2560x2560
    fast = np.asarray(decode_image(data, big.size, CONFIG), np.float32)
    full = np.asarray(
        Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC), np.float32
    )
    assert np.abs(fast - full).mean() < 6  # resampling differences only


def test_buckets_give_each_image_the_crop_nearest_its_aspect_ratio():
    buckets = DecodeConfig(resolution=64, crop="buckets", bucket_multiple=16, image_format="png")
    assert buckets.crop_sizes() == ((48, 80), (48, 96), (64, 64), (80, 48), (96, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, upright portrait: bucketed as it is seen
    for data, upright, expected in [
        (_encoded(_halves(300, 200), "JPEG"), (300, 200), (80, 48)),
        (_encoded(_halves(200, 300), "PNG"), (200, 300), (48, 80)),
        (_encoded(_halves(420, 200), "WEBP"), (420, 200), (96, 48)),
        (_encoded(_halves(210, 200), "JPEG"), (210, 200), (64, 64)),
        (_encoded(_halves(240, 320).rotate(90, expand=True), "JPEG", exif=exif.tobytes()), (240, 320), (48, 80)),
    ]:
        crop = decode_image(data, upright, buckets)
        assert crop.size == expected and _left_is_red(crop), (upright, crop.size)
    # A large wide JPEG is decoded at reduced scale for its bucket as for the square.
    rng = np.random.default_rng(0)
    wide = Image.fromarray(np.kron(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8), np.ones((64, 64, 1), np.uint8)))
    data = _encoded(wide, "JPEG", quality=95)  # 2560x1280
    fast = np.asarray(decode_image(data, wide.size, buckets), np.float32)
    full = np.asarray(
        Image.open(io.BytesIO(data)).convert("RGB").resize((96, 48), Image.Resampling.BICUBIC), np.float32
    )
    assert fast.shape == full.shape and np.abs(fast - full).mean() < 6
    with pytest.raises(ValueError, match=r"bucket_multiple \(48\) must divide resolution \(64\)"):
        DecodeConfig(resolution=64, crop="buckets", bucket_multiple=48)
    with pytest.raises(ValueError, match="each >= 1"):
        DecodeConfig(resolution=64, crop="buckets", bucket_multiple=16, bucket_aspect_ratios=(1.0, 0.5))


@pytest.mark.parametrize(
    "data, expected_size, reason",
    [
        (b"", None, DropReason.IMAGE_EMPTY),
        (b"not an image at all", None, DropReason.IMAGE_CORRUPT),
        (_encoded(_halves(), "JPEG")[:400], (80, 60), DropReason.IMAGE_CORRUPT),
        (_encoded(_halves(), "GIF"), (80, 60), DropReason.IMAGE_FORMAT),
        (_encoded(_halves(), "BMP"), (80, 60), DropReason.IMAGE_FORMAT),
        (_encoded(_halves(), "JPEG"), (60, 80), DropReason.SIZE_MISMATCH),
        (_encoded(Image.new("1", (3000, 3000)), "PNG"), None, DropReason.DECOMPRESSION_BOMB),
    ],
)
def test_undecodable_images_get_their_reason(data, expected_size, reason):
    assert decode_image(data, expected_size, DecodeConfig(resolution=32, max_pixels=4_000_000)) == reason


def test_pil_refuses_a_real_bomb_before_decoding():
    bomb = _encoded(Image.new("1", (20_000, 20_000)), "PNG")  # 400 Mpx in a few kB
    assert len(bomb) < 200_000
    assert decode_image(bomb, None, CONFIG) == DropReason.DECOMPRESSION_BOMB


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_tar_samples_group_members_and_flag_truncation():
    data = _tar([("a.jpg", b"1"), ("a.txt", b"x"), ("../evil.jpg", b"2"), ("/abs/b.jpg", b"3"), ("c.jpg", b"4" * 5000)])
    samples = list(tar_samples(io.BytesIO(data)))
    assert samples[0] == ("a", {"jpg": b"1", "txt": b"x"})
    assert [s[0] for s in samples] == ["a", "../evil", "/abs/b", "c"]
    cut = list(tar_samples(io.BytesIO(data[:2600])))
    assert cut[-1] is None and cut[0][0] == "a"


def test_phase_keeps_exactly_the_ground_truth_and_reruns_do_nothing(demo_set, tmp_path, local_ray):
    root, truth = demo_set
    config = load_config("tiny")
    storage = StorageConfig()
    filtered, _ = metadata_filter.run(f"{root}/shards", str(tmp_path / "filtered"), config.filter, storage)
    phase = decode.phase(
        shards_url=f"{root}/shards",
        filtered_url=str(tmp_path / "filtered"),
        output_url=str(tmp_path / "decode"),
        filtered_fingerprint=filtered.config,
        config=config.decode,
        storage=storage,
    )
    manifest, metrics = shard_phase.run(phase, sorted(filtered.shards), str(tmp_path / "decode"), storage)
    assert metrics["shards_processed"] == len(filtered.shards) and metrics["samples_per_second_per_cpu"] > 0

    rows = [
        r
        for shard in sorted(manifest.shards)
        for r in pq.read_table(tmp_path / "decode" / f"{shard}.parquet").to_pylist()
    ]
    expected = {
        key: (None if r["expected"] == demo_data.KEEP else r["expected"])
        for key, r in truth["samples"].items()
        if r["phase"] != "metadata"
    }
    assert {r[schema.KEY]: r[schema.DROP_REASON] for r in rows} == expected
    for row in rows:
        if row[schema.DROP_REASON] is None:
            assert Image.open(io.BytesIO(row[schema.IMAGE])).size == (64, 64)
            assert row[schema.CAPTION] == truth["samples"][row[schema.KEY]]["caption"]
    assert manifest.samples_in == filtered.kept
    assert manifest.kept == sum(r is None for r in expected.values())

    again, metrics = shard_phase.run(phase, sorted(filtered.shards), str(tmp_path / "decode"), storage)
    assert metrics == {} and again.to_json() == manifest.to_json()

    # As after a kill: no manifest yet and one shard missing. Only that shard is redone.
    os.remove(tmp_path / "decode" / "manifest.json")
    os.remove(tmp_path / "decode" / "00002.parquet")
    redone, metrics = shard_phase.run(phase, sorted(filtered.shards), str(tmp_path / "decode"), storage)
    assert metrics["shards_processed"] == 1 and metrics["shards_skipped"] == len(filtered.shards) - 1
    assert redone.to_json() == manifest.to_json()


@pytest.mark.slow
def test_driver_killed_mid_decode_then_rerun_keeps_each_sample_once(tmp_path):
    work_dir = tmp_path / "work"
    # Many small shards widen the window in which the driver dies with some shards done.
    args = [
        sys.executable,
        "pipelines/full.py",
        "--phases",
        "metadata_filter,decode",
        "--set",
        f"work_dir={work_dir}",
        "--set",
        "data.demo.num_shards=12",
        "--set",
        "data.demo.samples_per_shard=30",
        "--set",
        "decode.resources.max_actors=1",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    driver = subprocess.Popen(
        args, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    outputs = work_dir / "decode"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            if outputs.is_dir() and len([p for p in outputs.iterdir() if p.suffix == ".parquet"]) >= 2:
                break
            time.sleep(0.05)
        assert driver.poll() is None, "the driver finished before it could be killed; make the phase slower"
    finally:
        killed = kill_session(driver.pid)
        driver.wait()
    assert killed, "the killed driver's local Ray outlived it"
    finished = [p for p in outputs.iterdir() if p.suffix == ".parquet"]
    assert 2 <= len(finished) < 12 and not (outputs / "manifest.json").exists()

    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    truth = json.loads((work_dir / "demo_data" / demo_data.GROUND_TRUTH_FILE).read_text())["samples"]
    keys = [
        r[schema.KEY]
        for p in sorted(outputs.glob("*.parquet"))
        for r in pq.read_table(p).to_pylist()
        if r[schema.DROP_REASON] is None
    ]
    assert len(keys) == len(set(keys))
    assert set(keys) == {k for k, r in truth.items() if r["expected"] == demo_data.KEEP}
    manifest = json.loads((outputs / "manifest.json").read_text())
    assert manifest["totals"]["kept"] == len(keys)


def test_the_hard_corpus_ends_in_the_ledger_sample_by_sample(tmp_path, local_ray):
    """Every sample of the reliability corpus (the demo's defects plus HARD_DEFECTS) is kept once or
    dropped for its planted reason, shard by shard; nothing crashes and nothing is lost."""
    demo = demo_data.DemoDataConfig(num_shards=2, samples_per_shard=30, hard_defects=True, large_fraction=0.0)
    truth = demo_data.generate(str(tmp_path / "corpus"), demo)["samples"]
    assert {r["defect"] for r in truth.values()} >= set(demo_data.HARD_DEFECTS)
    config, storage, shards = load_config("tiny"), StorageConfig(), str(tmp_path / "corpus" / "shards")
    filtered, _ = metadata_filter.run(shards, str(tmp_path / "filtered"), config.filter, storage)
    phase = decode.phase(
        shards_url=shards,
        filtered_url=str(tmp_path / "filtered"),
        output_url=str(tmp_path / "decode"),
        filtered_fingerprint=filtered.config,
        config=config.decode,
        storage=storage,
    )
    decoded, _ = shard_phase.run(phase, sorted(filtered.shards), str(tmp_path / "decode"), storage)

    for shard in sorted(decoded.shards):
        planted = [r for r in truth.values() if r["shard"] == shard]
        dropped: dict[str, int] = {}
        for r in planted:
            if r["expected"] != demo_data.KEEP:
                dropped[r["expected"]] = dropped.get(r["expected"], 0) + 1
        ledger = {**filtered.shards[shard].dropped, **decoded.shards[shard].dropped}
        assert ledger == dropped, shard
        assert filtered.shards[shard].samples_in == len(planted)
        assert decoded.shards[shard].kept == sum(r["expected"] == demo_data.KEEP for r in planted)
        assert filtered.shards[shard].samples_in == decoded.shards[shard].kept + sum(ledger.values())
    rows = {
        r[schema.KEY]: r
        for shard in sorted(decoded.shards)
        for r in pq.read_table(tmp_path / "decode" / f"{shard}.parquet").to_pylist()
    }
    for key, record in truth.items():
        if record["defect"] in ("palette", "alpha", "long_caption", "duplicate_member"):
            row = rows[key]
            assert row[schema.DROP_REASON] is None and Image.open(io.BytesIO(row[schema.IMAGE])).mode == "RGB"
            assert row[schema.CAPTION] == record["caption"]
