"""The job's typed config: strict parsing with one-sentence errors, stable job ids, resources from the cluster."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from segmill.pipeline.bulk.config import ResourceConfig, SegmentConfig

BASE = {"input": "s3://bucket/images/", "output": "s3://bucket/results/", "model": "ckpt/roads.pt"}


def _one_sentence_naming(message: str, key: str) -> None:
    assert key in message, f"the message must name {key!r}: {message!r}"
    assert "\n" not in message and message.endswith("."), f"not one sentence: {message!r}"


def test_from_dict_builds_typed_values() -> None:
    config = SegmentConfig.from_dict({**BASE, "scales": [1, 1.5], "flip": True, "max_side": 1024,
                                      "low_confidence": 0.4, "resources": {"batch_size": 8, "decode_cpus": 1}})
    assert config.scales == (1.0, 1.5) and config.flip is True and config.max_side == 1024
    assert config.resources == ResourceConfig(batch_size=8, decode_cpus=1.0)
    assert isinstance(config.resources.decode_cpus, float)
    assert SegmentConfig.from_dict(config.to_dict()) == config  # round trip


def test_defaults() -> None:
    config = SegmentConfig.from_dict(BASE)
    assert config.labels is None and config.scales == (1.0,) and not config.flip and not config.export_png
    assert config.resources == ResourceConfig()


@pytest.mark.parametrize("data, key", [
    ({**BASE, "batchsize": 4}, "batchsize"),
    ({**BASE, "resources": {"batch": 4}}, "batch"),
])
def test_unknown_keys_are_rejected(data: dict, key: str) -> None:
    with pytest.raises(ValueError) as info:
        SegmentConfig.from_dict(data)
    assert "unknown key(s)" in str(info.value)
    _one_sentence_naming(str(info.value), repr(key))


@pytest.mark.parametrize("data, key", [
    ({**BASE, "flip": "yes"}, "flip"),
    ({**BASE, "flip": 1}, "flip"),
    ({**BASE, "max_pixels": 1.5}, "max_pixels"),
    ({**BASE, "max_pixels": True}, "max_pixels"),
    ({**BASE, "model": 3}, "model"),
    ({**BASE, "scales": "big"}, "scales"),
    ({**BASE, "scales": [1, "2"]}, "scales"),
    ({**BASE, "low_confidence": "0.5"}, "low_confidence"),
    ({**BASE, "resources": {"batch_size": "8"}}, "batch_size"),
    ({**BASE, "resources": {"gpus_per_actor": "one"}}, "gpus_per_actor"),
])
def test_wrong_types_are_rejected(data: dict, key: str) -> None:
    with pytest.raises(ValueError) as info:
        SegmentConfig.from_dict(data)
    assert "must be" in str(info.value)
    _one_sentence_naming(str(info.value), repr(key))


def test_resources_must_be_a_mapping() -> None:
    with pytest.raises(ValueError) as info:
        SegmentConfig.from_dict({**BASE, "resources": [4]})
    _one_sentence_naming(str(info.value), "resources")


@pytest.mark.parametrize("missing", ["input", "output", "model"])
def test_required_keys(missing: str) -> None:
    with pytest.raises(ValueError) as info:
        SegmentConfig.from_dict({k: v for k, v in BASE.items() if k != missing})
    _one_sentence_naming(str(info.value), repr(missing))
    with pytest.raises(ValueError) as info:
        SegmentConfig.from_dict({**BASE, missing: ""})
    _one_sentence_naming(str(info.value), repr(missing))


@pytest.mark.parametrize("data, phrase", [
    ({**BASE, "scales": []}, "scales"),
    ({**BASE, "scales": [1, -0.5]}, "scales"),
    ({**BASE, "low_confidence": 1.5}, "low_confidence"),
    ({**BASE, "resources": {"queue_memory_mb": 0}}, "queue_memory_mb"),
    ({**BASE, "resources": {"object_store_mb": 50}}, "object_store_mb"),
])
def test_invalid_values(data: dict, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        SegmentConfig.from_dict(data)


def test_from_yaml_with_overrides(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({**BASE, "flip": True, "resources": {"rows_per_file": 500}}))
    config = SegmentConfig.from_yaml(str(spec), {"output": "/tmp/other", "labels": None})
    assert config.output == "/tmp/other" and config.flip and config.resources.rows_per_file == 500
    assert config.labels is None  # None overrides mean "not given on the command line"


def test_from_yaml_rejects_unknown_keys_naming_the_file(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({**BASE, "actors": 3}))
    with pytest.raises(ValueError) as info:
        SegmentConfig.from_yaml(str(spec))
    _one_sentence_naming(str(info.value), "'actors'")
    assert str(spec) in str(info.value)


def test_from_yaml_rejects_wrong_types(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("input: images\noutput: out\nmodel: m.pt\nresources:\n  actors_max: many\n")
    with pytest.raises(ValueError) as info:
        SegmentConfig.from_yaml(str(spec))
    _one_sentence_naming(str(info.value), "'actors_max'")


def test_from_yaml_rejects_a_list(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("- input\n- output\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        SegmentConfig.from_yaml(str(spec))


def test_job_id_is_stable_and_follows_what_defines_the_results() -> None:
    config = SegmentConfig.from_dict(BASE)
    again = SegmentConfig.from_dict(dict(reversed(list(BASE.items()))))
    assert config.resolved_job_id() == again.resolved_job_id()
    assert config.resolved_job_id().startswith("seg-")
    # Resources and the output folder do not change the results: the same job, resumable elsewhere or faster.
    faster = SegmentConfig.from_dict({**BASE, "resources": {"batch_size": 2}})
    assert faster.resolved_job_id() == config.resolved_job_id()
    for change in ({"model": "ckpt/roads-v2.pt"}, {"input": "s3://bucket/other/"}, {"labels": "s3://bucket/labels/"},
                   {"scales": [1, 1.5]}, {"flip": True}, {"max_side": 512}):
        assert SegmentConfig.from_dict({**BASE, **change}).resolved_job_id() != config.resolved_job_id(), change
    assert SegmentConfig.from_dict({**BASE, "job_id": "nightly-42"}).resolved_job_id() == "nightly-42"


def test_job_id_is_the_same_in_another_process() -> None:
    import subprocess
    import sys

    code = ("from segmill.pipeline.bulk.config import SegmentConfig as S; "
            f"print(S.from_dict({BASE!r}).resolved_job_id())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == SegmentConfig.from_dict(BASE).resolved_job_id()


def test_resources_on_a_two_core_cpu_machine() -> None:
    resolved = ResourceConfig().resolve({"CPU": 2.0, "memory": 8e9})
    assert resolved.gpus_per_actor == 0.0
    # One actor running two single-thread batches at once (measured best, quiet and with a core taken).
    assert (resolved.cpus_per_actor, resolved.torch_threads, resolved.concurrent_batches) == (1.0, 1, 2)
    assert resolved.actors_min == 1 and resolved.actors_max == 1
    big = ResourceConfig().resolve({"CPU": 32.0})
    assert (big.actors_max, big.torch_threads, big.concurrent_batches, big.cpus_per_actor) == (8, 1, 4, 2.0)
    # A user's thread count splits the actor's CPUs into fewer, wider batches; an explicit count wins.
    assert ResourceConfig(torch_threads=2).resolve({"CPU": 2.0}).concurrent_batches == 1
    assert ResourceConfig(torch_threads=2).resolve({"CPU": 8.0}).concurrent_batches == 2
    assert ResourceConfig(concurrent_batches=3).resolve({"CPU": 2.0}).concurrent_batches == 3
    assert resolved.batch_size >= 1
    assert (resolved.queue_memory_mb, big.queue_memory_mb) == (256, 8 * 256)  # queued blocks: a budget per actor


def test_resources_on_a_gpu_machine() -> None:
    resolved = ResourceConfig().resolve({"CPU": 16.0, "GPU": 2.0})
    assert resolved.gpus_per_actor == 1.0 and resolved.actors_max == 2  # one actor per GPU
    assert resolved.queue_memory_mb == 2 * 2048  # a GPU eats blocks faster: a deeper queue keeps it fed
    assert resolved.cpus_per_actor == 1.0 and resolved.batch_size >= 1
    assert resolved.concurrent_batches == 1  # one batch at a time on a GPU: two would double its memory


def test_explicit_resources_win_over_the_cluster() -> None:
    resolved = ResourceConfig(batch_size=3, actors_max=5, gpus_per_actor=0.5).resolve({"CPU": 16.0, "GPU": 2.0})
    assert (resolved.batch_size, resolved.actors_max, resolved.gpus_per_actor) == (3, 5, 0.5)
    assert ResourceConfig(gpus_per_actor=0.5).resolve({"CPU": 8.0, "GPU": 2.0}).actors_max == 4
    on_cpu = ResourceConfig(actors_min=3, actors_max=1).resolve({"CPU": 2.0})
    assert on_cpu.actors_min == 3 and on_cpu.actors_max == 3  # max is never below min
    assert ResourceConfig(queue_memory_mb=100).resolve({"CPU": 64.0}).queue_memory_mb == 100
