"""Find the images of a job: a URI prefix listed recursively, or a manifest; pair labels by relative path and stem.

Listing is streamed a directory (or a manifest batch) at a time, so memory follows the largest directory,
not the whole image set.
"""
from __future__ import annotations

import posixpath
from collections import Counter
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image

from segmill.pipeline.common.storage import open_fs, redact, with_protocol

# Formats Pillow identifies but cannot decode itself (stubs for external handlers, video, Windows metafiles).
_UNDECODABLE_FORMATS = frozenset({"BUFR", "GRIB", "HDF5", "MPEG", "WMF"})


def _image_extensions() -> frozenset[str]:
    """Every file extension of a format Pillow opens (GIF and APNG: their first frame), lower case."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and fmt not in _UNDECODABLE_FORMATS)


IMAGE_EXTENSIONS = _image_extensions()
MANIFEST_EXTENSIONS = (".parquet", ".csv")
LISTING_SCHEMA = pa.schema([("image_uri", pa.string()), ("label_uri", pa.string())])


class Skipped(Counter):
    """Files a prefix listing left out, by extension (`"(none)"` for names without one)."""

    def describe(self) -> str:
        return ", ".join(f"{count} {ext}" for ext, count in self.most_common())


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_EXTENSIONS)


def iter_image_batches(
    input_uri: str, labels_uri: str | None = None, *, endpoint_url: str | None = None, batch_rows: int = 10_000,
    skipped: Skipped | None = None, exclude: str | None = None,
) -> Iterator[pa.Table]:
    """Yield tables of (image_uri, label_uri) for every image of the job, in a stable order.

    Files of a prefix that are not images are counted in `skipped`; `exclude` is a prefix of the input that is
    not listed at all (the job's own output, when it lies inside the input).
    """
    if is_manifest(input_uri):
        yield from _manifest_batches(input_uri, endpoint_url, batch_rows)
        return
    rows: list[tuple[str, str | None]] = []
    for image_uri, label_uri in _prefix_pairs(input_uri, labels_uri, endpoint_url, skipped, exclude):
        rows.append((image_uri, label_uri))
        if len(rows) >= batch_rows:
            yield _table(rows)
            rows = []
    if rows:
        yield _table(rows)


def _table(rows: list[tuple[str, str | None]]) -> pa.Table:
    images, labels = zip(*rows)
    return pa.table({"image_uri": list(images), "label_uri": list(labels)}, schema=LISTING_SCHEMA)


def _prefix_pairs(input_uri: str, labels_uri: str | None, endpoint_url: str | None, skipped: Skipped | None,
                  exclude: str | None) -> Iterator[tuple[str, str | None]]:
    fs, root = open_fs(input_uri, endpoint_url=endpoint_url)
    if not fs.exists(root):
        raise ValueError(f"Input {redact(input_uri)} does not exist.")
    if fs.isfile(root):
        yield with_protocol(fs, root), None
        return
    excluded = open_fs(exclude, endpoint_url=endpoint_url)[1].rstrip("/") + "/" if exclude else None
    label_fs, label_root = open_fs(labels_uri, endpoint_url=endpoint_url) if labels_uri else (None, None)
    for directory, _, files in fs.walk(root):
        if excluded and (directory.rstrip("/") + "/").startswith(excluded):
            continue
        images = sorted(f for f in files if posixpath.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
        if skipped is not None:
            skipped.update(posixpath.splitext(f)[1].lower() or "(none)" for f in files
                           if posixpath.splitext(f)[1].lower() not in IMAGE_EXTENSIONS)
        if not images:
            continue
        relative = posixpath.relpath(directory, root.rstrip("/")) if directory.rstrip("/") != root.rstrip("/") else ""
        label_stems = _label_stems(label_fs, posixpath.join(label_root, relative)) if label_fs else {}
        for name in images:
            label = label_stems.get(posixpath.splitext(name)[0])
            yield with_protocol(fs, posixpath.join(directory, name)), with_protocol(label_fs, label) if label else None
        # fsspec caches every listed directory; dropping each after use keeps listing memory flat.
        fs.invalidate_cache(directory)
        if label_fs:
            label_fs.invalidate_cache(posixpath.join(label_root, relative))


def _label_stems(fs, directory: str) -> dict[str, str]:
    """Label files of one directory by stem; png is preferred when several extensions share a stem."""
    if not fs.isdir(directory):
        return {}
    stems: dict[str, str] = {}
    for path in sorted(fs.ls(directory, detail=False), key=lambda p: not p.lower().endswith(".png")):
        stem, ext = posixpath.splitext(posixpath.basename(path))
        if ext.lower() in IMAGE_EXTENSIONS:
            stems.setdefault(stem, path)
    return stems


def _manifest_batches(uri: str, endpoint_url: str | None, batch_rows: int) -> Iterator[pa.Table]:
    fs, path = open_fs(uri, endpoint_url=endpoint_url)
    if not fs.exists(path):
        raise ValueError(f"Manifest {redact(uri)} does not exist.")
    with fs.open(path, "rb") as f:
        if uri.lower().endswith(".parquet"):
            batches = pq.ParquetFile(f).iter_batches(batch_size=batch_rows)
        else:
            batches = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 22))
        for batch in batches:
            table = pa.Table.from_batches([batch])
            if "image_uri" not in table.column_names:
                raise ValueError(f"Manifest {redact(uri)} has no 'image_uri' column (columns: {table.column_names}).")
            labels = table["label_uri"] if "label_uri" in table.column_names else pa.nulls(len(table), pa.string())
            for name, column in (("image_uri", table["image_uri"]), ("label_uri", labels)):
                kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
                if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
                    raise ValueError(f"Manifest {redact(uri)} column {name!r} must hold URIs as text, not {kind}.")
            yield pa.table({"image_uri": _blank_as_null(table["image_uri"]), "label_uri": _blank_as_null(labels)})


def _blank_as_null(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """CSV cells left empty mean 'no value', not a URI of ''."""
    values = pc.cast(column, pa.string())
    return pc.if_else(pc.equal(pc.utf8_trim_whitespace(values), ""), pa.scalar(None, pa.string()), values)
