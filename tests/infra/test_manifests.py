"""infra/: the Kubernetes manifests parse, carry what their kind needs, use the project's images and run commands
the real CLI accepts; the Dockerfile builds those images; the job specs they mount are valid specs."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import tomllib
import yaml
from croniter import croniter
from typer.testing import CliRunner

from segmill.jobs.cli import app
from segmill.jobs.specs import load_spec
from testkit import ROOT

K8S = ROOT / "infra" / "k8s"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
THIRD_PARTY_IMAGES = {"postgres:16"}
runner = CliRunner()


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


DOCS = _documents()


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def _pod_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every pod spec inside a manifest, whatever its kind nests it in."""
    if doc["kind"] == "RayCluster":
        yield doc["spec"]["headGroupSpec"]["template"]["spec"]
        for group in doc["spec"]["workerGroupSpecs"]:
            yield group["template"]["spec"]
    elif doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        yield doc["spec"]["template"]["spec"]
    elif doc["kind"] == "CronJob":
        yield doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _containers() -> list[tuple[str, dict[str, Any]]]:
    return [(doc["metadata"]["name"], c) for _, doc in DOCS for pod in _pod_specs(doc) for c in pod["containers"]]


def _dockerfile_images() -> set[str]:
    return set(re.findall(r"-t (\S+) \.", DOCKERFILE.read_text()))


def test_every_manifest_has_api_version_kind_and_a_name_in_the_namespace() -> None:
    assert len(DOCS) >= 12
    for name, doc in DOCS:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), name
        assert doc["metadata"].get("name"), name
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "segmill", (name, doc["metadata"]["name"])
    kinds = {doc["kind"] for _, doc in DOCS}
    assert {"RayCluster", "RayJob", "CronJob", "Deployment", "Service", "StatefulSet", "ConfigMap"} <= kinds


def test_the_ray_cluster_has_cpu_and_gpu_workers_with_requests() -> None:
    (cluster,) = _of_kind("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    ray_pin = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert cluster["spec"]["rayVersion"] == ray_pin
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["image"].endswith("-cuda")
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"


def test_every_container_uses_a_project_image_and_requests_resources() -> None:
    ours = _dockerfile_images()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert ours and all(image.split(":")[1].startswith(version) for image in ours)
    used = set()
    for owner, container in _containers():
        used.add(container["image"])
        assert container["image"] in ours | THIRD_PARTY_IMAGES, (owner, container["image"])
        if owner != "schedule-weekly-retrain":
            assert container.get("resources", {}).get("requests"), (owner, container["name"])
    assert ours <= used, "every image the Dockerfile builds is used"


def _segmill_commands() -> list[tuple[str, list[str]]]:
    commands = [(owner, c.get("command", []) + c.get("args", [])) for owner, c in _containers()]
    commands += [(job["metadata"]["name"], shlex.split(job["spec"]["entrypoint"])) for job in _of_kind("RayJob")]
    return [(owner, argv) for owner, argv in commands if argv and argv[0] == "segmill"]


def test_every_segmill_command_parses_with_the_real_cli() -> None:
    commands = _segmill_commands()
    assert {argv[1] for _, argv in commands} >= {"run-spec", "scheduler", "schedule"}
    for owner, argv in commands:
        result = runner.invoke(app, argv[1:] + ["--help"])
        assert result.exit_code == 0, (owner, argv, result.output)
    (cron,) = _of_kind("CronJob")
    scheduler = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert scheduler[:3] == ["segmill", "scheduler", "--once"]
    assert croniter.is_valid(cron["spec"]["schedule"]) and cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_rayjobs_and_the_scheduler_run_specs_that_exist_and_validate(tmp_path: Path) -> None:
    (specs,) = [doc for doc in _of_kind("ConfigMap") if doc["metadata"]["name"] == "segmill-job-specs"]
    kinds = set()
    for name, text in specs["data"].items():
        kinds.add(load_spec(yaml.safe_load(text)).kind)  # keys and types checked like any spec
    assert kinds == {"segment", "train", "evaluate"}
    (cluster,) = _of_kind("RayCluster")
    for job in _of_kind("RayJob"):
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    referenced = [arg for _, argv in _segmill_commands() for arg in argv if arg.startswith("/etc/segmill/specs/")]
    assert referenced and all(Path(arg).name in specs["data"] for arg in referenced)
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    assert any(v.get("configMap", {}).get("name") == "segmill-job-specs" for v in head["volumes"])


def test_mlflow_runs_on_postgres_with_s3_artifacts() -> None:
    (deployment,) = [d for d in _of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["mlflow", "server"]
    assert command[command.index("--artifacts-destination") + 1].startswith("s3://")
    assert "--backend-store-uri" in command
    secret = next(d for d in _of_kind("Secret") if d["metadata"]["name"] == "mlflow-db")
    assert secret["stringData"]["BACKEND_STORE_URI"].startswith("postgresql://")
    services = {s["metadata"]["name"] for s in _of_kind("Service")}
    assert {"mlflow", "mlflow-db"} <= services
    env = next(d for d in _of_kind("ConfigMap") if d["metadata"]["name"] == "segmill-env")
    assert env["data"]["MLFLOW_TRACKING_URI"] == "http://mlflow.segmill.svc:5000"


def test_the_dockerfile_installs_segmill_with_the_pinned_constraints() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM \S+ AS segmill$", text, re.M) and re.search(r"^FROM \S+ AS mlflow$", text, re.M)
    assert "-c constraints.txt ." in text and "TORCH_INDEX" in text
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    for folder in package_dirs:
        assert f"COPY {folder} ./{folder}" in text, folder


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "infra" / "local").glob("*.sh")))
def test_local_scripts_are_executable_bash(script: str) -> None:
    import os
    import subprocess

    path = ROOT / "infra" / "local" / script
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "127.0.0.1" in path.read_text(), "local services listen on loopback only"
