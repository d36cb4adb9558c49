"""Metrics checked against scikit-learn, on random masks and on real DSB2018 masks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, jaccard_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from segmill.models import iou as numpy_iou
from segmill.models.metrics import (
    ConfusionAccumulator,
    SegmentationMetrics,
    confusion_matrix,
    intersection_and_union,
    iou_from_counts,
)
from testkit import DSB2018

IGNORE = 255


def random_pair(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int,
                ignore_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A (pred, target) pair of uint8 masks; target has ignore pixels sprinkled in."""
    target = rng.integers(0, num_classes, shape, dtype=np.uint8)
    pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, num_classes, shape)).astype(np.uint8)
    target[rng.random(shape) < ignore_fraction] = IGNORE
    return pred, target


def sklearn_figures(pred: np.ndarray, target: np.ndarray, num_classes: int) -> dict:
    valid = target != IGNORE
    t, p = target[valid].ravel(), pred[valid].ravel()
    labels = list(range(num_classes))
    return {
        "cm": sk_confusion_matrix(t, p, labels=labels),
        "iou": jaccard_score(t, p, labels=labels, average=None, zero_division=0.0),
        "acc": accuracy_score(t, p),
        "mean_class_acc": balanced_accuracy_score(t, p),
    }


@pytest.mark.parametrize("as_torch", [False, True])
def test_confusion_matrix_and_metrics_match_sklearn(as_torch: bool) -> None:
    rng = np.random.default_rng(0)
    pred, target = random_pair(rng, (3, 47, 61), num_classes=6)
    args = (torch.from_numpy(pred), torch.from_numpy(target)) if as_torch else (pred, target)
    cm = confusion_matrix(*args, num_classes=6)
    ref = sklearn_figures(pred, target, 6)
    assert cm.dtype == torch.int64 and cm.shape == (6, 6)
    np.testing.assert_array_equal(cm.numpy(), ref["cm"])
    m = SegmentationMetrics.from_confusion(cm)
    np.testing.assert_allclose(m.iou.numpy(), ref["iou"], rtol=1e-12)
    assert m.mean_iou == pytest.approx(ref["iou"].mean(), rel=1e-12)
    assert m.pixel_accuracy == pytest.approx(ref["acc"], rel=1e-12)
    assert m.mean_class_accuracy == pytest.approx(ref["mean_class_acc"], rel=1e-12)
    freq = ref["cm"].sum(1) / ref["cm"].sum()
    assert m.frequency_weighted_iou == pytest.approx(float((freq * ref["iou"]).sum()), rel=1e-12)


def test_absent_class_convention() -> None:
    # Class 2 is predicted but absent from ground truth (IoU 0); class 3 is absent from both (NaN).
    target = torch.tensor([0, 0, 1, 1, 1, IGNORE])
    pred = torch.tensor([0, 2, 1, 1, 0, 3])  # the 3 sits on an ignored pixel: not counted
    m = SegmentationMetrics.from_confusion(confusion_matrix(pred, target, 4))
    iou = m.iou
    assert iou[0] == pytest.approx(1 / 3) and iou[1] == pytest.approx(2 / 3)
    assert iou[2] == 0.0 and math.isnan(iou[3])
    assert m.mean_iou == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    acc = m.class_accuracy
    assert acc[0] == pytest.approx(1 / 2) and acc[1] == pytest.approx(2 / 3)
    assert math.isnan(acc[2]) and math.isnan(acc[3])
    assert m.mean_class_accuracy == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m.frequency_weighted_iou == pytest.approx(2 / 5 * 1 / 3 + 3 / 5 * 2 / 3)


def test_no_valid_pixel_gives_nan_means() -> None:
    target = torch.full((4, 4), IGNORE)
    m = SegmentationMetrics.from_confusion(confusion_matrix(torch.zeros(4, 4, dtype=torch.long), target, 3))
    assert int(m.confusion.sum()) == 0
    assert all(math.isnan(v) for v in m.summary().values())
    assert torch.isnan(m.iou).all()


def test_dataset_level_sums_matrices_not_means() -> None:
    # A large perfect image and a tiny wrong one: averaging per-image mIoU says 0.5, the dataset says less.
    images = [(np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8)),
              (np.zeros((1, 2), np.uint8), np.ones((1, 2), np.uint8))]
    acc = ConfusionAccumulator(2)
    per_image = []
    for pred, target in images:
        acc.update(pred, target)
        per_image.append(SegmentationMetrics.from_confusion(confusion_matrix(pred, target, 2)).mean_iou)
    assert np.mean(per_image) == pytest.approx(0.5)
    all_pred = np.concatenate([p.ravel() for p, _ in images])
    all_target = np.concatenate([t.ravel() for _, t in images])
    ref = jaccard_score(all_target, all_pred, labels=[0, 1], average=None)
    dataset = acc.compute()
    np.testing.assert_allclose(dataset.iou.numpy(), ref)
    assert dataset.mean_iou == pytest.approx(100 / 102 / 2)
    assert dataset.mean_iou != pytest.approx(np.mean(per_image))


def test_summed_per_image_counts_give_the_dataset_iou() -> None:
    rng = np.random.default_rng(2)
    pairs = [random_pair(rng, (int(rng.integers(5, 40)), int(rng.integers(5, 40))), 7) for _ in range(6)]
    acc = ConfusionAccumulator(7)
    inter, union = torch.zeros(7, dtype=torch.int64), torch.zeros(7, dtype=torch.int64)
    for pred, target in pairs:
        acc.update(pred, target)
        i, u = intersection_and_union(confusion_matrix(pred, target, 7))
        inter, union = inter + i, union + u
    np.testing.assert_array_equal(iou_from_counts(inter, union).numpy(), acc.compute().iou.numpy())
    numpy_inter, numpy_union = inter.numpy(), union.numpy()
    assert numpy_iou.mean_iou(numpy_inter, numpy_union) == pytest.approx(acc.compute().mean_iou, rel=1e-12)


def test_iou_from_counts_numpy_and_torch() -> None:
    inter, union = np.array([2, 0, 0]), np.array([4, 3, 0])
    out = iou_from_counts(inter, union)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, [0.5, 0.0, np.nan])
    out_t = iou_from_counts(torch.from_numpy(inter), torch.from_numpy(union))
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_array_equal(out_t.numpy(), [0.5, 0.0, np.nan])


def test_invalid_values_raise() -> None:
    target = torch.tensor([0, 1, 7, 9, IGNORE])
    with pytest.raises(ValueError, match=r"target holds values \[7, 9\]"):
        confusion_matrix(torch.zeros(5, dtype=torch.long), target, 3)
    with pytest.raises(ValueError, match=r"target holds values \[-1\]"):
        confusion_matrix(torch.zeros(1, 1, 2), torch.tensor([[[0, -1]]]), 3)
    with pytest.raises(ValueError, match="pred holds class ids"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="differs from target shape"):
        confusion_matrix(torch.zeros(3), torch.zeros(4), 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    pred, target = (torch.from_numpy(a) for a in random_pair(np.random.default_rng(3), (2, 64, 64), 5))
    on_gpu = confusion_matrix(pred.cuda(), target.cuda(), 5)
    assert on_gpu.is_cuda
    assert torch.equal(on_gpu.cpu(), confusion_matrix(pred, target, 5))


def test_real_dsb2018_masks_match_sklearn() -> None:
    if not (DSB2018 / "masks").is_dir():
        pytest.skip(f"DSB2018 not found at {DSB2018}; these real-mask checks need it beside the project.")
    from PIL import Image
    from scipy import ndimage

    files = sorted((DSB2018 / "masks").glob("*.png"))[::33][:20]
    acc = ConfusionAccumulator(2)
    preds, targets = [], []
    for i, path in enumerate(files):
        target = np.array(Image.open(path))
        if i % 2:  # an eroded, shifted ground truth
            pred = np.roll(ndimage.binary_erosion(target > 0, iterations=2), shift=(1, 2), axis=(0, 1))
        else:  # a brightness threshold of the real image
            grey = np.array(Image.open(DSB2018 / "images" / path.name).convert("L"))
            pred = grey > grey.mean()
        pred = pred.astype(np.uint8)
        target[:3, :] = IGNORE  # an ignored border strip
        acc.update(pred, target)
        ref = sklearn_figures(pred, target, 2)
        np.testing.assert_array_equal(confusion_matrix(pred, target, 2).numpy(), ref["cm"])
        preds.append(pred.ravel())
        targets.append(target.ravel())
    ref = sklearn_figures(np.concatenate(preds), np.concatenate(targets), 2)
    m = acc.compute()
    np.testing.assert_array_equal(m.confusion.numpy(), ref["cm"])
    np.testing.assert_allclose(m.iou.numpy(), ref["iou"], rtol=1e-12)
    assert m.pixel_accuracy == pytest.approx(ref["acc"], rel=1e-12)
    assert m.mean_class_accuracy == pytest.approx(ref["mean_class_acc"], rel=1e-12)
