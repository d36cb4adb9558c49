"""What every command shares: the consoles, the logging set-up, and the one handler of a user's mistakes.

A mistake a user can make (a bad spec, a missing file, unreachable storage) reaches the CLI as ValueError or
OSError with a one-sentence message; `user_errors` prints that sentence and exits with code 2. Anything else is
a bug and keeps its traceback.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from typing import Any, Iterator

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from segmill.pipeline.common.config import one_sentence
from segmill.pipeline.common.storage import redact

# Soft wrap: a line is never cut at 80 columns in a pipe or a file, so paths and ids stay copyable; colour and
# the live progress bar only on a terminal (rich's own detection).
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)
ENDPOINT_HELP = "S3-compatible endpoint.  [default: $AWS_ENDPOINT_URL]"
# Click's plain help: flags as `--flip / --no-flip` (no type shown for them), values as `--n <int>`, every default
# as `[default: X]` (typer's own for plain options, `config.describe` for config-backed ones), and the examples
# of each command's epilog kept as written.
CONTEXT = {"max_content_width": 110, "help_option_names": ["-h", "--help"]}


def typer_app(**options: Any) -> typer.Typer:
    """A typer app (or group) with segmill's help style."""
    return typer.Typer(rich_markup_mode=None, context_settings=CONTEXT, **options)


def examples(*lines: str) -> str:
    """An epilog of example command lines (click keeps a paragraph that starts with \\b as written)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)
ADDRESS_HELP = "Ray cluster address.  [default: $RAY_ADDRESS, else an in-process Ray]"


def fail(exc: BaseException) -> None:
    """Print `exc` as one line and exit 2."""
    errors.print(f"[red]error:[/red] {escape(redact(str(exc)))}", highlight=False)
    raise typer.Exit(code=2)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Run a command's work: a ValueError or OSError (a user's mistake, or storage that cannot be reached) becomes
    one line on stderr and exit code 2."""
    try:
        yield
    except ValidationError as exc:  # a config built in code from a user's values: still one sentence
        fail(ValueError(one_sentence(exc, exc.title)))
    except (ValueError, OSError) as exc:
        fail(exc)


DASHBOARD_HELP = "Start Ray's dashboard on 127.0.0.1 for a local job and print its address."


def dashboard(wanted: bool) -> None:
    """`--dashboard`: print the local Ray dashboard's address once it is up."""
    if wanted:
        from segmill.pipeline.common.runtime import show_dashboard

        show_dashboard(lambda url: errors.print(f"Ray dashboard: {url}", highlight=False, markup=False))


def given(**values: Any) -> dict[str, Any]:
    """The options a user gave (typer passes None for the others), so a spec's values are not overridden."""
    return {key: value for key, value in values.items() if value is not None}


def setup_logging(verbose: bool) -> None:
    """segmill's own lines (warnings, or with -v everything); other libraries' lines and deprecation warnings only
    with -v."""
    from segmill.pipeline.common.runtime import set_library_log_level

    root = logging.getLogger()
    if not any(isinstance(h, _CurrentStderrHandler) for h in root.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    set_library_log_level(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
        # MLflow sets its own logger's level when imported; this is the level it reads.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time, not the one at set-up: tests (CliRunner) swap and close it
    between invocations of the app in one process."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


# A line of Ray's C++ core (raylet, core worker), e.g. `[2026-12-01 11:52:00,724 E 25993 25993] core_worker.cc:...`;
# fatal (F) lines still pass.
_RAY_NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWE] \d+ \d+\] ")


def filter_native_logs() -> None:
    """Keep Ray's C++ log lines out of this process's stderr (the rest passes unchanged) until it exits.

    Ray's core writes to file descriptor 2 itself, bypassing Python's logging: e.g. an E-level line on every bulk
    job about the arguments Ray Data keeps in the object store for its own actors (ray-project/ray#53727), which
    says nothing a user can act on. Only `segmill`'s entry point installs this (not the app, which tests run
    in-process); `-v` leaves stderr alone.
    """
    sys.stderr.flush()
    real = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def pump() -> None:
        with os.fdopen(read, "rb", buffering=0) as pipe:
            for line in iter(pipe.readline, b""):
                if not _RAY_NATIVE_LINE.match(line):
                    os.write(real, line)

    thread = threading.Thread(target=pump, daemon=True, name="segmill-stderr")
    thread.start()

    def restore() -> None:  # at exit, after any traceback was written: hand fd 2 back, let the pump drain
        sys.stderr.flush()
        os.dup2(real, 2)
        thread.join(timeout=1.0)

    atexit.register(restore)
