"""Config: named runs, dotted overrides, and errors that name the offending key."""

from __future__ import annotations

import dataclasses

import pytest

from cluster.resources import StepResources, gpu_request
from pipelines.config import RUNS, load_config
from pipelines.overrides import apply_overrides, to_flat_dict


@pytest.mark.parametrize("name", sorted(RUNS))
def test_named_runs_build(name):
    config = load_config(name)
    assert config.name == name
    assert to_flat_dict(config)["filter.min_side"] == config.filter.min_side


def test_v2_has_the_paper_data_settings():
    filter_ = load_config("v2").filter
    assert (filter_.min_side, filter_.max_side) == (512, 4096)
    assert (filter_.max_pwatermark, filter_.max_punsafe, filter_.min_aesthetic) == (0.5, 0.99, 5.1)


def test_overrides_parse_by_field_type():
    config = load_config(
        "tiny",
        [
            "filter.min_side=256",
            "filter.max_aspect_ratio=2.5",
            "filter.min_aesthetic=none",
            "filter.drop_duplicates=false",
            "data.demo.seed=7",
            "work_dir=/tmp/elsewhere",
            "filter.resources.max_actors=4",
            "train_b.compile=true",
            "train_b.activation_memory_budget=0.3,0.5,1",
        ],
    )
    assert config.filter.min_side == 256
    assert config.filter.max_aspect_ratio == 2.5
    assert config.filter.min_aesthetic is None
    assert config.filter.drop_duplicates is False
    assert config.data.demo.seed == 7
    assert config.work_dir == "/tmp/elsewhere"
    assert config.filter.resources.max_actors == 4
    assert config.train_b.activation_memory_budget == (0.3, 0.5, 1.0)  # one share per level of the tiny Stage B
    assert load_config("tiny").filter.min_side == 64, "overrides must not change the named run"


@pytest.mark.parametrize(
    "override, message",
    [
        ("filter.min_sid=3", "unknown config key 'filter.min_sid'"),
        ("nope=1", "unknown config key 'nope'"),
        ("filter.min_side.x=1", "'min_side' is a value"),
        ("filter=3", "'filter' is a section"),
        ("filter.min_side=abc", "filter.min_side: 'abc' is not an integer"),
        ("filter.max_pwatermark=lots", "filter.max_pwatermark: 'lots' is not a number"),
        ("filter.drop_duplicates=maybe", "filter.drop_duplicates: 'maybe' is not a boolean"),
        ("filter.min_caption_chars=none", "filter.min_caption_chars: 'none' is not an integer"),
        ("filter.max_punsafe=1.5", "filter.max_punsafe.*must be in \\[0, 1\\]"),
        ("filter.max_side=10", "filter.max_side.*must be >= min_side"),
        ("filter.resources.max_actors=0", "filter.resources.max_actors.*must be >= min_actors"),
        ("pre_encode.resources.calls_per_actor=0", "pre_encode.resources.calls_per_actor.*must be >= 1"),
        ("ray.log_level=LOUD", "ray.*log_level must be a logging level"),
        ("min_side", "must look like dotted.key=value"),
        ("train_a.activation_checkpointing=true", "train_a.activation_checkpointing: only Stage B and Stage C"),
        (
            "train_c.compile=true train_c.activation_memory_budget=1.5",
            "train_c.*activation_memory_budget must be one or",
        ),
        (
            "train_c.compile=true train_c.activation_memory_budget=0.5,0.5",
            "train_c.activation_memory_budget has 2 shares",
        ),
        (
            "train_b.compile=true train_b.activation_memory_budget=0.5,0.5",
            "one per level of the 'tiny' Stage B \\(3\\)",
        ),
        ("train_c.activation_memory_budget=0.5", "train_c.*activation_memory_budget below 1 needs compile=true"),
        (
            "train_c.compile=true train_c.activation_memory_budget=0.5 train_c.activation_checkpointing=true",
            "train_c.*set one of them",
        ),
        (
            "embed.resources.gpu_resource=CPU",
            "embed.resources.gpu_resource: gpu_resource must be GPU or the name of a custom",
        ),
        ("train_c.gpu_resource=", "train_c.gpu_resource: .*got ''"),
        ("generate.gpu_resource=node:10.0.0.1", "generate.gpu_resource: .*got 'node:10.0.0.1'"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("tiny", override.split())


def test_unknown_run_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown config 'huge'.*tiny"):
        load_config("huge")


def test_overrides_rerun_the_section_checks():
    with pytest.raises(ValueError, match="max_actors"):
        apply_overrides(StepResources(), ["min_actors=3"])
    assert dataclasses.replace(StepResources(), max_actors=3).max_actors == 3


def test_fields_of_one_section_change_together():
    config = load_config(
        "tiny",
        [
            "storage.key=AKIAEXAMPLE",
            "storage.secret=shh",
            "filter.min_side=100",
            "filter.max_side=90",
            "filter.max_side=200",
        ],
    )
    assert (config.storage.key, config.storage.secret) == ("AKIAEXAMPLE", "shh")
    assert (config.filter.min_side, config.filter.max_side) == (100, 200)
    with pytest.raises(ValueError, match="storage.key.*set both key and secret"):
        load_config("tiny", ["storage.key=AKIAEXAMPLE"])


def test_secrets_show_only_as_stars():
    flat = to_flat_dict(load_config("tiny", ["storage.key=AKIAEXAMPLE", "storage.secret=shh"]))
    assert flat["storage.key"] == flat["storage.secret"] == "***"
    assert to_flat_dict(load_config("tiny"))["storage.secret"] == ""


def test_a_custom_gpu_resource_is_asked_for_in_place_of_gpus():
    assert StepResources(num_gpus=1).actor_args()["num_gpus"] == 1 and "resources" not in StepResources().actor_args()
    stand_in = StepResources(num_gpus=2, gpu_resource="fake_gpu")
    assert stand_in.actor_args()["num_gpus"] == 0 and stand_in.actor_args()["resources"] == {"fake_gpu": 2}
    assert StepResources(num_gpus=1).on_gpu and not stand_in.on_gpu
    assert gpu_request(0, "fake_gpu") == {"num_gpus": 0}
