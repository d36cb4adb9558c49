"""Class files: the names (and colours) of a label set's classes, as YAML beside the labels. Torch-free.

    classes:
      - {name: sky, colour: [70, 130, 180]}
      - road                      # a bare name gets a default colour
    ignore_index: 255             # optional; label pixels with this value count for nothing
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass

import yaml

from segmill.models.spec import DEFAULT_IGNORE_INDEX, default_palette
from segmill.pipeline.common.storage import join_uri, open_fs, redact, with_protocol

CLASS_FILE = "classes.yaml"


@dataclass(frozen=True)
class ClassFile:
    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = DEFAULT_IGNORE_INDEX


def load_class_file(uri: str, *, endpoint_url: str | None = None) -> ClassFile:
    """Read and check a class file; every problem is one sentence naming the file."""
    where = redact(uri)
    try:
        fs, path = open_fs(uri, endpoint_url=endpoint_url)
        with fs.open(path, "r") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"Class file {where} does not exist.") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"Class file {where} is not valid YAML ({exc.__class__.__name__}).") from None
    entries = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"Class file {where} must hold a non-empty list under 'classes'.")
    names, colours = [], []
    for i, entry in enumerate(entries):
        name, colour = (entry.get("name"), entry.get("colour", entry.get("color"))) if isinstance(entry, dict) else (entry, None)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"Class file {where} entry {i} needs a name made of letters, digits and _, not {name!r}.")
        if colour is not None and (not isinstance(colour, list) or len(colour) != 3
                                   or not all(isinstance(c, int) and 0 <= c <= 255 for c in colour)):
            raise ValueError(f"Class file {where} colour of {name!r} must be three integers 0-255, not {colour!r}.")
        names.append(name)
        colours.append(tuple(colour) if colour is not None else None)
    if len(set(names)) != len(names):
        raise ValueError(f"Class file {where} names a class twice.")
    ignore_index = data.get("ignore_index", DEFAULT_IGNORE_INDEX)
    if not isinstance(ignore_index, int) or not 0 <= ignore_index <= 65535 or ignore_index < len(names):
        raise ValueError(f"Class file {where} ignore_index {ignore_index!r} must be an integer at or above the class count.")
    defaults = default_palette(len(names))
    palette = tuple(c if c is not None else defaults[i] for i, c in enumerate(colours))
    return ClassFile(tuple(names), palette, ignore_index)


def find_class_file(labels: str, *, endpoint_url: str | None = None) -> ClassFile | None:
    """The class file of a label set: `classes.yaml` in the label folder or beside it (None when there is none)."""
    fs, root = open_fs(labels, endpoint_url=endpoint_url)
    for path in (join_uri(root, CLASS_FILE), join_uri(posixpath.dirname(root.rstrip("/")), CLASS_FILE)):
        if fs.isfile(path):
            return load_class_file(with_protocol(fs, path), endpoint_url=endpoint_url)
    return None
