"""Resolve a job's MODEL into checkpoint bytes plus the name and version recorded in every output row.

Accepted forms:
- a checkpoint file, local or on any fsspec URI (`ckpt/roads.pt`, `s3://bucket/roads.pt`);
- an MLflow registry URI, `models:/NAME@ALIAS` or `models:/NAME/VERSION` (artifact `checkpoint/model.pt`);
- a registry architecture with a torchvision weights tag, `ARCH:TAG` (e.g.
  `lraspp_mobilenet_v3_large:COCO_WITH_VOC_LABELS_V1`), which torchvision downloads once (needs network).
The driver resolves the model once, before any compute, and ships the bytes to the actors. The bulk job's
driver does it in a child process (`ModelCheck`): it then never loads torch, about 0.5 GB less, and reads what
the output already holds while the child loads the model.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from segmill.models.spec import ModelSpec
from segmill.pipeline.storage import open_fs, redact

MLFLOW_CHECKPOINT_ARTIFACT = "checkpoint/model.pt"
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


def resolve_model_isolated(model: str, *, endpoint_url: str | None = None,
                           tracking_uri: str | None = None) -> ResolvedModel:
    """`resolve_model` in a child Python process, for a caller that must not load torch itself."""
    with ModelCheck(model, endpoint_url=endpoint_url, tracking_uri=tracking_uri) as check:
        return check.result()


class ModelCheck:
    """`resolve_model` started in a child Python process; the caller goes on with read-only checks meanwhile.

        with ModelCheck(uri) as check:
            ...                      # other preparation
            model = check.result()   # waits; raises ValueError for a model that cannot be used
    """

    def __init__(self, model: str, *, endpoint_url: str | None = None, tracking_uri: str | None = None):
        self.model = model
        self._folder = tempfile.TemporaryDirectory(prefix="segmill-model-")
        request = dict(model=model, endpoint_url=endpoint_url, tracking_uri=tracking_uri, folder=self._folder.name)
        # The child imports the same segmill (a Ray job's py_modules included) as this process.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        # Its stderr goes to a file, not a pipe: nobody reads a pipe until result(), and a full one would block it.
        self._stderr = Path(self._folder.name, "stderr.txt")
        with self._stderr.open("w") as stderr:
            self._child = subprocess.Popen([sys.executable, "-m", "segmill.pipeline.model_source",
                                            json.dumps(request)], env=env, stdout=subprocess.DEVNULL, stderr=stderr)

    def result(self) -> ResolvedModel:
        self._child.wait()
        answer = Path(self._folder.name, "answer.json")
        if self._child.returncode or not answer.exists():
            last = (self._stderr.read_text().strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"Resolving model {redact(self.model)} failed in its child process: {last}")
        found = json.loads(answer.read_text())
        if "error" in found:
            raise ValueError(found["error"])
        return ResolvedModel(found["name"], found["version"], Path(self._folder.name, "checkpoint").read_bytes(),
                             ModelSpec.from_dict(found["spec"]))

    def __enter__(self) -> "ModelCheck":
        return self

    def __exit__(self, *_) -> None:
        if self._child.poll() is None:  # left early (another check failed): the answer is no longer wanted
            self._child.kill()
            self._child.wait()
        self._folder.cleanup()


def _answer(request: dict) -> None:
    """The child's side of `resolve_model_isolated`: the checkpoint and a JSON answer (or the one-line error)."""
    folder = Path(request["folder"])
    try:
        resolved = resolve_model(request["model"], endpoint_url=request["endpoint_url"],
                                 tracking_uri=request["tracking_uri"])
    except ValueError as exc:
        (folder / "answer.json").write_text(json.dumps({"error": str(exc)}))
        return
    (folder / "checkpoint").write_bytes(resolved.checkpoint)
    (folder / "answer.json").write_text(json.dumps(dict(name=resolved.name, version=resolved.version,
                                                        spec=resolved.spec.to_dict())))


def _from_checkpoint_file(uri: str, endpoint_url: str | None) -> ResolvedModel:
    from segmill.models.checkpoint import load_checkpoint

    fs, path = open_fs(uri, endpoint_url=endpoint_url)
    if not fs.exists(path):
        raise ValueError(f"Model {redact(uri)} is neither a registered architecture nor an existing checkpoint file.")
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
    import mlflow  # imported here: only jobs that use the registry pay for it

    from segmill.models.checkpoint import load_checkpoint

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    name = match["name"]
    try:
        version = client.get_model_version_by_alias(name, match["alias"]) if match["alias"] else \
            client.get_model_version(name, match["version"])
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{version.source.rstrip('/')}/{MLFLOW_CHECKPOINT_ARTIFACT}", tracking_uri=tracking_uri
        )
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


if __name__ == "__main__":
    _answer(json.loads(sys.argv[1]))
