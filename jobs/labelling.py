"""`segmill select`: choose what to label next from a results table and write the labelling packages."""
from __future__ import annotations

from segmill.pipeline.common.storage import redact


def run_select(results: str, output: str, *, n: int, strategy: str, hard_classes: str | None = None,
               model: str | None = None, classes: str | None = None, tracking_uri: str | None = None,
               endpoint_url: str | None = None) -> list[str]:
    """Select, write the packages, and return the lines that tell a person what happened."""
    from segmill.jobs.show import job_palette
    from segmill.pipeline.bulk.record import read_job_record
    from segmill.pipeline.bulk.results import table_classes
    from segmill.pipeline.common import settings
    from segmill.pipeline.common.classes import ClassFile, load_class_file
    from segmill.pipeline.loop.labelling import write_package
    from segmill.pipeline.loop.select import select

    names = table_classes(results, endpoint_url=endpoint_url)
    if not names:
        raise ValueError(f"Results {redact(results)} hold no part-*.parquet files; is it the output of a segment job?")
    hard, source = [], "none"
    if hard_classes:
        hard, source = [c.strip() for c in hard_classes.split(",") if c.strip()], "named"
    elif model:
        from segmill.pipeline.tracking import check_reachable, latest_evaluation
        from segmill.pipeline.train.bootstrap import hard_classes_from_iou

        tracking = settings.tracking_uri(tracking_uri)
        if not tracking:
            raise ValueError("--model needs --tracking-uri (or $MLFLOW_TRACKING_URI) to find its champion's evaluation.")
        check_reachable(tracking)
        evaluation = latest_evaluation(tracking, model)
        if evaluation is None:
            raise ValueError(f"Model {model} has no champion evaluation to take hard classes from; name them with "
                             "--hard-classes.")
        hard = hard_classes_from_iou({c: evaluation.iou.get(c) for c in names}, 3)
        source = f"{model}'s {evaluation.kind} run {evaluation.run_id}"
    class_file = load_class_file(classes, endpoint_url=endpoint_url) if classes else \
        ClassFile(names, tuple(job_palette(results, names, endpoint_url=endpoint_url)))
    if class_file.names != names:
        raise ValueError(f"Class file {redact(classes)} names {list(class_file.names)}, but the results hold "
                         f"{list(names)}.")
    selection = select(results, n, strategy=strategy, hard_classes=hard, endpoint_url=endpoint_url)
    try:
        version = read_job_record(results, endpoint_url).get("model_version", "")
    except (OSError, ValueError):
        version = ""
    written = write_package(selection, results, output, class_file, model_version=version, endpoint_url=endpoint_url)
    top = selection.table.slice(0, 3).to_pylist()
    lines = [f"selected {selection.table.num_rows} of {selection.candidates} unlabelled images ({strategy}; hard "
             f"classes: {', '.join(hard) or '-'} from {source})"]
    lines += [f"  {r['rank']}. {r['image_uri']} (score {r['score']:.3f}: {r['reasons']})" for r in top]
    lines += [f"  manifest: {written['manifest']} (and .csv)",
              f"  CVAT: create a task from {written['cvat']}/images, then upload {written['cvat']}/prelabels.zip "
              "as 'Segmentation mask 1.1' annotations",
              f"  Label Studio: import {written['label_studio']} with the interface in label_config.xml beside it",
              "  when labelled: segmill labels import EXPORT.zip --classes CLASSES --output LABELS"]
    return lines
