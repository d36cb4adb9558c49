"""The schedule store: named schedules and the log of their firings, in one SQLite file that survives restarts.

Where: `STATE/schedules.db`, STATE being `--state`, else `$SEGMILL_STATE`, else `.segmill/schedules`.
Why SQLite: the firing log has a UNIQUE (schedule, slot) key, so a slot is claimed by exactly one insert even
when two schedulers share the folder (SQLite's file locks make the claim atomic on a local or block-device disk;
network file systems with broken locking are not supported). A slot is a cron time ("2025-01-05T03:00:00+00:00")
or, for condition-only schedules, the evidence that made the conditions true ("images=240;evaluation=RUN_ID").
"""
from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from segmill.pipeline.common import settings

DATABASE = "schedules.db"

# Firing statuses: claimed and running, finished well, raised or reported failure, not fired (missed slot or a
# condition was false at a cron slot).
RUNNING, OK, FAILED, MISSED, CONDITION_FALSE = "running", "ok", "failed", "missed", "condition-false"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, cron TEXT, min_new_images INTEGER, iou_below REAL,
    iou_class TEXT, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS firings (
    schedule TEXT NOT NULL, slot TEXT NOT NULL, status TEXT NOT NULL, checked_at TEXT NOT NULL,
    finished_at TEXT, labelled_images INTEGER, detail TEXT,
    UNIQUE (schedule, slot));
"""


def state_dir(state: str | os.PathLike | None = None) -> Path:
    return Path(settings.state_folder(state))


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Schedule:
    """When to fire `spec`: at `cron` slots, and/or when the data conditions hold (all given conditions must)."""

    name: str
    spec: str  # absolute path of the job spec; re-read at every firing, so edits take effect
    cron: str | None = None
    min_new_images: int | None = None  # labelled images added since the last successful firing
    iou_below: float | None = None  # the champion's IoU (of iou_class, else its mIoU) below this
    iou_class: str | None = None
    created_at: str = ""

    @property
    def has_conditions(self) -> bool:
        return self.min_new_images is not None or self.iou_below is not None

    def describe(self) -> str:
        parts = [f"cron '{self.cron}'"] if self.cron else []
        if self.min_new_images is not None:
            parts.append(f"{self.min_new_images}+ new labelled images")
        if self.iou_below is not None:
            parts.append(f"champion {'IoU of ' + self.iou_class if self.iou_class else 'mIoU'} < {self.iou_below}")
        return " and ".join(parts)


@dataclass(frozen=True)
class Firing:
    schedule: str
    slot: str
    status: str
    checked_at: str
    finished_at: str | None
    labelled_images: int | None
    detail: dict[str, Any]


class ScheduleStore:
    """Schedules and firings in `STATE/schedules.db`; every method opens its own short connection."""

    def __init__(self, state: str | os.PathLike | None = None) -> None:
        self.folder = state_dir(state)
        self.path = self.folder / DATABASE
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
                con.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ValueError(f"Schedule state {self.path} cannot be opened ({exc}).") from None

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30)
        con.row_factory = sqlite3.Row
        return con

    def _run(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with closing(self._connect()) as con, con:
            return con.execute(sql, args).fetchall()

    # schedules
    def add(self, schedule: Schedule) -> Schedule:
        try:
            self._run("INSERT INTO schedules VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (schedule.name, schedule.spec, schedule.cron, schedule.min_new_images, schedule.iou_below,
                       schedule.iou_class, schedule.created_at))
        except sqlite3.IntegrityError:
            raise ValueError(f"Schedule {schedule.name!r} already exists; remove it first or pick another name.") from None
        return schedule

    def list(self) -> list[Schedule]:
        return [Schedule(**dict(row)) for row in self._run("SELECT * FROM schedules ORDER BY name")]

    def get(self, name: str) -> Schedule:
        rows = self._run("SELECT * FROM schedules WHERE name = ?", (name,))
        if not rows:
            raise ValueError(f"Schedule {name!r} does not exist (see `segmill schedule list`).")
        return Schedule(**dict(rows[0]))

    def remove(self, name: str) -> None:
        """Remove the schedule; its firings stay in the log, so a re-added schedule of the same name never refires
        a slot that was already fired."""
        self.get(name)
        self._run("DELETE FROM schedules WHERE name = ?", (name,))

    # firings
    def claim(self, schedule: str, slot: str, checked_at: datetime, status: str = RUNNING,
              labelled_images: int | None = None, detail: dict[str, Any] | None = None) -> bool:
        """Record `slot` for `schedule`; False when it was already recorded (by us earlier, or another scheduler)."""
        try:
            self._run("INSERT INTO firings (schedule, slot, status, checked_at, labelled_images, detail) "
                      "VALUES (?, ?, ?, ?, ?, ?)", (schedule, slot, status, iso(checked_at), labelled_images,
                                                    json.dumps(detail or {}, default=str)))
        except sqlite3.IntegrityError:
            return False
        return True

    def finish(self, schedule: str, slot: str, status: str, finished_at: datetime, detail: dict[str, Any],
               labelled_images: int | None = None) -> None:
        self._run("UPDATE firings SET status = ?, finished_at = ?, detail = ?, "
                  "labelled_images = coalesce(?, labelled_images) WHERE schedule = ? AND slot = ?",
                  (status, iso(finished_at), json.dumps(detail, default=str), labelled_images, schedule, slot))

    def firings(self, schedule: str | None = None) -> list[Firing]:
        where, args = ("WHERE schedule = ?", (schedule,)) if schedule else ("", ())
        rows = self._run(f"SELECT * FROM firings {where} ORDER BY checked_at, rowid", args)
        return [Firing(**{**dict(r), "detail": json.loads(r["detail"] or "{}")}) for r in rows]

    def has_slot(self, schedule: str, slot: str) -> bool:
        return bool(self._run("SELECT 1 FROM firings WHERE schedule = ? AND slot = ?", (schedule, slot)))

    def last_cron_slot(self, schedule: Schedule) -> str | None:
        """The latest cron slot recorded for `schedule` (fired, failed, missed or condition-false)."""
        rows = self._run("SELECT max(slot) AS slot FROM firings WHERE schedule = ? AND slot LIKE '____-__-__T%'",
                         (schedule.name,))
        return rows[0]["slot"] if rows else None

    def last_success(self, schedule: str) -> Firing | None:
        rows = [f for f in self.firings(schedule) if f.status == OK]
        return rows[-1] if rows else None
