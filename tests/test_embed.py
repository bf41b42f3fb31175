"""The embed phase: the aesthetic predictor's checkpoint format, weights from URLs, scores and thresholds."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch

from cluster.local_cluster import GPU_STAND_IN
from pipelines import decode, embed, metadata_filter, schema, shard_phase
from pipelines.config import load_config
from pipelines.demo_data import DemoDataConfig, generate
from pipelines.schema import DropReason
from pipelines.storage import StorageConfig, filesystem, local_copy
from stages.aesthetic import AestheticPredictor
from stages.weights import load_weights

# The layer names and shapes of the public sac+logos+ava1-l14-linearMSE.pth, for a 768-d embedding.
OFFICIAL_SHAPES = {
    "layers.0.weight": (1024, 768),
    "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024),
    "layers.2.bias": (128,),
    "layers.4.weight": (64, 128),
    "layers.4.bias": (64,),
    "layers.6.weight": (16, 64),
    "layers.6.bias": (16,),
    "layers.7.weight": (1, 16),
    "layers.7.bias": (1,),
}


def test_aesthetic_predictor_has_the_public_checkpoint_layout():
    assert {k: tuple(v.shape) for k, v in AestheticPredictor(768).state_dict().items()} == OFFICIAL_SHAPES


def test_v2_clip_model_is_the_one_the_aesthetic_predictor_reads():
    """v2 names open_clip's ViT-L-14 with the "openai" tag: a model and tag open_clip ships, whose 768-d
    image embedding is the public predictor's input (its first layer is (1024, 768))."""
    config = load_config("v2").embed
    assert config.clip_pretrained in open_clip.list_pretrained_tags_by_model(config.clip_model)
    assert open_clip.get_model_config(config.clip_model)["embed_dim"] == OFFICIAL_SHAPES["layers.0.weight"][1]
    assert config.aesthetic_weights.endswith("/sac+logos+ava1-l14-linearMSE.pth")


def test_aesthetic_checkpoint_in_the_official_format_loads_and_scores(tmp_path):
    torch.manual_seed(0)
    state = {name: torch.randn(shape) * 0.1 for name, shape in OFFICIAL_SHAPES.items()}
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    predictor = load_weights(AestheticPredictor(768), tmp_path / "sac+logos+ava1-l14-linearMSE.pth").eval()
    embedding = torch.randn(3, 768)
    x = embedding / embedding.norm(dim=-1, keepdim=True)
    for index in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    torch.testing.assert_close(predictor(embedding), x.squeeze(-1))
    with pytest.raises(ValueError, match="do not fit AestheticPredictor"):
        load_weights(AestheticPredictor(512), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")


@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server on 127.0.0.1 serving ``tmp_path/www``."""
    (tmp_path / "www").mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path / "www", f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_weights_from_a_url_are_downloaded_once_per_version(http_folder, tmp_path):
    folder, url = http_folder
    torch.save(AestheticPredictor(8).state_dict(), folder / "predictor.pth")
    first = local_copy(f"{url}/predictor.pth", cache_dir=str(tmp_path / "cache"))
    Path(first).write_bytes(b"the cached copy, not the server's")
    assert local_copy(f"{url}/predictor.pth", cache_dir=str(tmp_path / "cache")) == first
    assert Path(first).read_bytes() == b"the cached copy, not the server's", "downloaded the same version again"

    torch.save(AestheticPredictor(16).state_dict(), folder / "predictor.pth")
    second = local_copy(f"{url}/predictor.pth", cache_dir=str(tmp_path / "cache"))
    assert second != first, "a file written again at the same URL was served from the cache"
    load_weights(AestheticPredictor(16), second)
    assert local_copy(str(folder / "x.pth")) == str(folder / "x.pth")


@pytest.fixture(scope="module")
def decoded(tmp_path_factory, local_ray):
    """A small demo set through the metadata filter and decode."""
    root = tmp_path_factory.mktemp("embed")
    generate(str(root / "demo"), DemoDataConfig(num_shards=2, samples_per_shard=20, plant_defects=False))
    config, storage = load_config("tiny"), StorageConfig()
    filtered, _ = metadata_filter.run(str(root / "demo" / "shards"), str(root / "filtered"), config.filter, storage)
    phase = decode.phase(
        shards_url=str(root / "demo" / "shards"),
        filtered_url=str(root / "filtered"),
        output_url=str(root / "decode"),
        filtered_fingerprint=filtered.config,
        config=config.decode,
        storage=storage,
    )
    manifest, _ = shard_phase.run(phase, sorted(filtered.shards), str(root / "decode"), storage)
    return root, manifest


def _embed(root, decoded_manifest, config, output):
    phase = embed.phase(
        decoded_url=str(root / "decode"),
        output_url=str(output),
        decoded_fingerprint=decoded_manifest.config,
        config=config,
        storage=StorageConfig(),
    )
    manifest, metrics = shard_phase.run(phase, sorted(decoded_manifest.shards), str(output), StorageConfig())
    rows = [r for shard in sorted(manifest.shards) for r in pq.read_table(output / f"{shard}.parquet").to_pylist()]
    return manifest, metrics, rows


def test_embeddings_scores_and_thresholds(decoded, tmp_path):
    root, decoded_manifest = decoded
    config = load_config("tiny").embed
    manifest, metrics, rows = _embed(root, decoded_manifest, config, tmp_path / "all")
    assert manifest.kept == manifest.samples_in == decoded_manifest.kept == len(rows) == 40
    assert metrics["gpu_hours_attempt"] == 0 and metrics["samples_per_second_per_cpu"] > 0
    table = pq.read_table(tmp_path / "all" / "00000.parquet")
    images = table[schema.CLIP_IMAGE_EMBEDDING].combine_chunks().to_numpy_ndarray().astype(np.float32)
    texts = table[schema.CLIP_TEXT_EMBEDDING].combine_chunks().to_numpy_ndarray().astype(np.float32)
    assert images.shape == texts.shape == (table.num_rows, 32)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=2e-3)
    np.testing.assert_allclose((images * texts).sum(1), table[schema.CLIP_SIMILARITY].to_numpy(), atol=3e-3)

    # Thresholds at the medians: exactly the samples below are dropped, similarity checked first.
    similarity = {r[schema.KEY]: r[schema.CLIP_SIMILARITY] for r in rows}
    aesthetic = {r[schema.KEY]: r[schema.AESTHETIC_SCORE] for r in rows}
    cut_similarity, cut_aesthetic = (
        float(np.median(list(similarity.values()))),
        float(np.median(list(aesthetic.values()))),
    )
    strict = dataclasses.replace(config, min_clip_similarity=cut_similarity, min_aesthetic_score=cut_aesthetic)
    manifest, _, rows = _embed(root, decoded_manifest, strict, tmp_path / "strict")
    expected = {
        key: (
            DropReason.LOW_CLIP_SIMILARITY
            if similarity[key] < cut_similarity
            else DropReason.LOW_AESTHETIC_SCORE
            if aesthetic[key] < cut_aesthetic
            else None
        )
        for key in similarity
    }
    assert {r[schema.KEY]: r[schema.DROP_REASON] for r in rows} == expected
    assert manifest.kept == sum(reason is None for reason in expected.values()) > 0


def test_under_a_budget_embed_stops_at_a_shard_boundary_and_the_next_run_does_only_the_rest(decoded, tmp_path):
    root, decoded_manifest = decoded
    shards, output = sorted(decoded_manifest.shards), tmp_path / "budgeted"
    config = load_config("tiny").embed
    one_gpu = dataclasses.replace(
        config.resources, max_actors=1, calls_per_actor=1, num_gpus=1, gpu_resource=GPU_STAND_IN
    )
    phase = embed.phase(
        decoded_url=str(root / "decode"),
        output_url=str(output),
        decoded_fingerprint=decoded_manifest.config,
        config=dataclasses.replace(config, resources=one_gpu),
        storage=StorageConfig(),
    )
    reads = 0

    def clock() -> float:
        """Each read one second after the last, whatever this machine's speed: the driver reads 1 and
        sets the deadline; the actor's copy starts the first shard at 2 (it ends at 3) and would start
        the second at 4, whose second would end past the deadline at 3.5."""
        nonlocal reads
        reads += 1
        return float(reads)

    manifest, metrics = shard_phase.run(
        phase, shards, str(output), StorageConfig(), budget_gpu_hours=2.5 / 3600, clock=clock
    )
    assert manifest is None and metrics["shards_left"] == 1 and metrics["shards_processed"] == 1
    (written,) = sorted(output.glob("*.parquet"))
    ledger, _ = shard_phase.read_shard_ledger(filesystem(str(output))[0], str(written))
    assert ledger.samples_in == decoded_manifest.shards[written.stem].kept == pq.read_table(written).num_rows

    manifest, metrics = shard_phase.run(phase, shards, str(output), StorageConfig())
    assert metrics["shards_skipped"] == 1 and metrics["shards_processed"] == 1
    keys = [key for shard in shards for key in pq.read_table(output / f"{shard}.parquet")[schema.KEY].to_pylist()]
    assert manifest.samples_in == decoded_manifest.kept == len(keys) == len(set(keys))
