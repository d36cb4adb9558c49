"""What every command shares: the consoles, the logging set-up, and the one handler of a user's mistakes.

A mistake a user can make (a bad spec, a missing file, unreachable storage) reaches the CLI as ValueError or
OSError with a one-sentence message; `user_errors` prints that sentence and exits with code 2. Anything else is
a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Iterator

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from segmill.pipeline.common.config import one_sentence
from segmill.pipeline.common.storage import redact

console = Console()
errors = Console(stderr=True, soft_wrap=True)  # soft wrap: a path in a message stays copyable
ENDPOINT_HELP = "S3-compatible endpoint (default: $AWS_ENDPOINT_URL)."
ADDRESS_HELP = "Ray cluster address (default: $RAY_ADDRESS or an in-process Ray)."


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


def given(**values: Any) -> dict[str, Any]:
    """The options a user gave (typer passes None for the others), so a spec's values are not overridden."""
    return {key: value for key, value in values.items() if value is not None}


def setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _CurrentStderrHandler) for h in root.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time, not the one at set-up: tests (CliRunner) swap and close it
    between invocations of the app in one process."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass
