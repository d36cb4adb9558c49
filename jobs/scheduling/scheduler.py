"""Fire due schedules: cron slots (UTC) and data conditions, each slot at most once, recorded with its outcome.

Policy for slots missed while no scheduler ran ("catch up once"): at the next check, the latest missed cron slot
fires (late), and the older ones are recorded as `missed` without firing (at most MAX_MISSED_RECORDS rows; the
count goes into the firing's detail). A cron schedule with conditions checks them at each slot: false is recorded
as `condition-false` and the slot is spent. A condition-only schedule is checked at every pass (every `interval`
seconds in the loop) and fires once per evidence (see `conditions.Check.evidence`): the same data never fires
twice, also across restarts. A failed firing is recorded as `failed` and not retried for its slot; the next slot
tries again (a scheduler killed mid-firing leaves its slot `running`, also not retried). With `address`, `ok`
means submitted: the job's own outcome is in the job history. Firings run one after another in this process (a training run in-process blocks the loop; with
`address` the job is submitted to the cluster and the call returns quickly).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from croniter import croniter

from segmill.jobs.history import now as utc_now
from segmill.jobs.scheduling import conditions
from segmill.jobs.scheduling.store import (
    CONDITION_FALSE,
    FAILED,
    MISSED,
    OK,
    Schedule,
    ScheduleStore,
    iso,
)
from segmill.pipeline.common.storage import redact

log = logging.getLogger(__name__)
MAX_MISSED_RECORDS = 100
DEFAULT_INTERVAL_S = 300.0
_FAILED_STATUSES = {"failed", "error", "stopped"}

FireFn = Callable[[str, "str | None"], dict]


def default_fire(spec: str, address: str | None) -> dict:
    """Run the spec in this process, or submit it to the Ray cluster at `address` (segmill.jobs.specs)."""
    from segmill.jobs.specs import run_spec

    return run_spec(spec, address=address)


@dataclass(frozen=True)
class Outcome:
    """What one check did for one schedule's slot."""

    schedule: str
    slot: str
    status: str
    detail: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        reason = self.detail.get("error") or "; ".join(self.detail.get("reasons", []))
        return f"{self.schedule} {self.slot}: {self.status}" + (f" ({reason})" if reason else "")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(timezone.utc)


def check_cron(expression: str) -> None:
    if not croniter.is_valid(expression):
        raise ValueError(f"Cron expression {expression!r} is not valid; use five fields, e.g. '0 3 * * 0'.")


def add_schedule(store: ScheduleStore, name: str, spec: str, *, cron: str | None = None,
                 min_new_images: int | None = None, iou_below: float | None = None, iou_class: str | None = None,
                 now: datetime | None = None) -> Schedule:
    """Check and store a new schedule; its first cron slot is the first one after `now` (nothing fires at once)."""
    import os

    if not name.strip() or name.strip() != name:
        raise ValueError(f"Schedule name {name!r} must be non-empty without surrounding spaces.")
    if cron is None and min_new_images is None and iou_below is None:
        raise ValueError(f"Schedule {name!r} needs --cron, a condition (--min-new-images, --iou-below), or both.")
    if cron is not None:
        check_cron(cron)
    if min_new_images is not None and min_new_images < 1:
        raise ValueError(f"--min-new-images must be 1 or more, not {min_new_images}.")
    if iou_class is not None and iou_below is None:
        raise ValueError(f"--iou-class {iou_class!r} needs --iou-below THRESHOLD.")
    if iou_below is not None and not 0 < iou_below <= 1:
        raise ValueError(f"--iou-below {iou_below} must lie in (0, 1].")
    schedule = Schedule(name, os.path.abspath(spec), cron, min_new_images, iou_below, iou_class,
                        iso(now or utc_now()))
    conditions.check_spec_for(schedule)
    return store.add(schedule)


class Scheduler:
    """Checks every schedule of `store` against the clock `now` (UTC) and fires through `fire`."""

    def __init__(self, store: ScheduleStore, *, fire: FireFn | None = None, now: Callable[[], datetime] = utc_now,
                 address: str | None = None, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.store, self.now, self.address, self.interval_s = store, now, address, interval_s
        self.fire = fire or default_fire

    def check(self) -> list[Outcome]:
        """One pass: fire what is due now. A schedule that cannot be checked is logged; the others go on."""
        outcomes = []
        for schedule in self.store.list():
            try:
                outcome = self._check_cron(schedule) if schedule.cron else self._check_conditions(schedule)
            except Exception as exc:
                log.error("schedule %s could not be checked: %s", schedule.name, redact(str(exc)))
                outcome = Outcome(schedule.name, "-", "error", {"error": redact(str(exc))})
            if outcome is not None:
                log.info("%s", outcome.line())
                outcomes.append(outcome)
        return outcomes

    def due_slots(self, schedule: Schedule, now: datetime) -> tuple[datetime | None, list[datetime]]:
        """(latest cron slot due and not yet recorded, older unrecorded slots since then); (None, []) if none due."""
        last = self.store.last_cron_slot(schedule)
        reference = max(parse_time(schedule.created_at), parse_time(last)) if last else parse_time(schedule.created_at)
        latest = croniter(schedule.cron, now + timedelta(seconds=1)).get_prev(datetime)
        if latest <= reference:
            return None, []
        missed, slots = [], croniter(schedule.cron, reference)
        while len(missed) <= MAX_MISSED_RECORDS and (slot := slots.get_next(datetime)) < latest:
            missed.append(slot)
        return latest, missed

    def next_wakeup(self) -> datetime:
        """The earliest next cron slot, or now + interval when a condition-only schedule exists (or none at all)."""
        now = self.now()
        times = [croniter(s.cron, now).get_next(datetime) for s in self.store.list() if s.cron]
        if not times or any(not s.cron for s in self.store.list()):
            times.append(now + timedelta(seconds=self.interval_s))
        return min(times)

    def run(self, stop: threading.Event | None = None, *, wait: Callable[[float], bool] | None = None,
            max_sleep_s: float = 3600.0) -> None:
        """Check, sleep until the next due time, repeat until `stop` is set (`wait(seconds)` returns True to stop)."""
        stop = stop or threading.Event()
        wait = wait or stop.wait
        while not stop.is_set():
            self.check()
            seconds = min(max((self.next_wakeup() - self.now()).total_seconds(), 1.0), max_sleep_s)
            log.info("next check at %s", iso(self.now() + timedelta(seconds=seconds)))
            if wait(seconds):
                break

    def _check_cron(self, schedule: Schedule) -> Outcome | None:
        now = self.now()
        latest, missed = self.due_slots(schedule, now)
        if latest is None:
            return None
        slot = iso(latest)
        if not self.store.claim(schedule.name, slot, now):
            return None  # another scheduler took this slot
        for old in missed[:MAX_MISSED_RECORDS]:
            self.store.claim(schedule.name, iso(old), now, status=MISSED)
        extra = {"missed_slots": len(missed)} if missed else {}
        if len(missed) > MAX_MISSED_RECORDS:
            extra["missed_slots"] = f"more than {MAX_MISSED_RECORDS}"
        check = self._conditions(schedule)
        if not check.met:
            detail = {"reasons": check.reasons, **extra}
            self.store.finish(schedule.name, slot, CONDITION_FALSE, self.now(), detail, check.labelled_images)
            return Outcome(schedule.name, slot, CONDITION_FALSE, detail)
        return self._fire(schedule, slot, check, extra)

    def _check_conditions(self, schedule: Schedule) -> Outcome | None:
        check = self._conditions(schedule)
        slot = "when:" + check.evidence
        if not check.met or self.store.has_slot(schedule.name, slot):
            log.info("%s: not due (%s)", schedule.name, "; ".join(check.reasons) or "already fired for this data")
            return None
        if not self.store.claim(schedule.name, slot, self.now(), labelled_images=check.labelled_images):
            return None
        return self._fire(schedule, slot, check, {})

    def _conditions(self, schedule: Schedule) -> conditions.Check:
        last = self.store.last_success(schedule.name) if schedule.min_new_images is not None else None
        return conditions.evaluate_conditions(schedule, last.labelled_images if last else None)

    def _fire(self, schedule: Schedule, slot: str, check: conditions.Check, extra: dict[str, Any]) -> Outcome:
        detail: dict[str, Any] = {"reasons": check.reasons, **extra} if check.reasons else dict(extra)
        log.info("firing %s for %s (%s)", schedule.name, slot, schedule.spec)
        try:
            result = self.fire(schedule.spec, self.address)
            detail["result"] = result
            failed = str((result or {}).get("status", "")).lower() in _FAILED_STATUSES
            status = FAILED if failed else OK
        except Exception as exc:  # the firing's failure is its outcome; the scheduler goes on
            detail["error"] = f"{type(exc).__name__}: {redact(str(exc))[:500]}"
            status = FAILED
        self.store.finish(schedule.name, slot, status, self.now(), detail, check.labelled_images)
        return Outcome(schedule.name, slot, status, detail)

