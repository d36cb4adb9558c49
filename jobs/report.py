"""The bulk job's HTML report, `OUTPUT/report.html`: what ran, the counts and errors by reason, the class
distribution, the confidence histogram, per-class IoU when labelled, and a gallery of the worst and the least
confident images with their panels and legend. One self-contained file (pipeline/common/report.py), written
beside the results wherever they are; every number comes from the results table through the ready answers
(jobs/query.py), so the report and `segmill query` agree.
"""
from __future__ import annotations

import logging

from segmill.jobs.query import class_distribution_sql, connect, iou_sql, table_classes
from segmill.jobs.show import job_palette, shown
from segmill.jobs.summary import error_reasons, reason_of
from segmill.pipeline.bulk.record import read_job_record
from segmill.pipeline.common import pictures
from segmill.pipeline.common.report import Section, picture, render, table
from segmill.pipeline.common.storage import join_uri, open_fs, redact

log = logging.getLogger(__name__)
REPORT_FILE = "report.html"
GALLERY = 6  # images in each gallery
THUMBNAIL = 360  # the longer side of a gallery panel, pixels


def write_report(output: str, *, endpoint_url: str | None = None, gallery: int = GALLERY) -> str:
    """Write OUTPUT/report.html and return its URI."""
    html = build_report(output, endpoint_url=endpoint_url, gallery=gallery)
    uri = join_uri(output, REPORT_FILE)
    fs, path = open_fs(uri, endpoint_url=endpoint_url)
    with fs.open(path, "w") as f:
        f.write(html)
    return uri


def try_write_report(output: str, *, endpoint_url: str | None = None) -> str | None:
    """`write_report`, but a report that cannot be written is a warning: the table is the job's result."""
    try:
        return write_report(output, endpoint_url=endpoint_url)
    except Exception as exc:
        log.warning("the report of %s could not be written: %s", redact(output), redact(str(exc))[:300])
        return None


def build_report(output: str, *, endpoint_url: str | None = None, gallery: int = GALLERY) -> str:
    con = connect(output, endpoint_url=endpoint_url)
    classes = table_classes(con)
    palette = job_palette(output, classes, endpoint_url=endpoint_url)
    try:
        record = read_job_record(output, endpoint_url)
    except (OSError, ValueError):
        record = {}
    counts = dict(con.sql("SELECT status, count(*) FROM results GROUP BY status").fetchall())
    rows, ok, errors = sum(counts.values()), counts.get("ok", 0), counts.get("error", 0)
    labelled = con.sql("SELECT count(*) FROM results WHERE status = 'ok' AND union_pixels IS NOT NULL").fetchall()[0][0]
    spec = record.get("spec", {})
    facts = [("job", record.get("job_id")), ("input", spec.get("input")), ("output", redact(output)),
             ("model", f"{record.get('model_name')} {record.get('model_version')}" if record else None),
             ("finished", record.get("finished_at")), ("images", rows), ("ok", ok), ("errors", errors),
             ("labelled", labelled), ("images per second (last run)", record.get("images_per_second"))]
    sections = [_errors(con, errors), _distribution(con, classes, palette), _confidence(con)]
    if labelled:
        sections.append(_iou(con, classes, palette))
    sections += _galleries(con, classes, palette, labelled=bool(labelled), count=gallery, endpoint_url=endpoint_url)
    return render(f"segmill bulk job {record.get('job_id', '')}".strip(), facts, [s for s in sections if s])


def _errors(con, errors: int) -> Section | None:
    if not errors:
        return None
    found = con.sql("SELECT error, image_uri, error_kind FROM results WHERE status = 'error' ORDER BY image_uri").fetchall()
    reasons = error_reasons([r[0] for r in found], [r[1] for r in found])
    examples: dict[str, tuple[str, str]] = {}
    for message, uri, kind in found:
        examples.setdefault(reason_of(message, uri), (uri, kind or "-"))
    return Section("errors", f"Errors ({errors} images)", notes=[
        "Each error row names its image and why; input errors are the files' own, infrastructure errors are retried "
        "when the job runs again."],
        tables=[table("errors-table", ["reason", "images", "kind", "example"],
                      [[reason, count, *examples[reason][::-1]] for reason, count in reasons.most_common()])])


def _distribution(con, classes, palette) -> Section:
    rows = con.sql(class_distribution_sql(classes)).fetchall()
    shares = [r[2] or 0.0 for r in rows]
    return Section("classes", "Predicted classes", notes=["Share of all predicted pixels, and the images where a class "
                                                          "appears at all (segmill query OUTPUT --answer class-distribution)."],
                   tables=[table("classes-table", ["class", "pixels", "pixel share", "images"], rows)],
                   pictures=[picture(pictures.bars({"pixel share": shares}, classes, title="predicted pixel share",
                                                   xlabel="share of predicted pixels", colours=palette),
                                     "Share of predicted pixels per class")])


def _confidence(con) -> Section:
    values = [r[0] for r in con.sql("SELECT confidence_mean FROM results WHERE status = 'ok'").fetchall()]
    return Section("confidence", "Confidence", notes=["Each image's mean softmax confidence; the least confident are "
                                                      "the first candidates for labelling."],
                   pictures=[picture(pictures.histogram(values, title="mean confidence per image",
                                                        xlabel="mean confidence"), "Mean confidence per image")])


def _iou(con, classes, palette) -> Section:
    rows = con.sql(iou_sql(classes)).fetchall()
    per_class = [r for r in rows if r[0] != "mIoU"]
    return Section("iou", "Per-class IoU (labelled images)", notes=[
        "Intersections and unions summed over the labelled images, never per-image IoU averaged (segmill query "
        "OUTPUT --answer iou); '-' where a class was neither labelled nor predicted."],
        tables=[table("iou-table", ["class", "intersection pixels", "union pixels", "IoU"], rows)],
        pictures=[picture(pictures.bars({"IoU": [r[3] for r in per_class]}, [r[0] for r in per_class],
                                        title="IoU per class", xlabel="IoU", colours=palette), "IoU per class")])


def _galleries(con, classes, palette, *, labelled: bool, count: int, endpoint_url) -> list[Section]:
    queries = []
    if labelled:
        queries.append(("worst", f"The {count} labelled images with the lowest mIoU",
                        "SELECT image_uri FROM results WHERE status = 'ok' AND miou IS NOT NULL "
                        f"ORDER BY miou, image_uri LIMIT {count}"))
    queries.append(("least-confident", f"The {count} least-confident images",
                    f"SELECT image_uri FROM results WHERE status = 'ok' ORDER BY confidence_mean, image_uri LIMIT {count}"))
    sections, drawn = [], {}  # an image in both galleries is drawn once
    for id, title, sql in queries:
        section = Section(id, title)
        for (image_uri,) in con.sql(sql).fetchall():
            if image_uri not in drawn:
                try:
                    found = shown(con, image_uri, classes, palette, endpoint_url=endpoint_url)
                except (OSError, ValueError) as exc:  # the image moved since the job: say so in its place
                    section.notes.append(f"{redact(image_uri)}: {redact(str(exc))[:200]}")
                    continue
                jpeg = pictures.panels(found.panels, classes, palette, present=found.present, caption=found.caption,
                                       max_side=THUMBNAIL, image_format="jpeg")
                drawn[image_uri] = picture(jpeg, f"{redact(image_uri)} ({found.caption.split(': ', 1)[-1]})",
                                           "image/jpeg")
            section.pictures.append(drawn[image_uri])
        sections.append(section)
    return sections
