"""What a person reads when a job ends: the counts, the errors by reason, the scores with labels, where the results
and the report are, and the command to run next."""
from __future__ import annotations

import re
from collections import Counter

import pyarrow.compute as pc

from segmill.models.iou import nanmean
from segmill.pipeline.bulk.record import JobRecord
from segmill.pipeline.bulk.results import committed_rows, dataset_iou, table_classes
from segmill.pipeline.common.storage import join_uri, redact

REASONS_SHOWN = 5


def reason_of(message: str | None, uri: str | None) -> str:
    """What an error message says, with the file's name and any number taken out (so like errors group); the
    name becomes `<image>`, so the reason still reads as a sentence."""
    return re.sub(r"\d+", "#", (message or "").replace(uri or "\0", "<image>").strip())


def error_reasons(messages: list[str], uris: list[str]) -> Counter:
    """Error messages counted by `reason_of`."""
    return Counter(reason_of(message, uri) for message, uri in zip(messages, uris))


def segment_summary(record: JobRecord, output: str, *, endpoint_url: str | None = None, seconds: float,
                    report: str | None = None) -> list[str]:
    lines = [f"job {record.job_id}: {record.rows} rows ({record.ok_rows} ok, {record.error_rows} errors), "
             f"{record.processed_this_run} segmented this run in {seconds:.0f} s ({record.images_per_second:.1f} img/s) "
             f"-> {redact(output)}"]
    rows = committed_rows(output, endpoint_url, ["image_uri", "status", "error", "union_pixels"])
    errors = rows.filter(pc.equal(rows["status"], "error")) if rows.num_rows else rows
    if errors.num_rows:
        reasons = error_reasons(errors["error"].to_pylist(), errors["image_uri"].to_pylist())
        shown = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(REASONS_SHOWN))
        more = f"; and {len(reasons) - REASONS_SHOWN} other reasons" if len(reasons) > REASONS_SHOWN else ""
        lines.append(f"  errors: {shown}{more}")
    if rows.num_rows and rows["union_pixels"].null_count < rows.num_rows:
        iou = dataset_iou(output, table_classes(output, endpoint_url=endpoint_url), endpoint_url=endpoint_url)
        per_class = ", ".join(f"{name} {value:.3f}" for name, value in iou.items() if value == value)
        lines.append(f"  with labels: mIoU {nanmean(list(iou.values())):.3f}; per class: {per_class}")
    lines.append(f"  results: {redact(join_uri(output, 'part-*.parquet'))}"
                 + (f"; report: {redact(report)}" if report else ""))
    answer = "errors" if errors.num_rows else "least-confident"
    lines.append(f"  next: segmill query {redact(output)} --answer {answer}")
    return lines
