"""The class index of a labelled set and the choice of its hard classes (the ones the model is worst at).

Two parts, independent of Ray Train (what training then does with them is in sampling.py):

- `class_presence_index`: which classes each label holds (and how many pixels of each), cached as one small
  Parquet file and refreshed per label when the label file changes (size + mtime/ETag, read from listings).
- `hard_classes_from_iou` / `hard_classes_from_results`: the lowest-IoU classes, from an IoU dict or from the
  summed counts of a bulk job's results table.

Bad labels are rows too, as in the results table: `status="error"` with a one-sentence `error`, empty
`present`/`pixels`; they are kept in the index (and the cache, so they are not re-read) and left out of epochs.
"""
from __future__ import annotations

import logging
import math
import posixpath
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from segmill.models.spec import DEFAULT_IGNORE_INDEX
from segmill.pipeline.bulk.results import dataset_iou
from segmill.pipeline.bulk.rows import ERROR, OK
from segmill.pipeline.common.decode import DecodeError, label_class_pixels, read_bytes
from segmill.pipeline.common.storage import join_uri, open_fs, protocol_of, redact

log = logging.getLogger(__name__)
PRESENCE_INDEX_NAME = "_class_presence.parquet"  # `_`: ignored by label listings and Parquet readers
_FINGERPRINT_KEYS = ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "mtime_ns")

INDEX_SCHEMA = pa.schema([
    ("image_uri", pa.string()), ("label_uri", pa.string()), ("label_fingerprint", pa.string()),
    ("status", pa.string()), ("error", pa.string()),
    ("present", pa.list_(pa.int16())), ("pixels", pa.list_(pa.int64())),
])


def default_index_uri(labels_uri: str) -> str:
    """Where the presence index of the labels under `labels_uri` is cached: beside them."""
    return join_uri(labels_uri, PRESENCE_INDEX_NAME)


def class_presence_index(pairs: Sequence[tuple[str, str]], num_classes: int, *, cache_uri: str,
                         endpoint_url: str | None = None, ignore_index: int = DEFAULT_IGNORE_INDEX,
                         workers: int = 16) -> pa.Table:
    """Per labelled pair: fingerprint, status/error, class ids present, pixel count per class (INDEX_SCHEMA).

    Rows follow `pairs`. Only labels that are new or whose fingerprint changed are read; the cache is rewritten
    (dropping removed labels) when anything differs from it. `num_classes`/`ignore_index` changes void it.
    """
    fingerprints = _fingerprints([label for _, label in pairs], endpoint_url)
    cached = _read_cache(cache_uri, endpoint_url, num_classes, ignore_index)
    todo = [label for _, label in pairs
            if fingerprints[label] is not None and cached.get(label, (None,))[0] != fingerprints[label]]
    with ThreadPoolExecutor(max(1, min(workers, len(todo)))) as pool:
        fresh = dict(zip(todo, pool.map(lambda uri: _label_row(uri, num_classes, ignore_index, endpoint_url), todo)))
    rows = []
    for image_uri, label_uri in pairs:
        fp = fingerprints[label_uri]
        if fp is None:
            entry = (ERROR, f"Label {redact(label_uri)} was not found.", [], [])
        else:
            entry = fresh[label_uri] if label_uri in fresh else cached[label_uri][1]
        rows.append((image_uri, label_uri, fp) + entry)
    table = pa.Table.from_pylist([dict(zip(INDEX_SCHEMA.names, row)) for row in rows], schema=INDEX_SCHEMA)
    if fresh or set(cached) != {label for _, label in pairs if fingerprints[label] is not None}:
        _write_cache(table.filter(pc.is_valid(table["label_fingerprint"])), cache_uri, endpoint_url,
                     num_classes, ignore_index)
    return table


def _fingerprints(label_uris: Sequence[str], endpoint_url: str | None) -> dict[str, str | None]:
    """size + change marker of each label (None: not found), from one listing per folder, not one HEAD per file."""
    by_folder: dict[str, list[str]] = {}
    for uri in dict.fromkeys(label_uris):
        by_folder.setdefault(uri.rsplit("/", 1)[0] if "/" in uri else ".", []).append(uri)
    out: dict[str, str | None] = {}
    for folder, uris in by_folder.items():
        fs, path = open_fs(folder, endpoint_url=endpoint_url)
        fs.invalidate_cache(path)  # object-store listings are cached per process; labels may have changed
        try:
            listing = {posixpath.basename(i["name"].rstrip("/")): i for i in fs.ls(path, detail=True)}
        except (FileNotFoundError, NotADirectoryError):
            listing = {}
        for uri in uris:
            info = listing.get(posixpath.basename(uri))
            if info is None:
                try:
                    info = fs.info(open_fs(uri, endpoint_url=endpoint_url)[1])
                except FileNotFoundError:
                    info = None
            out[uri] = _fingerprint(info) if info is not None and info.get("type") != "directory" else None
    return out


def _fingerprint(info: dict) -> str:
    marker = next((info[k] for k in _FINGERPRINT_KEYS if info.get(k) is not None), "")
    return f"{info.get('size')}:{marker}"


def _label_row(uri: str, num_classes: int, ignore_index: int,
               endpoint_url: str | None) -> tuple[str, str | None, list[int], list[int]]:
    """(status, error, present, pixels) of one label; any reason it cannot be used becomes the error."""
    try:
        pixels = label_class_pixels(read_bytes(uri, endpoint_url), uri, num_classes, ignore_index)
    except DecodeError as exc:
        return ERROR, str(exc), [], []
    return OK, None, np.flatnonzero(pixels).tolist(), pixels.tolist()


def _read_cache(cache_uri: str, endpoint_url: str | None, num_classes: int,
                ignore_index: int) -> dict[str, tuple[str, tuple]]:
    """label_uri -> (fingerprint, row entry); empty when missing, unreadable or made for other classes."""
    fs, path = open_fs(cache_uri, endpoint_url=endpoint_url)
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except Exception:  # missing or corrupt: rebuild it (the cache is never the only copy of anything)
        return {}
    meta = table.schema.metadata or {}
    if meta.get(b"num_classes") != str(num_classes).encode() or meta.get(b"ignore_index") != str(ignore_index).encode():
        return {}
    return {r["label_uri"]: (r["label_fingerprint"], (r["status"], r["error"], r["present"], r["pixels"]))
            for r in table.to_pylist()}


def _write_cache(table: pa.Table, cache_uri: str, endpoint_url: str | None, num_classes: int,
                 ignore_index: int) -> None:
    fs, path = open_fs(cache_uri, endpoint_url=endpoint_url)
    table = table.replace_schema_metadata({"num_classes": str(num_classes), "ignore_index": str(ignore_index)})
    fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    target = f"{path}.{uuid.uuid4().hex}.tmp" if protocol_of(cache_uri) == "file" else path
    with fs.open(target, "wb") as f:  # a local rename is atomic; an object-store PUT already is
        pq.write_table(table, f, compression="zstd")
    if target != path:
        fs.mv(target, path)


def hard_classes_from_iou(per_class_iou: dict[str, float | None], k: int | None = 2, *,
                          threshold: float | None = None, tie_break: dict[str, float] | None = None) -> list[str]:
    """The `k` lowest-IoU classes, lowest first; undefined (None/NaN) are skipped.

    Classes of equal IoU are ordered by `tie_break` (lowest first; segmill passes each class's share of the
    training pixels, so the rarest of a tie is taken), else by the dict's order; a tie cut by `k` is logged.
    With `threshold`, only classes below it, and at most `k` of them (`k=None`: all below it).
    """
    if k is None and threshold is None:
        raise ValueError("Give k, threshold or both to choose hard classes.")
    if k is not None and k < 0:
        raise ValueError(f"k must be 0 or more, got {k}.")
    order = {name: i for i, name in enumerate(per_class_iou)}
    defined = [(name, float(v)) for name, v in per_class_iou.items() if v is not None and not math.isnan(float(v))]
    ranked = sorted(defined, key=lambda item: (item[1], (tie_break or {}).get(item[0], 0.0), order[item[0]]))
    if threshold is not None:
        ranked = [item for item in ranked if item[1] < threshold]
    chosen = [name for name, _ in ranked[:k]]
    if k is not None and 0 < k < len(ranked) and ranked[k - 1][1] == ranked[k][1]:
        tied = [name for name, value in ranked if value == ranked[k - 1][1]]
        log.warning("hard classes: %s tie at IoU %.4f; took %s (%s)", ", ".join(tied), ranked[k - 1][1],
                    ", ".join(name for name in chosen if name in tied),
                    "the rarest in training pixels" if tie_break else "the first in the class file")
    return chosen


def hard_classes_from_results(results_uri: str, classes: Sequence[str], k: int | None = 2, *,
                              threshold: float | None = None, endpoint_url: str | None = None,
                              tie_break: dict[str, float] | None = None) -> list[str]:
    """The lowest-IoU classes of a bulk job's results table made with labels (see `hard_classes_from_iou`)."""
    iou = dataset_iou(results_uri, classes, endpoint_url=endpoint_url)
    return hard_classes_from_iou(iou, k, threshold=threshold, tie_break=tie_break)
