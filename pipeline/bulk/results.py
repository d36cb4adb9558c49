"""The results table: one row per input image, written as committed Parquet files under OUTPUT.

A part file becomes visible only once complete (written aside then renamed, or one atomic object PUT), and its
name is a hash of the image URIs it holds, so a retried write replaces itself instead of duplicating rows.
Readers see `OUTPUT/part-*.parquet`; `_`-prefixed entries (staging, job record) are ignored by Parquet readers.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from segmill.models.iou import iou_from_counts, nanmean
from segmill.pipeline.bulk.rows import ERROR, OK
from segmill.pipeline.common.decode import INFRASTRUCTURE
from segmill.pipeline.common.storage import join_uri, open_fs, protocol_of, redact

PART_PREFIX = "part-"
# Columns renamed since tables were first written (`union` is an SQL keyword): new name -> old name. Readers
# (committed_rows, the DuckDB view) take either, so old tables and tables resumed across the rename still read.
RENAMED = {"intersection_pixels": "intersection", "union_pixels": "union"}
STAGING = "_staging"


def mask_dtype(num_classes: int) -> type:
    """uint8 masks up to 256 classes, 16-bit PNG beyond."""
    return np.uint8 if num_classes <= 256 else np.uint16


def results_schema(classes: tuple[str, ...]) -> pa.Schema:
    def per_class(kind: pa.DataType) -> pa.DataType:
        return pa.struct([(name, kind) for name in classes])

    return pa.schema([
        ("job_id", pa.string()), ("image_uri", pa.string()), ("label_uri", pa.string()),
        ("status", pa.string()), ("error", pa.string()), ("error_kind", pa.string()),
        ("height", pa.int32()), ("width", pa.int32()),
        ("mask", pa.binary()),
        ("class_fraction", per_class(pa.float32())), ("class_pixels", per_class(pa.int64())),
        ("confidence_mean", pa.float32()), ("entropy_mean", pa.float32()), ("low_confidence_fraction", pa.float32()),
        ("pixel_accuracy", pa.float64()), ("miou", pa.float64()), ("iou", per_class(pa.float64())),
        ("intersection_pixels", per_class(pa.int64())), ("union_pixels", per_class(pa.int64())),
        ("labelled_pixels", pa.int64()), ("correct_pixels", pa.int64()),
        ("model_name", pa.string()), ("model_version", pa.string()), ("processed_at", pa.timestamp("ms", tz="UTC")),
    ])


def build_table(batch: dict[str, np.ndarray], classes: tuple[str, ...], *, job_id: str, model_name: str,
                model_version: str) -> pa.Table:
    """Turn model-stage rows (rows.SEGMENTED, masks already PNG) into result rows: per-class structs, metrics."""
    n, k = len(batch["image_uri"]), len(classes)
    ok = batch["status"] == OK
    pixels = batch["class_pixels"].astype(np.int64)
    area = np.maximum(pixels.sum(1, keepdims=True), 1)
    confusion = batch["confusion"].astype(np.int64)
    inter = np.diagonal(confusion, axis1=1, axis2=2)
    union = confusion.sum(1) + confusion.sum(2) - inter
    labelled = ok & batch["has_label"]
    iou = iou_from_counts(inter, union)  # NaN where a class is absent from the image and its prediction
    miou = nanmean(iou, axis=1)
    labelled_pixels, correct = confusion.sum((1, 2)), inter.sum(1)

    def per_class(values: np.ndarray, valid: np.ndarray, kind: pa.DataType) -> pa.StructArray:
        fields = [pa.array(values[:, c], type=kind, mask=~valid | _nan(values[:, c])) for c in range(k)]
        return pa.StructArray.from_arrays(fields, names=list(classes), mask=pa.array(~valid))

    def scalar(values: np.ndarray, valid: np.ndarray, kind: pa.DataType) -> pa.Array:
        return pa.array(values, type=kind, mask=~valid | _nan(values))

    masks = [batch["mask"][i] if ok[i] else None for i in range(n)]
    now = datetime.now(timezone.utc)
    columns = {
        "job_id": pa.array([job_id] * n), "image_uri": pa.array([redact(u) for u in batch["image_uri"].tolist()], pa.string()),
        "label_uri": _optional_strings(batch["label_uri"]),
        "status": pa.array(batch["status"].tolist(), pa.string()), "error": _optional_strings(batch["error"]),
        "error_kind": _optional_strings(batch["error_kind"]),
        "height": scalar(batch["height"].astype(np.int32), ok | (batch["height"] > 0), pa.int32()),
        "width": scalar(batch["width"].astype(np.int32), ok | (batch["width"] > 0), pa.int32()),
        "mask": pa.array(masks, pa.binary()),
        "class_fraction": per_class((pixels / area).astype(np.float32), ok, pa.float32()),
        "class_pixels": per_class(pixels, ok, pa.int64()),
        "confidence_mean": scalar(batch["confidence_mean"], ok, pa.float32()),
        "entropy_mean": scalar(batch["entropy_mean"], ok, pa.float32()),
        "low_confidence_fraction": scalar(batch["low_confidence_fraction"], ok, pa.float32()),
        "pixel_accuracy": scalar(correct / np.maximum(labelled_pixels, 1), labelled & (labelled_pixels > 0), pa.float64()),
        "miou": scalar(miou, labelled, pa.float64()), "iou": per_class(iou, labelled, pa.float64()),
        "intersection_pixels": per_class(inter, labelled, pa.int64()),
        "union_pixels": per_class(union, labelled, pa.int64()),
        "labelled_pixels": scalar(labelled_pixels, labelled, pa.int64()), "correct_pixels": scalar(correct, labelled, pa.int64()),
        "model_name": pa.array([model_name] * n), "model_version": pa.array([model_version] * n),
        "processed_at": pa.array([now] * n, pa.timestamp("ms", tz="UTC")),
    }
    return pa.Table.from_pydict(columns, schema=results_schema(classes))


def _optional_strings(values: np.ndarray) -> pa.Array:
    """Empty strings stood for null between stages (Ray turns None into NaN); null again here, and redacted."""
    return pa.array([redact(v) if isinstance(v, str) and v else None for v in values.tolist()], pa.string())


def _nan(values: np.ndarray) -> np.ndarray:
    return np.isnan(values) if np.issubdtype(values.dtype, np.floating) else np.zeros(len(values), dtype=bool)


def part_name(image_uris: list[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(image_uris)).encode()).hexdigest()[:20]
    return f"{PART_PREFIX}{digest}.parquet"


def commit_table(table: pa.Table, output: str, job_id: str, *, endpoint_url: str | None, row_group_rows: int) -> str:
    """Write `table` as one part file that appears whole or not at all; returns its URI."""
    fs, root = open_fs(output, endpoint_url=endpoint_url)
    name = part_name(table["image_uri"].to_pylist())
    final = join_uri(root, name)
    if protocol_of(output) == "file":  # a local rename is atomic; an object store PUT already is
        staged = join_uri(root, STAGING, job_id, "tmp", name)
        fs.makedirs(join_uri(root, STAGING, job_id, "tmp"), exist_ok=True)
        _write(fs, staged, table, row_group_rows)
        fs.mv(staged, final)
    else:
        _write(fs, final, table, row_group_rows)
    return join_uri(output, name)


def _write(fs, path: str, table: pa.Table, row_group_rows: int) -> None:
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_rows, compression="zstd", use_dictionary=["job_id", "status",
                       "model_name", "model_version"], write_statistics=["image_uri", "status", "job_id"])


def committed_parts(output: str, endpoint_url: str | None) -> list[str]:
    fs, root = open_fs(output, endpoint_url=endpoint_url)
    fs.invalidate_cache(root)  # parts are written by other processes (Ray workers, an earlier killed run)
    if not fs.isdir(root):
        return []
    return sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith(PART_PREFIX))


def committed_rows(output: str, endpoint_url: str | None, columns: list[str]) -> pa.Table:
    """Selected columns of every committed row (the mask column is never read for this)."""
    fs, _ = open_fs(output, endpoint_url=endpoint_url)
    parts = committed_parts(output, endpoint_url)
    if not parts:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    dataset = pads.dataset(parts, filesystem=fs, format="parquet")
    if all(c in dataset.schema.names or c not in RENAMED for c in columns):
        return dataset.to_table(columns=columns)
    # An old (or half-old) table: read every part's schema, and take each renamed column from whichever name a
    # part has.
    schema = pa.unify_schemas([fragment.physical_schema for fragment in dataset.get_fragments()])
    dataset = pads.dataset(parts, filesystem=fs, format="parquet", schema=schema)
    projection = {}
    for c in columns:
        present = [name for name in (c, RENAMED.get(c)) if name and name in schema.names]
        projection[c] = pc.coalesce(*(pc.field(n) for n in present)) if len(present) > 1 else pc.field(present[0])
    return dataset.to_table(columns=projection)


def uncommit_errors(output: str, job_id: str, *, everything: bool, endpoint_url: str | None,
                    row_group_rows: int) -> int:
    """Take the error rows a re-run should try again out of the committed table: those of kind infrastructure, or
    with `everything` every error row; returns how many. Each part holding one is deleted and its other rows
    committed again as a new part: if the run stops in between, those rows are simply segmented again, never
    lost nor doubled. Only the status columns of a part are read unless it holds such a row."""
    fs, _ = open_fs(output, endpoint_url=endpoint_url)
    retried = 0
    for part in committed_parts(output, endpoint_url):
        with fs.open(part, "rb") as f:
            names = pq.read_schema(f).names
            if "error_kind" not in names and not everything:
                continue  # a table from before error kinds: only a retry of every error takes its rows
            status = pq.read_table(f, columns=[c for c in ("status", "error_kind") if c in names])
            drop = pc.fill_null(_retried(status, everything), False)
            count = pc.sum(drop).as_py() or 0
            if not count:
                continue
            kept = pq.read_table(f).filter(pc.invert(drop))
        fs.rm(part)
        if kept.num_rows:
            if "error_kind" not in kept.column_names:
                kept = kept.add_column(kept.column_names.index("error") + 1, "error_kind",
                                       pa.nulls(kept.num_rows, pa.string()))
            commit_table(kept.cast(results_schema_of(kept)), output, job_id, endpoint_url=endpoint_url,
                         row_group_rows=row_group_rows)
        retried += count
    return retried


def _retried(status: pa.Table, everything: bool) -> pa.ChunkedArray:
    errors = pc.equal(status["status"], ERROR)
    return errors if everything else pc.and_(errors, pc.equal(status["error_kind"], INFRASTRUCTURE))


def results_schema_of(table: pa.Table) -> pa.Schema:
    """The results schema for the classes a table's per-class structs name."""
    return results_schema(tuple(f.name for f in table.schema.field("class_fraction").type))


def uri_keys(uris: np.ndarray) -> np.ndarray:
    """64-bit keys of URIs: a million committed images take 8 MB to check against, not a set of strings."""
    return np.array([int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little") for u in uris],
                    dtype=np.uint64)


def committed_keys(output: str, endpoint_url: str | None) -> np.ndarray:
    """Sorted keys of the image URIs already committed under OUTPUT (for resume and recovery)."""
    return np.sort(uri_keys(committed_rows(output, endpoint_url, ["image_uri"])["image_uri"].to_pylist()))


def is_committed(done_keys: np.ndarray, image_uris: list[str]) -> np.ndarray:
    """Which of `image_uris` (as listed, before redaction) have a committed row, given `committed_keys`."""
    keys = uri_keys([redact(u) for u in image_uris])
    if not len(done_keys):
        return np.zeros(len(keys), dtype=bool)
    return done_keys[np.minimum(np.searchsorted(done_keys, keys), len(done_keys) - 1)] == keys


def dataset_iou(results_uri: str, classes: Sequence[str], *, endpoint_url: str | None = None) -> dict[str, float]:
    """Per-class IoU over a results table: intersections and unions summed over rows (never averaged); NaN for a
    class never labelled nor predicted. The `iou` ready answer (`segmill query --answer iou`) is the same in SQL."""
    table = committed_rows(results_uri, endpoint_url, ["intersection_pixels", "union_pixels"])
    if table.num_rows == 0 or not pa.types.is_struct(table.schema.field("union_pixels").type):
        raise ValueError(f"{redact(results_uri)} holds no results rows; run a bulk job with labels there first.")
    names = {f.name for f in table.schema.field("union_pixels").type}
    missing = [c for c in classes if c not in names]
    if missing:
        raise ValueError(f"The results at {redact(results_uri)} have no counts for classes {missing}; "
                         "check the class file matches the model that made them.")
    if table["union_pixels"].null_count == table.num_rows:
        raise ValueError(f"{redact(results_uri)} has no labelled rows; run the bulk job with --labels.")

    def summed(column: str) -> np.ndarray:  # struct_field honours null parents (unlabelled or failed rows)
        return np.array([pc.sum(pc.struct_field(table[column], c)).as_py() or 0 for c in classes], dtype=np.int64)

    return dict(zip(classes, iou_from_counts(summed("intersection_pixels"), summed("union_pixels")).tolist()))


def table_classes(results_uri: str, *, endpoint_url: str | None = None) -> tuple[str, ...]:
    """The class names of a results table (the fields of its per-class structs)."""
    parts = committed_parts(results_uri, endpoint_url)
    if not parts:
        return ()
    fs, _ = open_fs(results_uri, endpoint_url=endpoint_url)
    with fs.open(parts[0], "rb") as f:
        return tuple(field.name for field in pq.read_schema(f).field("class_fraction").type)
