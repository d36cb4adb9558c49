"""Shared fixtures: a local Ray, tiny checkpoints, generated scenes and moto's S3 server, all on 127.0.0.1.

Everything is started and stopped by the tests; nothing reaches beyond the machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import ray  # noqa: F401  imported before any CliRunner swaps sys.stderr: Ray's log handler keeps the stream it first saw

from testkit import DSB2018

# Dummy credentials, distinctive so a test can prove they never reach a table, a record or a message.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIASEGMILLTESTKEY01",
    "AWS_SECRET_ACCESS_KEY": "segmill-test-secret-never-in-output",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def aws_env() -> Iterator[dict[str, str]]:
    """Dummy AWS credentials for the whole session, set before Ray starts so its workers inherit them."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in AWS_ENV.items():
            patch.setenv(key, value)
        yield dict(AWS_ENV)


@pytest.fixture(scope="session")
def ray_session(aws_env: dict[str, str]) -> Iterator[None]:
    """One local Ray for the session; 4 logical CPUs on 2 cores so Ray Data tasks are never starved by actors."""
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _save_tiny_unet(path: Path, classes: tuple[str, ...], palette: tuple[tuple[int, int, int], ...] = (),
                    seed: int = 3) -> str:
    """A random-init U-Net (8 channels, depth 2) whose masks hold several classes (see save_random_checkpoint)."""
    from segmill.models.checkpoint import ModelSpec, save_random_checkpoint

    spec = ModelSpec(arch="unet", classes=classes, arch_kwargs={"base_channels": 8, "depth": 2}, palette=palette)
    save_random_checkpoint(path, spec, seed=seed)
    return str(path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 7-class scene model checkpoint (SCENE_CLASSES, SCENE_PALETTE)."""
    from segmill.pipeline.common.scenes import SCENE_CLASSES, SCENE_PALETTE

    return _save_tiny_unet(tmp_path_factory.mktemp("ckpt") / "scenes-unet.pt", SCENE_CLASSES, SCENE_PALETTE)


@pytest.fixture(scope="session")
def nuclei_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-class (background, nucleus) checkpoint, the classes of DSB2018."""
    return _save_tiny_unet(tmp_path_factory.mktemp("ckpt") / "nuclei-unet.pt", ("background", "nucleus"), seed=1)


@pytest.fixture(scope="session")
def scenes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 labelled scenes: ROOT/images/scene_NNNNN.png, ROOT/labels/..., ROOT/classes.yaml. Treat as read-only."""
    from segmill.pipeline.common.scenes import write_scenes

    root = tmp_path_factory.mktemp("scenes")
    write_scenes(str(root), 12, seed=3)
    return root


@pytest.fixture(scope="session")
def dsb2018() -> Path:
    if not (DSB2018 / "images").is_dir():
        pytest.skip(f"DSB2018 is not at {DSB2018} (it lives beside the project, in ../shared/datasets).")
    return DSB2018


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    key: str
    secret: str

    def create_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint_url).create_bucket(Bucket=name)
        return name

    def filesystem(self):
        """A fresh s3fs filesystem (no listing cache shared with the code under test)."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint_url, key=self.key, secret=self.secret,
                                 skip_instance_cache=True)


@pytest.fixture(scope="session")
def s3_server(aws_env: dict[str, str]) -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 (a free port), with $AWS_ENDPOINT_URL pointing at it for the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", endpoint)
        yield S3Server(endpoint, aws_env["AWS_ACCESS_KEY_ID"], aws_env["AWS_SECRET_ACCESS_KEY"])
    server.stop()


def read_results(output: str, filesystem=None) -> pa.Table:
    """The committed results table with pyarrow: every `part-*.parquet` directly under OUTPUT."""
    if filesystem is None:
        parts = sorted(str(p) for p in Path(output).glob("part-*.parquet"))
    else:
        root = output.split("://", 1)[-1].rstrip("/")
        parts = sorted(p for p in filesystem.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
    return pads.dataset(parts, filesystem=filesystem, format="parquet").to_table()


@pytest.fixture(scope="session")
def results_reader():
    """`read(output, filesystem=None) -> pa.Table`: the results table as pyarrow reads it."""
    return read_results


@dataclass(frozen=True)
class SampleFile:
    """An input file of a kind the decoder must handle: OK with the decoded (height, width), or an error."""

    name: str
    data: bytes
    shape: tuple[int, int] | None  # decoded (height, width); None: the file must become an error row
    reason: str = ""  # a phrase the error message holds


def _encode(image, fmt: str, **kwargs) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def make_sample_files(max_pixels: int = 300 * 300) -> dict[str, SampleFile]:
    """One file of every awkward kind, keyed by kind; deterministic."""
    import numpy as np
    from PIL import Image

    from segmill.pipeline.common.images import encode_png
    from segmill.pipeline.common.scenes import render_scene

    scene, _ = render_scene(11, 0)
    yy, xx = np.mgrid[:40, :60]
    grey16 = ((yy * 60 + xx) * 27).astype(np.uint16)  # up to ~64800: needs all 16 bits
    rgba = np.dstack([np.full((30, 50, 3), 200, np.uint8), np.where(xx[:30, :50] < 25, 0, 255).astype(np.uint8)])
    halves = np.zeros((40, 60, 3), np.uint8)  # stored 60 wide x 40 high: top red, bottom blue
    halves[:20] = (255, 0, 0)
    halves[20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    side = int(max_pixels ** 0.5) + 20
    full = encode_png(scene)
    files = [
        SampleFile("empty.png", b"", None, "empty"),
        SampleFile("notes.jpg", b"These are notes, not a JPEG.\n" * 4, None, "not a readable image"),
        SampleFile("truncated.png", full[: len(full) // 2], None, "truncated or corrupt"),
        SampleFile("grey16.png", _encode(Image.fromarray(grey16), "PNG"), (40, 60)),
        SampleFile("rgba.png", _encode(Image.fromarray(rgba, "RGBA"), "PNG"), (30, 50)),
        SampleFile("palette.png", _encode(Image.fromarray(scene[:64, :48]).convert("P"), "PNG"), (64, 48)),
        SampleFile("cmyk.jpg", _encode(Image.new("CMYK", (45, 35), (0, 255, 255, 0)), "JPEG"), (35, 45)),
        SampleFile("rotated.jpg", _encode(Image.fromarray(halves), "JPEG", exif=exif, quality=95), (60, 40)),
        SampleFile("huge.png", _encode(Image.new("L", (side, side), 128), "PNG"), None, "over the limit"),
    ]
    return {f.name.split(".")[0]: f for f in files}


@pytest.fixture(scope="session")
def sample_files() -> dict[str, SampleFile]:
    return make_sample_files()


@pytest.fixture()
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP's spinning threads make
    them 100x slower; one thread keeps these tests fast whatever else is running."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def register_tiny_model(tmp_path: Path, tiny_checkpoint: str, monkeypatch):
    """Factory: MLflow on SQLite in tmp_path ($MLFLOW_TRACKING_URI points at it) with model NAME, version 1 holding
    the tiny checkpoint as `champion`; returns the tracking URI."""
    import shutil

    import mlflow

    from segmill.pipeline.common.model_source import MLFLOW_CHECKPOINT_ARTIFACT
    from segmill.pipeline.tracking import experiment_id

    def register(name: str) -> str:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_experiment(experiment_id=experiment_id(uri, "registered"))  # artifacts in tmp_path, not ./mlruns
        folder, file_name = MLFLOW_CHECKPOINT_ARTIFACT.split("/")
        staged = tmp_path / "staged" / file_name
        staged.parent.mkdir(exist_ok=True)
        shutil.copy(tiny_checkpoint, staged)
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(staged), artifact_path=folder)
        client = mlflow.MlflowClient(uri)
        client.create_registered_model(name)
        version = client.create_model_version(name, source=run.info.artifact_uri, run_id=run.info.run_id)
        client.set_registered_model_alias(name, "champion", version.version)
        return uri

    return register


class Browser:
    """Debian's Chromium driven by playwright: open an HTML file, then read the DOM as the browser rendered it."""

    def __init__(self, browser) -> None:
        self.browser = browser

    def open(self, path_or_html: str | Path):
        page = self.browser.new_page()
        if isinstance(path_or_html, Path):
            page.goto(path_or_html.resolve().as_uri(), wait_until="load")
        else:
            page.set_content(path_or_html, wait_until="load")
        return page


def images_loaded(page) -> list[bool]:
    """For each <img> of the page: whether it loaded and decoded to a picture."""
    return page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")


def table_cells(page, table_id: str) -> list[list[str]]:
    """A table's body as the browser shows it: rows of cell texts."""
    return page.evaluate(f"Array.from(document.querySelectorAll('#{table_id} tbody tr'))"
                         ".map(r => Array.from(r.cells).map(c => c.innerText.trim()))")


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """A headless Chromium for the session ($SEGMILL_CHROMIUM, else `chromium` on PATH); skipped where there is none.
    Teardown closes it and SIGKILLs any browser process left behind."""
    import os
    import shutil

    import psutil

    executable = os.environ.get("SEGMILL_CHROMIUM") or next(
        (found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None)
    if not executable:
        pytest.skip("no Chromium here (Debian: apt-get install chromium; or set SEGMILL_CHROMIUM): reports not opened")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]'): reports not opened")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    playwright = sync_playwright().start()
    # No sandbox: CI runs as root, where Chromium refuses its sandbox; the pages are the tests' own files.
    launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
    try:
        yield Browser(launched)
    finally:
        for stop in (launched.close, playwright.stop):
            try:
                stop()
            except Exception:
                pass
        for process in psutil.Process().children(recursive=True):
            if process.pid not in before:
                try:
                    process.kill()
                except psutil.Error:
                    pass
