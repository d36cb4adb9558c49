"""Resolve a job's MODEL into checkpoint bytes plus the name and version recorded in every output row.

Accepted forms:
- a checkpoint file, local or on any fsspec URI (`ckpt/roads.pt`, `s3://bucket/roads.pt`);
- an MLflow registry URI, `models:/NAME@ALIAS` or `models:/NAME/VERSION` (an MLflow model holding
  `checkpoint/model.pt` among its artifacts);
- a registry architecture with a torchvision weights tag, `ARCH:TAG` (e.g.
  `lraspp_mobilenet_v3_large:COCO_WITH_VOC_LABELS_V1`), which torchvision downloads once (needs network).
The driver resolves the model once, before any compute, and ships the bytes to the actors. The bulk job's
driver does it in a child process (`ModelCheck`): it then never loads torch, and reads what the output already
holds while the child loads the model.
"""
from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

from segmill.models.spec import ModelSpec
from segmill.pipeline.common import settings
from segmill.pipeline.common.storage import open_fs, redact

MLFLOW_CHECKPOINT_ARTIFACT = "checkpoint/model.pt"
_TORCHVISION_TAG = re.compile(r"^[a-z0-9_]+:[A-Z0-9_]+$")  # ARCH:TAG, e.g. fcn_resnet50:COCO_WITH_VOC_LABELS_V1
_MLFLOW_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    version: str
    checkpoint: bytes
    spec: ModelSpec


def resolve_model(model: str, *, endpoint_url: str | None = None, tracking_uri: str | None = None) -> ResolvedModel:
    """Load the model once to prove it works; raise one clear ValueError when it cannot be used."""
    from segmill.models.checkpoint import load_checkpoint
    from segmill.models.registry import list_models

    if model.startswith("models:/"):
        resolved = _from_mlflow(model, tracking_uri)
    elif ":" in model and model.split(":", 1)[0] in list_models():
        resolved = _from_torchvision_tag(*model.split(":", 1))
    elif model in list_models():
        raise ValueError(
            f"Model {model!r} names an architecture without weights; pass a checkpoint, a models:/ URI, or {model}:TAG."
        )
    else:
        resolved = _from_checkpoint_file(model, endpoint_url)
    try:
        load_checkpoint(resolved.checkpoint)
    except Exception as exc:
        raise ValueError(f"Model {redact(model)} does not load: {exc}") from exc
    return resolved


# Models this process has already proved to load, by a key that names their bytes exactly (`_immutable_key`): a
# process that runs many small jobs (the improve loop, a notebook, `segmill schedule`) checks each model once.
_CHECKED: "OrderedDict[tuple, ResolvedModel]" = OrderedDict()
CHECKED_MODELS_KEPT = 4  # each holds its checkpoint's bytes


class ModelCheck:
    """`resolve_model` in a spawned child process; the caller goes on with read-only checks meanwhile.

        with ModelCheck(uri) as check:
            ...                      # other preparation
            model = check.result()   # waits; raises ValueError for a model that cannot be used

    Spawned, not forked: the child starts clean (no copy of a driver's threads or Ray connection) with the
    caller's sys.path, so it imports the same segmill, a Ray job's shipped copy included. A model this process
    has checked before, whose bytes cannot have changed since, is not loaded again (`spawned` is then False).
    """

    def __init__(self, model: str, *, endpoint_url: str | None = None, tracking_uri: str | None = None):
        self._key = _immutable_key(model, endpoint_url, tracking_uri)
        self._cached = _CHECKED.get(self._key) if self._key else None
        self._pool = self._answer = None
        if self._cached is None:
            self._pool = multiprocessing.get_context("spawn").Pool(1)
            self._answer = self._pool.apply_async(resolve_model, (model,),
                                                  dict(endpoint_url=endpoint_url, tracking_uri=tracking_uri))

    @property
    def spawned(self) -> bool:
        return self._pool is not None

    def result(self) -> ResolvedModel:
        if self._cached is not None:
            _CHECKED.move_to_end(self._key)
            return self._cached
        resolved = self._answer.get()
        if self._key:
            _CHECKED[self._key] = resolved
            while len(_CHECKED) > CHECKED_MODELS_KEPT:
                _CHECKED.popitem(last=False)
        return resolved

    def __enter__(self) -> "ModelCheck":
        return self

    def __exit__(self, *_) -> None:
        if self._pool is not None:
            self._pool.terminate()  # left early (another check failed): the answer is no longer wanted
            self._pool.join()


def _immutable_key(model: str, endpoint_url: str | None, tracking_uri: str | None) -> tuple | None:
    """A key that changes whenever the model's bytes may have: a registry version or a torchvision tag as named
    (neither can change), a checkpoint file by its size and modification time or ETag; None for an alias (it
    moves) or a file whose details cannot be read (then the model is always checked)."""
    if model.startswith("models:/"):
        return ("registry", model, settings.tracking_uri(tracking_uri)) \
            if _MLFLOW_URI.match(model) and "@" not in model else None
    if _TORCHVISION_TAG.match(model):
        return ("torchvision", model)
    try:
        fs, path = open_fs(model, endpoint_url=endpoint_url)
        info = fs.info(path)
    except Exception:
        return None
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    if stamp is None or info.get("type") != "file":
        return None
    return ("file", model, endpoint_url, info.get("size"), str(stamp))


def _from_checkpoint_file(uri: str, endpoint_url: str | None) -> ResolvedModel:
    from segmill.models.checkpoint import load_checkpoint

    fs, path = open_fs(uri, endpoint_url=endpoint_url)
    if not fs.exists(path):
        raise ValueError(f"Model {redact(uri)} is neither a registered architecture nor an existing checkpoint file.")
    if fs.isdir(path):
        raise ValueError(f"Model {redact(uri)} is a folder; name the checkpoint file in it (e.g. model.pt).")
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        _, spec = load_checkpoint(data)
    except Exception as exc:
        raise ValueError(f"Model {redact(uri)} is not a usable segmill checkpoint: {exc}") from exc
    name = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    return ResolvedModel(name, "sha256:" + hashlib.sha256(data).hexdigest()[:12], data, spec)


def _from_mlflow(uri: str, tracking_uri: str | None) -> ResolvedModel:
    match = _MLFLOW_URI.match(uri)
    if not match:
        raise ValueError(f"Model URI {uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION.")
    tracking_uri = settings.tracking_uri(tracking_uri)
    if tracking_uri is None:  # MLflow's own default would quietly create ./mlflow.db wherever the job started
        raise ValueError(f"Model {uri} names a registered model but no MLflow tracking server is given; pass "
                         f"--tracking-uri or set {settings.TRACKING_ENV}.")
    import mlflow  # imported here: only jobs that use the registry pay for it

    from segmill.models.checkpoint import load_checkpoint

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    name = match["name"]
    try:
        version = client.get_model_version_by_alias(name, match["alias"]) if match["alias"] else \
            client.get_model_version(name, match["version"])
        # A version is an MLflow model (pipeline/mlflow_model.py: the checkpoint among its artifacts), or, when
        # registered before segmill logged MLflow models, a run's artifacts holding the checkpoint.
        # Its storage location through this client: a models:/ artifact URI would be looked up in MLflow's global
        # registry, not in the one named here.
        where = client.get_model_version_download_uri(name, version.version).rstrip("/")
        if version.source.startswith("models:/"):
            where += "/artifacts"
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{where}/{MLFLOW_CHECKPOINT_ARTIFACT}",
                                                    tracking_uri=tracking_uri)
    except Exception as exc:
        raise ValueError(f"Model {uri} could not be resolved in MLflow ({type(exc).__name__}: {exc}).") from exc
    with open(local, "rb") as f:
        data = f.read()
    _, spec = load_checkpoint(data)
    return ResolvedModel(name, str(version.version), data, spec)


def _from_torchvision_tag(arch: str, tag: str) -> ResolvedModel:
    """Build with torchvision's published weights; the class names come from the weights' metadata."""
    import torchvision

    from segmill.models.checkpoint import save_checkpoint
    from segmill.models.registry import get_model

    try:
        categories = tuple(torchvision.models.get_model_weights(arch)[tag].meta["categories"])
        model = get_model(arch, num_classes=len(categories), weights=tag)
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{arch}:{tag} is not a torchvision weights tag segmill can load for {arch!r}.") from None
    except Exception as exc:  # the download itself
        raise ValueError(f"Weights {arch}:{tag} could not be fetched ({type(exc).__name__}: {exc}).") from exc
    spec = ModelSpec(arch=arch, classes=categories)
    buffer = io.BytesIO()
    save_checkpoint(buffer, model, spec)
    return ResolvedModel(arch, tag, buffer.getvalue(), spec)
