"""The scheduler against a clock the tests step: due, not due, restarts, missed slots, two schedulers, conditions.

Firings go through `record_firing`, a real but tiny firing function (it loads the spec and writes a marker file):
running a full training at every firing would make these tests minutes long and say nothing more about *when*
the scheduler fires, which is what they check.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from segmill.jobs.scheduling.conditions import load_spec
from segmill.jobs.scheduling.scheduler import (
    MAX_MISSED_RECORDS,
    Scheduler,
    add_schedule,
)
from segmill.jobs.scheduling.store import (
    CONDITION_FALSE,
    FAILED,
    MISSED,
    OK,
    ScheduleStore,
)
from segmill.pipeline.common.scenes import SceneSpec

SUNDAY_3AM = datetime(2025, 1, 5, 3, 0, tzinfo=timezone.utc)
WEEKLY = "0 3 * * 0"
_SMALL = SceneSpec(min_side=32, max_side=48)  # small scenes keep the listing tests fast


class Clock:
    def __init__(self, start: datetime) -> None:
        self.time = start

    def __call__(self) -> datetime:
        return self.time

    def step(self, **delta: float) -> None:
        self.time += timedelta(**delta)


class Firings:
    """A tiny firing function: check the spec loads, write a marker, return what run_spec would."""

    def __init__(self, folder: Path, fail: bool = False) -> None:
        self.folder, self.fail, self.calls = folder, fail, []

    def __call__(self, spec: str, address: str | None) -> dict:
        data = load_spec(spec)
        self.calls.append((spec, address))
        if self.fail:
            raise RuntimeError("training crashed")
        marker = self.folder / f"fired-{len(self.calls)}.json"
        marker.write_text(json.dumps({"spec": spec}))
        return {"job_id": f"job-{len(self.calls)}", "kind": data["kind"], "status": "succeeded", "output": str(marker)}


def _spec(tmp_path: Path, **extra) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"kind": "train", "images": str(tmp_path / "data" / "images"),
                                    "labels": str(tmp_path / "data" / "labels"),
                                    "classes": str(tmp_path / "data" / "classes.yaml"), **extra}))
    return str(path)


@pytest.fixture()
def store(tmp_path: Path) -> ScheduleStore:
    return ScheduleStore(tmp_path / "state")


def _weekly(store: ScheduleStore, tmp_path: Path, created: datetime) -> None:
    add_schedule(store, "weekly", _spec(tmp_path), cron=WEEKLY, now=created)


def test_not_due_before_the_first_slot_then_fires_once(store: ScheduleStore, tmp_path: Path) -> None:
    clock, fire = Clock(SUNDAY_3AM - timedelta(days=2)), Firings(tmp_path)
    _weekly(store, tmp_path, clock())
    scheduler = Scheduler(store, fire=fire, now=clock)
    assert scheduler.check() == [] and fire.calls == []
    clock.step(days=1, hours=23, minutes=59)
    assert scheduler.check() == [], "one minute before the slot is not due"
    clock.step(minutes=1, seconds=30)
    [outcome] = scheduler.check()
    assert (outcome.slot, outcome.status) == ("2025-01-05T03:00:00+00:00", OK)
    assert outcome.detail["result"]["status"] == "succeeded"
    clock.step(minutes=10)
    assert scheduler.check() == [] and len(fire.calls) == 1
    assert scheduler.next_wakeup() == SUNDAY_3AM + timedelta(days=7)


def test_a_restarted_scheduler_never_fires_the_same_slot_again(store: ScheduleStore, tmp_path: Path) -> None:
    clock, fire = Clock(SUNDAY_3AM - timedelta(hours=1)), Firings(tmp_path)
    _weekly(store, tmp_path, clock())
    clock.step(hours=1)
    assert len(Scheduler(store, fire=fire, now=clock).check()) == 1
    restarted = Scheduler(ScheduleStore(tmp_path / "state"), fire=fire, now=clock)
    assert restarted.check() == [] and len(fire.calls) == 1
    clock.step(days=7)
    assert [o.status for o in restarted.check()] == [OK] and len(fire.calls) == 2


def test_missed_slots_catch_up_once_and_the_older_ones_are_recorded_as_missed(store: ScheduleStore, tmp_path: Path) -> None:
    clock, fire = Clock(SUNDAY_3AM - timedelta(hours=1)), Firings(tmp_path)
    _weekly(store, tmp_path, clock())
    clock.step(days=14, hours=5)  # down for three slots: Jan 5, 12 and 19
    [outcome] = Scheduler(store, fire=fire, now=clock).check()
    assert outcome.slot == "2025-01-19T03:00:00+00:00" and outcome.detail["missed_slots"] == 2
    assert len(fire.calls) == 1
    assert [(f.slot[:10], f.status) for f in store.firings("weekly")] == \
        [("2025-01-19", OK), ("2025-01-05", MISSED), ("2025-01-12", MISSED)]


def test_a_long_outage_records_a_bounded_number_of_missed_slots(store: ScheduleStore, tmp_path: Path) -> None:
    clock, fire = Clock(SUNDAY_3AM), Firings(tmp_path)
    add_schedule(store, "minutely", _spec(tmp_path), cron="* * * * *", now=clock())
    clock.step(days=2)
    [outcome] = Scheduler(store, fire=fire, now=clock).check()
    assert len(fire.calls) == 1 and outcome.detail["missed_slots"] == f"more than {MAX_MISSED_RECORDS}"
    assert sum(f.status == MISSED for f in store.firings()) == MAX_MISSED_RECORDS


def test_two_schedulers_on_one_state_fire_a_slot_once(store: ScheduleStore, tmp_path: Path) -> None:
    clock, fire = Clock(SUNDAY_3AM - timedelta(hours=1)), Firings(tmp_path)
    _weekly(store, tmp_path, clock())
    clock.step(hours=2)
    first, second = Scheduler(store, fire=fire, now=clock), Scheduler(ScheduleStore(tmp_path / "state"), fire=fire, now=clock)
    assert len(first.check()) + len(second.check()) == 1 and len(fire.calls) == 1


def test_a_failed_firing_is_recorded_and_the_next_slot_tries_again(store: ScheduleStore, tmp_path: Path) -> None:
    clock, failing = Clock(SUNDAY_3AM - timedelta(hours=1)), Firings(tmp_path, fail=True)
    _weekly(store, tmp_path, clock())
    clock.step(hours=1)
    scheduler = Scheduler(store, fire=failing, now=clock, address="ray://head:10001")
    [outcome] = scheduler.check()
    assert outcome.status == FAILED and "training crashed" in outcome.detail["error"]
    assert failing.calls[0][1] == "ray://head:10001"
    assert scheduler.check() == [], "a failed slot is not retried"
    clock.step(days=7)
    scheduler.fire = Firings(tmp_path)
    assert [o.status for o in scheduler.check()] == [OK]


def test_the_loop_sleeps_until_the_next_slot(store: ScheduleStore, tmp_path: Path) -> None:
    clock, fire = Clock(SUNDAY_3AM - timedelta(days=1)), Firings(tmp_path)
    _weekly(store, tmp_path, clock())
    sleeps: list[float] = []

    def wait(seconds: float) -> bool:  # the clock moves by what the scheduler asked to sleep
        sleeps.append(seconds)
        clock.step(seconds=seconds)
        return len(sleeps) == 3

    Scheduler(store, fire=fire, now=clock).run(wait=wait, max_sleep_s=7 * 86400)
    assert sleeps == [86400.0, 7 * 86400.0, 7 * 86400.0]
    assert [f.slot[:10] for f in store.firings()] == ["2025-01-05", "2025-01-12"]


def test_add_rejects_bad_input(store: ScheduleStore, tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    with pytest.raises(ValueError, match="not valid"):
        add_schedule(store, "x", spec, cron="every sunday")
    with pytest.raises(ValueError, match="needs --cron, a condition"):
        add_schedule(store, "x", spec)
    with pytest.raises(ValueError, match="cannot be read"):
        add_schedule(store, "x", str(tmp_path / "missing.yaml"), cron=WEEKLY)
    with pytest.raises(ValueError, match="no 'register' model"):
        add_schedule(store, "x", spec, iou_below=0.5)
    (tmp_path / "seg.yaml").write_text("kind: segment\ninput: a\noutput: b\nmodel: m\n")
    with pytest.raises(ValueError, match="data conditions need a train or improve spec"):
        add_schedule(store, "x", str(tmp_path / "seg.yaml"), min_new_images=5)
    add_schedule(store, "x", spec, cron=WEEKLY)
    with pytest.raises(ValueError, match="already exists"):
        add_schedule(store, "x", spec, cron=WEEKLY)
    store.remove("x")
    with pytest.raises(ValueError, match="does not exist"):
        store.remove("x")


# --- conditions -------------------------------------------------------------------------------------------------

def test_new_labelled_images_fire_once_per_n_new(store: ScheduleStore, tmp_path: Path) -> None:
    from segmill.pipeline.common.scenes import write_scenes

    write_scenes(str(tmp_path / "data"), 3, seed=1, spec=_SMALL)
    (tmp_path / "data" / "images" / "unlabelled.png").write_bytes((tmp_path / "data" / "images" / "scene_00000.png").read_bytes())
    clock, fire = Clock(SUNDAY_3AM), Firings(tmp_path)
    add_schedule(store, "data", _spec(tmp_path), min_new_images=3, now=clock())
    scheduler = Scheduler(store, fire=fire, now=clock)
    [outcome] = scheduler.check()
    assert outcome.status == OK and outcome.slot == "when:images=3"
    assert scheduler.check() == [], "the same data never fires twice"
    write_scenes(str(tmp_path / "data"), 2, seed=1, spec=_SMALL, start=3)
    assert scheduler.check() == [], "2 new labelled images are fewer than 3"
    assert len(Scheduler(ScheduleStore(tmp_path / "state"), fire=fire, now=clock).check()) == 0
    write_scenes(str(tmp_path / "data"), 1, seed=1, spec=_SMALL, start=5)
    [outcome] = scheduler.check()
    assert outcome.slot == "when:images=6" and len(fire.calls) == 2
    assert store.last_success("data").labelled_images == 6


def test_cron_with_a_false_condition_spends_the_slot_without_firing(store: ScheduleStore, tmp_path: Path) -> None:
    from segmill.pipeline.common.scenes import write_scenes

    write_scenes(str(tmp_path / "data"), 2, seed=1, spec=_SMALL)
    clock, fire = Clock(SUNDAY_3AM - timedelta(hours=1)), Firings(tmp_path)
    add_schedule(store, "weekly-data", _spec(tmp_path), cron=WEEKLY, min_new_images=3, now=clock())
    clock.step(hours=1)
    [outcome] = Scheduler(store, fire=fire, now=clock).check()
    assert outcome.status == CONDITION_FALSE and fire.calls == []
    assert "2 new labelled images" in outcome.detail["reasons"][0]
    write_scenes(str(tmp_path / "data"), 1, seed=1, spec=_SMALL, start=2)
    assert Scheduler(store, fire=fire, now=clock).check() == [], "the slot is spent"
    clock.step(days=7)
    assert [o.status for o in Scheduler(store, fire=fire, now=clock).check()] == [OK]


def _champion(tracking_uri: str, name: str, iou: dict[str, float]) -> str:
    import mlflow

    from segmill.pipeline.tracking import log_evaluation

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, source="file:///nowhere/model", run_id=None)
    client.set_registered_model_alias(name, "champion", version.version)
    return log_evaluation(tracking_uri, name, version.version, iou, miou=sum(iou.values()) / len(iou))


def test_champion_iou_conditions(store: ScheduleStore, tmp_path: Path) -> None:
    from segmill.pipeline.common.scenes import write_scenes

    write_scenes(str(tmp_path / "data"), 1, seed=1, spec=_SMALL)  # its classes.yaml names the classes
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    spec = _spec(tmp_path, register="roads", tracking_uri=tracking)
    clock, fire = Clock(SUNDAY_3AM), Firings(tmp_path)
    add_schedule(store, "pole", spec, iou_below=0.3, iou_class="pole", now=clock())
    add_schedule(store, "miou", spec, iou_below=0.5, now=clock())
    with pytest.raises(ValueError, match="Class 'lake' is not in"):
        add_schedule(store, "lake", spec, iou_below=0.5, iou_class="lake")
    scheduler = Scheduler(store, fire=fire, now=clock)
    assert sorted((o.schedule, o.slot) for o in scheduler.check()) == \
        [("miou", "when:evaluation=none"), ("pole", "when:evaluation=none")], "no champion: nothing to protect"
    _champion(tracking, "roads", {"road": 0.9, "pole": 0.6})
    assert scheduler.check() == [], "pole 0.6 and mIoU 0.75 are above the thresholds"
    run_id = _champion(tracking, "roads", {"road": 0.9, "pole": 0.2})
    [outcome] = scheduler.check()
    assert (outcome.schedule, outcome.slot) == ("pole", f"when:evaluation={run_id}")
    assert "champion IoU of pole 0.2000" in outcome.detail["reasons"][0]
    assert scheduler.check() == [], "the same evaluation never fires twice"


def test_a_schedule_that_cannot_be_checked_does_not_stop_the_others(store: ScheduleStore, tmp_path: Path) -> None:
    clock, fire = Clock(SUNDAY_3AM - timedelta(hours=1)), Firings(tmp_path)
    add_schedule(store, "broken", _spec(tmp_path), min_new_images=1, now=clock())  # its images folder is missing
    _weekly(store, tmp_path, clock())
    clock.step(hours=1)
    outcomes = {o.schedule: o for o in Scheduler(store, fire=fire, now=clock).check()}
    assert outcomes["broken"].status == "error" and "does not exist" in outcomes["broken"].detail["error"]
    assert outcomes["weekly"].status == OK

