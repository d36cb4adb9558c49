"""The columns that pass between the bulk job's stages, declared once.

Ray Data carries a batch as a dict of numpy columns. Between stages, "" (an empty string or bytes) stands for
"none": Ray turns None in object columns into NaN.

    listing (image_uri, label_uri)
      -> decode:  DECODED     image_uri, label_uri, height, width, status, error, error_kind, pixels, label
                              [, jpeg]
      -> model:   SEGMENTED   image_uri, label_uri, height, width, status, error, error_kind, mask, has_label,
                              confidence_mean, entropy_mean, low_confidence_fraction, class_pixels, confusion
      -> encode:  SEGMENTED with each ok row's mask as PNG bytes
      -> commit:  the results table (results.py)
"""
from __future__ import annotations

import numpy as np

OK, ERROR = "ok", "error"
PASSED_ON = ("image_uri", "label_uri", "height", "width")  # what every stage hands on unchanged
STATUS = ("status", "error", "error_kind")  # error_kind: INPUT or INFRASTRUCTURE (common/decode.py)
DECODED = (*PASSED_ON, *STATUS, "pixels", "label")  # + "jpeg" when JPEGs are decoded on the GPU
STATISTICS = ("confidence_mean", "entropy_mean", "low_confidence_fraction")
SEGMENTED = (*PASSED_ON, *STATUS, "mask", "has_label", *STATISTICS, "class_pixels", "confusion")


def decoded_rows(image_uris: list[str], label_uris: list[str | None], *, gpu_jpeg: bool = False) -> dict[str, np.ndarray]:
    """Decode-stage columns for these listing rows: every row ok, with nothing decoded yet."""
    n = len(image_uris)
    rows = {"image_uri": np.array(image_uris, dtype=object),
            "label_uri": np.array([u or "" for u in label_uris], dtype=object),
            "height": np.zeros(n, dtype=np.int64), "width": np.zeros(n, dtype=np.int64),
            "status": np.array([OK] * n, dtype=object), "error": np.array([""] * n, dtype=object),
            "error_kind": np.array([""] * n, dtype=object)}
    for payload in ("pixels", "label", *(("jpeg",) if gpu_jpeg else ())):
        rows[payload] = np.array([b""] * n, dtype=object)
    return rows


def mark_error(rows: dict[str, np.ndarray], i: int, reason: str, kind: str) -> None:
    """Turn row i of stage columns into an error row: the reason and its kind kept, anything decoded dropped."""
    rows["status"][i], rows["error"][i], rows["error_kind"][i] = ERROR, reason, kind
    for payload in ("pixels", "label", "jpeg"):
        if payload in rows:
            rows[payload][i] = b""


def segmented_rows(decoded: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """Model-stage columns for decode-stage rows: statuses copied, no mask yet, statistics undefined."""
    n = len(decoded["image_uri"])
    return {
        **{key: decoded[key] for key in PASSED_ON},
        **{key: decoded[key].astype(object).copy() for key in STATUS},
        "mask": np.array([None] * n, dtype=object),
        "has_label": np.array([len(label) > 0 for label in decoded["label"]], dtype=bool),
        **{key: np.full(n, np.nan) for key in STATISTICS},
        "class_pixels": np.zeros((n, num_classes), dtype=np.int64),
        "confusion": np.zeros((n, num_classes, num_classes), dtype=np.int64),
    }


def error_rows(image_uris: list[str], label_uris: list[str | None], reasons: list[str], num_classes: int,
               kind: str) -> dict[str, np.ndarray]:
    """Model-stage columns for rows that never reached (or never left) the model, each with its reason."""
    rows = segmented_rows(decoded_rows(image_uris, label_uris), num_classes)
    rows["status"][:] = ERROR
    rows["error"] = np.array(reasons, dtype=object)
    rows["error_kind"][:] = kind
    return rows
