"""Job specs: YAML with `kind: segment|train|evaluate|improve` plus that kind's keys, validated before anything runs.

    kind: segment
    input: s3://bucket/images/
    output: s3://bucket/results/
    model: models:/roads@champion

`load_spec` checks keys and types (the kind's typed config), `check_inputs` checks that inputs can be listed,
outputs written and the tracking server reached, one sentence each; `run_spec` runs a spec in this process or
submits it to a Ray cluster, and writes what happened to the job history.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from segmill.jobs import history, submit
from segmill.pipeline.bulk.config import SegmentConfig
from segmill.pipeline.bulk.evaluate import EvaluateConfig
from segmill.pipeline.common import settings
from segmill.pipeline.common.config import read_spec_file
from segmill.pipeline.common.storage import check_listable, check_writable, first_line
from segmill.pipeline.loop.improve import ImproveConfig
from segmill.pipeline.train.config import TrainConfig

log = logging.getLogger(__name__)
KINDS: dict[str, type] = {"segment": SegmentConfig, "train": TrainConfig, "evaluate": EvaluateConfig,
                          "improve": ImproveConfig}


@dataclass(frozen=True)
class JobSpec:
    """A validated spec: its kind, its typed config, and the raw mapping it came from (for submission)."""

    kind: str
    config: Any
    source: str
    data: dict[str, Any]

    @property
    def output(self) -> str:
        return self.config.storage_path if self.kind == "train" else self.config.output


def load_spec(spec: str | dict[str, Any]) -> JobSpec:
    """Read (a path) and validate a spec; raises ValueError naming the spec and the bad key or value."""
    source = f"job spec {spec}" if isinstance(spec, str) else "job spec"
    data = dict(read_spec_file(spec) if isinstance(spec, str) else spec)
    kind = data.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"The {source} needs 'kind' set to one of {sorted(KINDS)}, not {kind!r}.")
    config = KINDS[kind].from_dict(data, source=f"{kind} {source}")
    return JobSpec(kind, config, source, {"kind": kind, **data})


# ---- reachability: every input listed, every output written, the tracking server asked, before any work

def check_inputs(spec: JobSpec) -> None:
    """Fail in one sentence if an input cannot be listed, an output written, or the tracking server reached."""
    c, where = spec.config, f"The {spec.kind} {spec.source}"
    if spec.kind == "segment":
        readable = {"input": c.input, "labels": c.labels}
        writable = {"output": c.output}
        tracking = c.tracking_uri or _registry_tracking(c.model)
        readable["model"] = checkpoint_path(c.model)
    elif spec.kind == "evaluate":
        readable = {"images": c.images, "labels": c.labels}
        writable = {"output": c.output}
        tracking = c.tracking_uri or _registry_tracking(c.model)
        if c.registered() and not tracking:
            from segmill.pipeline.tracking import resolved_tracking_uri

            tracking = resolved_tracking_uri(None)
    elif spec.kind == "improve":
        readable = {"images": c.images, "labels": c.labels, "classes": c.classes, "val_images": c.val_images,
                    "val_labels": c.val_labels, "segment_input": c.segment_input}
        writable = {"output": c.output, **({"segment_output": c.segment_output} if c.segment_output else {})}
        tracking = settings.tracking_uri(c.tracking_uri)
        if not tracking:
            raise ValueError(f"{where} needs tracking_uri (or ${settings.TRACKING_ENV}): its model lives in MLflow.")
    else:
        readable = {"images": c.images, "labels": c.labels, "classes": c.classes, "val_images": c.val_images,
                    "val_labels": c.val_labels, "hard_classes_from": c.hard_classes_from,
                    "init_from": None if (c.init_from or "").startswith("models:/") else c.init_from}
        writable = {"storage_path": c.storage_path}
        tracking = c.resolved_tracking_uri()
    endpoint = getattr(c, "endpoint_url", None)
    for key, uri in readable.items():
        if uri:
            check_listable(uri, f"{where}: {key}", endpoint)
    for key, uri in writable.items():
        check_writable(uri, f"{where}: {key}", endpoint)
    if tracking:
        from segmill.pipeline.tracking import check_reachable

        check_reachable(tracking)


def checkpoint_path(model: str) -> str | None:
    """The checkpoint file a MODEL names, or None for registry URIs, `ARCH:TAG` and bare architectures."""
    from segmill.models.registry import list_models

    if model.startswith("models:/") or model in list_models() or model.split(":", 1)[0] in list_models():
        return None
    return model


def _registry_tracking(model: str) -> str | None:
    return settings.tracking_uri() if model.startswith("models:/") else None


# ---- running

def run_spec(spec: str | dict[str, Any], *, address: str | None = None, history_uri: str | None = None,
             job_id: str | None = None, check: bool = True, progress: Any = None) -> dict[str, Any]:
    """Run a spec in this process (no address) or submit it to the Ray cluster at `address` (its Jobs API).

    Returns a small dict: job_id, kind, status, output, model_name, model_version (and miou/champion where the
    kind has them); for a submission, status is PENDING and the id is the Ray submission id. `progress` is
    the improve job's view factory (pipeline/loop/improve.py), ignored by the other kinds and by submissions.
    """
    job = load_spec(spec)
    if check:
        check_inputs(job)
    job, job_id = with_job_id(job, job_id)
    if address:
        return submit.submit(job.kind, job.data, job.source, job.output, address, history_uri=history_uri,
                             job_id=job_id)
    return run_local(job, job_id=job_id, history_uri=history_uri, progress=progress)


def with_job_id(job: JobSpec, job_id: str | None = None) -> tuple[JobSpec, str]:
    """One id per job, everywhere: a segment job's own id (given, or derived from its spec so that a re-run
    resumes) is its id in the history, on the cluster and in its results table; a train job's new id also
    names its MLflow and Ray Train run (unless the spec names one, or resumes)."""
    if job.kind == "segment":
        job_id = job_id or job.config.resolved_job_id()
        data = {**job.data, "job_id": job_id}
    else:
        job_id = job_id or history.new_job_id(job.kind)
        data = dict(job.data)
        if job.kind == "train" and not job.config.run_name and not job.config.resume:
            data["run_name"] = job_id
    return load_spec(data) if data != job.data else job, job_id


def run_local(job: JobSpec, *, job_id: str, history_uri: str | None = None, progress: Any = None) -> dict[str, Any]:
    """Run `job` here, recording `started` and `finished` events (FAILED with the error's sentence on failure)."""
    started = history.now()
    event = dict(job_id=job_id, kind=job.kind)
    history.record_event(history.JobEvent(**event, event="started", status="RUNNING", spec=job.data,
                                          submitted_at=started, output=job.output), history_uri)
    try:
        result = _run_improve(job.config, progress) if job.kind == "improve" else RUNNERS[job.kind](job.config)
    except BaseException as exc:
        history.record_event(history.JobEvent(**event, event="finished", status="FAILED", finished_at=history.now(),
                                              message=f"{type(exc).__name__}: {first_line(exc)}"), history_uri)
        raise
    history.record_event(history.JobEvent(**event, event="finished", status="SUCCEEDED", finished_at=history.now(),
                                          output=result["output"], model_name=result.get("model_name"),
                                          model_version=result.get("model_version")), history_uri)
    return {"job_id": job_id, "kind": job.kind, "status": "SUCCEEDED", **result}


def _run_segment(config: SegmentConfig) -> dict[str, Any]:
    from segmill.jobs.report import try_write_report
    from segmill.pipeline.bulk.job import (
        segment,  # imported here: a submission needs none of the job's code
    )

    record = segment(config)
    report = try_write_report(config.output, endpoint_url=config.endpoint_url) if record.rows else None
    return {"output": config.output, "model_name": record.model_name, "model_version": record.model_version,
            "rows": record.rows, "error_rows": record.error_rows, "report": report}


def _run_train(config: TrainConfig) -> dict[str, Any]:
    from segmill.pipeline.train.driver import (
        train,  # imported here: the training module is heavy
    )

    outcome = train(config)
    return {"output": outcome.checkpoint_uri, "model_name": outcome.model_name,
            "model_version": None if outcome.model_version is None else str(outcome.model_version),
            "run_id": outcome.run_id, "champion": outcome.champion, "miou": outcome.val_miou}


def _run_evaluate(config: EvaluateConfig) -> dict[str, Any]:
    from segmill.pipeline.bulk.evaluate import evaluate

    outcome = evaluate(config)
    return {"output": outcome.output, "model_name": outcome.model_name, "model_version": outcome.model_version,
            "miou": outcome.miou, "evaluation_run_id": outcome.evaluation_run_id}


def _run_improve(config: ImproveConfig, progress: Any = None) -> dict[str, Any]:
    from segmill.pipeline.loop.improve import improve

    outcome = improve(config, progress)
    return {"output": outcome.report, "model_name": outcome.model,
            "model_version": outcome.new_version if outcome.promoted else outcome.champion_version,
            "promoted": outcome.promoted, "decision": outcome.decision, "resegmented": outcome.resegmented}


RUNNERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "segment": _run_segment, "train": _run_train, "evaluate": _run_evaluate, "improve": _run_improve,
}
