"""The model stage alone (no Ray): one image that breaks the model costs one error row, never its batch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segmill.models.options import InferenceOptions
from segmill.pipeline.bulk.results import build_table
from segmill.pipeline.bulk.rows import ERROR, OK, decoded_rows
from segmill.pipeline.bulk.segmenter import Segmenter
from segmill.pipeline.bulk.stages import encode_masks
from segmill.pipeline.common.scenes import SCENE_CLASSES, render_scene


def _batch(uris: list[str]) -> dict[str, np.ndarray]:
    """Decode-stage rows (rows.DECODED) of rendered scenes."""
    images = [render_scene(9, i)[0] for i in range(len(uris))]
    rows = decoded_rows(uris, [None] * len(uris))
    rows["height"][:] = [im.shape[0] for im in images]
    rows["width"][:] = [im.shape[1] for im in images]
    rows["pixels"] = np.array([im.tobytes() for im in images], dtype=object)
    return rows


def test_a_failing_image_becomes_one_error_row_and_the_rest_are_segmented(tiny_checkpoint: str, monkeypatch) -> None:
    segmenter = Segmenter(Path(tiny_checkpoint).read_bytes(), use_gpu=False, torch_threads=1, options=InferenceOptions(batch_size=8))
    original = Segmenter._segment_bucket

    def fail_on_poison(self, batch, indices, *args):
        if any("poison" in batch["image_uri"][i] for i in indices):
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(self, batch, indices, *args)

    monkeypatch.setattr(Segmenter, "_segment_bucket", fail_on_poison)
    uris = ["a.png", "poison.png", "c.png", "d.png"]
    out = segmenter(_batch(uris))
    assert list(out["status"]) == [OK, ERROR, OK, OK]
    assert out["error"][1].startswith("poison.png failed in the model (RuntimeError")
    assert out["error_kind"][1] == "infrastructure" and out["error_kind"][0] == "", "a model failure is retried"
    assert out["mask"][1] is None and all(out["mask"][i] is not None for i in (0, 2, 3))
    table = build_table(encode_masks(out, num_classes=len(SCENE_CLASSES)), SCENE_CLASSES, job_id="j", model_name="m",
                        model_version="1")
    assert table["status"].to_pylist() == [OK, ERROR, OK, OK] and table["mask"].null_count == 1


@pytest.mark.parametrize("flip", [False, True])
def test_statistics_describe_the_probabilities(tiny_checkpoint: str, flip: bool) -> None:
    segmenter = Segmenter(Path(tiny_checkpoint).read_bytes(), use_gpu=False, torch_threads=1,
                          options=InferenceOptions(batch_size=2, flip=flip))
    out = segmenter(_batch(["a.png", "b.png"]))
    assert np.all((out["confidence_mean"] > 1 / len(SCENE_CLASSES)) & (out["confidence_mean"] <= 1))
    assert np.all((out["entropy_mean"] >= 0) & (out["entropy_mean"] <= np.log(len(SCENE_CLASSES)) + 1e-6))
    assert np.array_equal(out["class_pixels"].sum(1), out["height"] * out["width"])
