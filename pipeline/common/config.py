"""Typed configs read from Python, YAML or the command line: pydantic models whose errors are one sentence.

Every job config (`SegmentConfig`, `TrainConfig`, ...) is a `Config`: keys unknown to it are rejected, values
are checked strictly (no "8" for 8, no 1 for true). Read through `from_dict`/`from_yaml` (specs, the command line),
a problem is one `ValueError` sentence that names the spec and the key (`one_sentence`); built directly in
Python, it is pydantic's `ValidationError` (a ValueError too), which the CLI also turns into one sentence.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

_TYPE_WORDS = {"bool": "bool", "int": "int", "float": "float", "string": "str"}


class Config(BaseModel):
    """Base of segmill's job configs: frozen, strict, extra keys forbidden, one-sentence errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    what: ClassVar[str] = "config"  # how errors name it when no source is given, e.g. "segment job"
    # The `kind` a job spec of this config names (segment, train, evaluate); one YAML file runs with the kind's own
    # command (`segmill segment --config`), `segmill submit` and `segmill schedule add` alike.
    kind: ClassVar[str | None] = None

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None):
        """Build from a mapping (a parsed spec); `source` names it in errors, e.g. "job spec train.yaml"."""
        source = source or cls.what
        if not isinstance(data, dict):
            raise ValueError(f"The {source} must be a mapping of keys to values, not {data!r}.")
        if "kind" in data and cls.kind:
            data = dict(data)
            kind = data.pop("kind")
            if kind != cls.kind:
                raise ValueError(f"The {source} is a {kind!r} spec, not a {cls.kind!r} one; run it with "
                                 f"`segmill submit` (or the command of its kind).")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(one_sentence(exc, source)) from None

    @classmethod
    def from_yaml(cls, path: str, overrides: dict[str, Any] | None = None):
        """Read a YAML spec; `overrides` (command-line values, None meaning "not given") win over its keys."""
        data = read_spec_file(path)
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(data, source=f"{cls.what} spec {path}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any):
        """A copy with `changes` applied and checked."""
        return type(self).from_dict({**self.to_dict(), **changes})


def read_spec_file(path: str) -> dict[str, Any]:
    """A YAML spec as a dict, with a one-sentence error for a missing file, bad YAML or a non-mapping."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ValueError(f"Job spec {path} cannot be read ({exc.strerror or exc}).") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"Job spec {path} is not valid YAML ({exc.__class__.__name__}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"Job spec {path} must be a mapping of keys to values.")
    return data


def one_sentence(error: ValidationError, source: str) -> str:
    """The first problem of a pydantic error as one sentence naming `source` and the key."""
    problems = error.errors(include_url=False)
    unknown = [p for p in problems if p["type"] == "extra_forbidden"]
    missing = [p for p in problems if p["type"] == "missing"]
    if unknown:
        where, _ = _where(unknown[0]["loc"], source)
        keys = sorted(str(p["loc"][-1]) for p in unknown if p["loc"][:-1] == unknown[0]["loc"][:-1])
        return f"The {where} has unknown key(s) {keys}."
    if missing:
        where, _ = _where(missing[0]["loc"], source)
        keys = [str(p["loc"][-1]) for p in missing if p["loc"][:-1] == missing[0]["loc"][:-1]]
        return f"The {where} lacks the required key(s) {keys}."
    problem = problems[0]
    if problem["type"] == "value_error":  # our own validators already speak in sentences
        return str(problem["ctx"]["error"])
    where, key = _where(problem["loc"], source)
    subject = f"The {where} key {key!r}" if key else f"The {where}"
    must = _must(problem)
    return f"{subject} {must}." if must.endswith("empty") else f"{subject} {must}, not {problem['input']!r}."


def _where(loc: tuple, source: str) -> tuple[str, str | None]:
    """("resources", "batch_size") -> ("SOURCE resources", "batch_size"); list positions are left out."""
    names = [str(part) for part in loc if isinstance(part, str)]
    if not names:
        return source, None
    return " ".join([source, *names[:-1]]), names[-1]


def _must(problem: dict) -> str:
    kind, ctx = problem["type"], problem.get("ctx", {})
    base = kind.split("_")[0]
    if kind.endswith(("_type", "_parsing", "_from_float")) and base in _TYPE_WORDS:
        return f"must be of type {_TYPE_WORDS[base]}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a mapping of keys to values"
    if kind in ("tuple_type", "list_type"):
        return "must be a list"
    if kind == "greater_than":
        return f"must be greater than {ctx['gt']}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}"
    if kind == "less_than":
        return f"must be less than {ctx['lt']}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}"
    if kind in ("string_too_short", "too_short"):
        return "must not be empty"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    return re.sub(r"^\w+ should ", "must ", problem["msg"]).rstrip(".")


def describe(cls: type[BaseModel], name: str) -> str:
    """A field's description and default, for the command line's help: one source, so the two cannot drift.

    Every default reads `[default: X]`, as click shows its own: a fixed value from the field, or the words of a
    description's "(default: ...)" where the default is found at run time (an environment variable, the cluster).
    """
    field = cls.model_fields[name]
    text = field.description or name.replace("_", " ")
    found = re.search(r"\s*\(default:?\s+([^()]*(?:\([^()]*\)[^()]*)*)\)", text)
    if found:
        return f"{text[:found.start()]}{text[found.end():]}  [default: {found.group(1)}]"
    if field.is_required():
        return text
    default = field.get_default(call_default_factory=True)
    if default is None or default == "" or isinstance(default, (dict, BaseModel)):
        return text
    shown = ",".join(f"{v:g}" for v in default) if isinstance(default, tuple) else default
    # Two spaces, as click puts before the defaults it shows itself: one look for every option.
    return f"{text}  [default: {str(shown).lower() if isinstance(default, bool) else shown}]"
