"""Handing images to a labelling tool and taking its labels back.

Out (`write_package`), under one folder, local or object storage:

    manifest.parquet, manifest.csv     the selection: image_uri, rank, score, reasons, predicted class fractions
    cvat/images/NAME.EXT               the images, to create a CVAT task from
    cvat/prelabels.zip                 CVAT's "Segmentation mask 1.1": labelmap.txt, ImageSets/Segmentation/
                                       default.txt, SegmentationClass/NAME.png (the model's masks as colours),
                                       uploaded to the task as annotations: the labeller corrects, not draws
    label-studio/tasks.json            one task per image (data.image is its URI; the selection in data too) with
                                       the masks as brush pre-annotations ("predictions", Label Studio's RLE)
    label-studio/label_config.xml      the labelling interface: BrushLabels with the class names and colours

In (`import_cvat`): a CVAT "Segmentation mask 1.1" export (zip or folder) becomes class-index PNGs, one per
image, which `segmill train --labels` reads. Colours map to classes through the export's labelmap.txt and the
class file; CVAT's `background` (unlabelled) becomes the ignore index. Every mask is checked before the first
is written: an unknown colour or label is one sentence naming the file, and nothing is written.
"""
from __future__ import annotations

import io
import json
import logging
import posixpath
import zipfile
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from segmill.pipeline.common.classes import ClassFile
from segmill.pipeline.common.decode import read_bytes
from segmill.pipeline.common.images import colourise, decode_png, encode_png
from segmill.pipeline.common.storage import join_uri, open_fs, redact
from segmill.pipeline.loop.select import Selection

log = logging.getLogger(__name__)
BACKGROUND = "background"  # CVAT's name for pixels no label covers


# ---- out: manifest and packages

def write_package(selection: Selection, results: str, output: str, classes: ClassFile, *,
                  model_version: str = "", endpoint_url: str | None = None) -> dict[str, str]:
    """Write the manifest and both tools' packages for `selection`; returns what was written where."""
    fs, root = open_fs(output, endpoint_url=endpoint_url)
    fs.makedirs(root, exist_ok=True)
    with fs.open(join_uri(root, "manifest.parquet"), "wb") as f:
        pq.write_table(selection.table, f)
    with fs.open(join_uri(root, "manifest.csv"), "wb") as f:
        pacsv.write_csv(selection.table, f)
    masks = _masks(results, selection.table["image_uri"].to_pylist(), endpoint_url)
    names = unique_names(selection.table["image_uri"].to_pylist())
    _write_cvat(fs, join_uri(root, "cvat"), selection, masks, names, classes, endpoint_url)
    _write_label_studio(fs, join_uri(root, "label-studio"), selection, masks, classes, model_version)
    return {"manifest": join_uri(output, "manifest.parquet"), "cvat": join_uri(output, "cvat"),
            "label_studio": join_uri(output, "label-studio", "tasks.json")}


def unique_names(image_uris: list[str]) -> dict[str, str]:
    """A file name per image for the labelling tool: its own, or with its folder when two share one."""
    names = [posixpath.basename(u) for u in image_uris]
    stems = [posixpath.splitext(n)[0] for n in names]  # a.png and a.jpg would share the mask a.png
    named = {u: n if stems.count(s) == 1 else f"{posixpath.basename(posixpath.dirname(u))}_{n}"
             for u, n, s in zip(image_uris, names, stems)}
    seen: dict[str, int] = {}
    for u in image_uris:  # still the same (two folders of one name): number them
        stem, ext = posixpath.splitext(named[u])
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        if count:
            named[u] = f"{stem}_{count}{ext}"
    return named


def _masks(results: str, image_uris: list[str], endpoint_url: str | None) -> dict[str, np.ndarray]:
    """The stored masks of these images (the model's predictions), from the results table."""
    import pyarrow.dataset as pads

    from segmill.pipeline.bulk.results import committed_parts

    fs, _ = open_fs(results, endpoint_url=endpoint_url)
    # The filter goes into the scan: a million-row table is not read whole for a hundred masks.
    rows = pads.dataset(committed_parts(results, endpoint_url), filesystem=fs, format="parquet").to_table(
        columns=["image_uri", "mask", "status"], filter=pads.field("image_uri").isin(image_uris))
    return {uri: decode_png(mask) for uri, mask, status in zip(*(rows[c].to_pylist() for c in rows.column_names))
            if status == "ok" and mask}


def _write_cvat(fs, root: str, selection: Selection, masks, names, classes: ClassFile, endpoint_url) -> None:
    # CVAT paints unlabelled pixels with `background`'s colour; a class of that name (DSB2018's) is that label.
    # Otherwise background gets a colour no class has (black, unless a class is black).
    labelmap = [f"{n}:{','.join(map(str, c))}::" for n, c in zip(classes.names, classes.palette)]
    if BACKGROUND not in classes.names:
        used = {tuple(c) for c in classes.palette}
        free = next(c for c in ((v, v, v) for v in range(256)) if c not in used)
        labelmap.insert(0, f"{BACKGROUND}:{','.join(map(str, free))}::")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("labelmap.txt", "# label:color_rgb:parts:actions\n" + "\n".join(labelmap) + "\n")
        stems = [posixpath.splitext(names[u])[0] for u in selection.table["image_uri"].to_pylist()]
        archive.writestr("ImageSets/Segmentation/default.txt", "\n".join(stems) + "\n")
        for uri, stem in zip(selection.table["image_uri"].to_pylist(), stems):
            if uri in masks:
                archive.writestr(f"SegmentationClass/{stem}.png", encode_png(colourise(masks[uri], classes.palette)))
    fs.makedirs(join_uri(root, "images"), exist_ok=True)
    with fs.open(join_uri(root, "prelabels.zip"), "wb") as f:
        f.write(buffer.getvalue())
    for uri in selection.table["image_uri"].to_pylist():
        with fs.open(join_uri(root, "images", names[uri]), "wb") as f:
            f.write(read_bytes(uri, endpoint_url))


def _write_label_studio(fs, root: str, selection: Selection, masks, classes: ClassFile, model_version: str) -> None:
    rows = selection.table.select(["image_uri", "rank", "score", "reasons"]).to_pylist()
    tasks = []
    for row in rows:
        task = {"data": {"image": row["image_uri"], "segmill_rank": row["rank"],
                         "segmill_score": round(row["score"], 6), "segmill_reasons": row["reasons"]}}
        mask = masks.get(row["image_uri"])
        if mask is not None:
            height, width = mask.shape
            task["predictions"] = [{"model_version": model_version, "score": round(row["score"], 6), "result": [
                {"from_name": "label", "to_name": "image", "type": "brushlabels", "original_width": width,
                 "original_height": height, "image_rotation": 0,
                 "value": {"format": "rle", "rle": brush_rle(mask == c), "brushlabels": [classes.names[c]]}}
                for c in np.unique(mask).tolist() if c < len(classes.names)]}]
        tasks.append(task)
    fs.makedirs(root, exist_ok=True)
    with fs.open(join_uri(root, "tasks.json"), "w") as f:
        json.dump(tasks, f)
    labels = "\n".join(f"    <Label value={quoteattr(n)} background={quoteattr('#%02x%02x%02x' % tuple(c))}/>"
                       for n, c in zip(classes.names, classes.palette))
    with fs.open(join_uri(root, "label_config.xml"), "w") as f:
        f.write(f'<View>\n  <Image name="image" value="$image" zoom="true"/>\n'
                f'  <BrushLabels name="label" toName="image">\n{labels}\n  </BrushLabels>\n</View>\n')


def brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio's brush RLE of a boolean mask: the mask as RGBA bytes (255 where set, in all four channels),
    packed as thi.ng's rle-pack stream (a 32-bit count, 5-bit word size, four 4-bit run-size classes, then runs:
    a 1 bit, a 2-bit size class, the run length - 1, the 8-bit value), as a list of bytes.

    Written here rather than taken from label-studio-converter, whose `brush` module imports OpenCV for this."""
    values = np.repeat(np.where(mask.ravel(), 255, 0).astype(np.uint8), 4)
    sizes = (3, 4, 8, 16)
    bits: list[str] = [format(len(values), "032b"), format(8 - 1, "05b"), *(format(s - 1, "04b") for s in sizes)]
    change = np.flatnonzero(np.diff(values)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(values)]])
    for start, end, value in zip(starts.tolist(), ends.tolist(), values[starts].tolist()):
        while start < end:
            length = min(end - start, 1 << sizes[-1])
            kind = next(k for k, s in enumerate(sizes) if length - 1 < (1 << s))
            bits.append(f"1{kind:02b}{format(length - 1, f'0{sizes[kind]}b')}{value:08b}")
            start += length
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return [int(stream[i:i + 8], 2) for i in range(0, len(stream), 8)]


def decode_brush_rle(data: list[int]) -> np.ndarray:
    """The RGBA bytes a Label Studio brush RLE holds (what its front end decodes), literal chunks included."""
    stream = "".join(format(b, "08b") for b in data)
    position = 0

    def read(n: int) -> int:
        nonlocal position
        value = int(stream[position:position + n], 2)
        position += n
        return value

    count, word = read(32), read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(count, dtype=np.int64)
    i = 0
    while i < count:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if repeat:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    return out


# ---- in: a CVAT export back to class-index labels

@dataclass(frozen=True)
class Imported:
    labels: int
    output: str
    classes_seen: dict[str, int]  # class -> labelled pixels over every mask


def import_cvat(export: str, classes: ClassFile, output: str, *, endpoint_url: str | None = None) -> Imported:
    """CVAT "Segmentation mask 1.1" (a .zip or its unpacked folder) -> OUTPUT/NAME.png class indices."""
    files = _export_files(export, endpoint_url)
    if "labelmap.txt" not in files:
        raise ValueError(f"CVAT export {redact(export)} has no labelmap.txt; export it as 'Segmentation mask 1.1'.")
    colours = _labelmap(files["labelmap.txt"](), export, classes)
    masks = sorted(name for name in files if name.startswith("SegmentationClass/") and name.endswith(".png"))
    if not masks:
        raise ValueError(f"CVAT export {redact(export)} holds no SegmentationClass/*.png masks.")
    keys = np.array(sorted(colours), dtype=np.int64)
    values = np.array([colours[k] for k in keys.tolist()], dtype=np.int64)
    converted: dict[str, np.ndarray] = {}
    seen = np.zeros(len(classes.names), dtype=np.int64)
    for name in masks:  # everything is checked before anything is written
        picture = decode_png(files[name]())
        rgb = picture[..., :3] if picture.ndim == 3 else np.repeat(picture[..., None], 3, axis=2)
        packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        position = np.clip(np.searchsorted(keys, packed), 0, len(keys) - 1)
        unknown = keys[position] != packed
        if unknown.any():
            colour = tuple(int(v) for v in rgb[unknown][0])
            raise ValueError(f"CVAT mask {name} of {redact(export)} has colour {colour}, which labelmap.txt does not "
                             "name; nothing was imported.")
        index = values[position]
        labelled = index[index != classes.ignore_index]
        seen += np.bincount(labelled, minlength=len(classes.names))[: len(classes.names)]
        converted[posixpath.basename(name)] = index.astype(np.uint8 if classes.ignore_index <= 255 else np.uint16)
    fs, root = open_fs(output, endpoint_url=endpoint_url)
    fs.makedirs(root, exist_ok=True)
    for name, index in converted.items():
        with fs.open(join_uri(root, name), "wb") as f:
            f.write(encode_png(index))
    log.info("imported %d labels from %s into %s", len(converted), redact(export), redact(output))
    return Imported(len(converted), output, {c: int(v) for c, v in zip(classes.names, seen)})


def _labelmap(text: bytes, export: str, classes: ClassFile) -> dict[int, int]:
    """Packed RGB -> class index (the ignore index for `background`), checked against the class file."""
    mapping: dict[int, int] = {}
    for line in text.decode("utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, rest = line.partition(":")
        colour = rest.split(":", 1)[0]
        try:
            r, g, b = (int(v) for v in colour.split(","))
        except ValueError:
            raise ValueError(f"CVAT labelmap.txt of {redact(export)} has a line without an R,G,B colour: {line!r}.") from None
        if name in classes.names:
            index = classes.names.index(name)
        elif name == BACKGROUND:
            index = classes.ignore_index
        else:
            raise ValueError(f"CVAT label {name!r} of {redact(export)} is not a class of the class file "
                             f"({', '.join(classes.names)}); nothing was imported.")
        key = (r << 16) | (g << 8) | b
        if mapping.get(key, index) != index:
            raise ValueError(f"CVAT labelmap.txt of {redact(export)} gives colour {(r, g, b)} to two labels; give "
                             "each label its own colour; nothing was imported.")
        mapping[key] = index
    if not mapping:
        raise ValueError(f"CVAT labelmap.txt of {redact(export)} names no label; nothing was imported.")
    # CVAT paints pixels no label covers black when its label map has no `background` line (a hand-edited map, or
    # a task created without one): black is then unlabelled, unless a label has it.
    mapping.setdefault(0, classes.ignore_index)
    return mapping


def _export_files(export: str, endpoint_url: str | None):
    """name -> reader of the export's files, relative to its root (a zip, or a folder)."""
    fs, root = open_fs(export, endpoint_url=endpoint_url)
    if not fs.exists(root):
        raise ValueError(f"CVAT export {redact(export)} does not exist.")
    if fs.isfile(root):
        with fs.open(root, "rb") as f:
            data = f.read()
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile:
            raise ValueError(f"CVAT export {redact(export)} is neither a zip file nor a folder.") from None
        return {name: (lambda name=name: archive.read(name)) for name in archive.namelist() if not name.endswith("/")}
    found = {}
    for path in fs.find(root):
        relative = posixpath.relpath(path, root.rstrip("/"))
        found[relative] = lambda path=path: fs.cat_file(path)
    return found
