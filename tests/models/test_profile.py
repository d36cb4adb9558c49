"""Model size and cost: parameter counts and FlopCounterMode GFLOPs against hand formulas."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from segmill.models import model_paper, profile
from segmill.models.profile import count_parameters, measure_gflops


def test_count_parameters_of_a_conv() -> None:
    assert count_parameters(nn.Conv2d(3, 8, 3)) == 3 * 8 * 9 + 8
    assert count_parameters(nn.BatchNorm2d(4)) == 8  # running stats are buffers, not parameters


def test_measure_gflops_of_a_conv_matches_the_hand_formula() -> None:
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
    out_h, out_w = (17 + 2 - 3) // 2 + 1, (20 + 2 - 3) // 2 + 1  # 9 x 10
    multiply_adds = 8 * out_h * out_w * 3 * 3 * 3
    assert measure_gflops(conv, 17, 20) == pytest.approx(2 * multiply_adds / 1e9)


def test_measure_gflops_restores_training_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    before = model[1].running_mean.clone()
    measure_gflops(model, 8, 8)
    assert model.training
    assert torch.equal(model[1].running_mean, before), "measured in eval mode: BatchNorm stats untouched"


def test_model_table_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    measured: list[tuple[str, int, int]] = []

    def fake_gflops(model: nn.Module, height: int = 512, width: int = 512) -> float:
        measured.append((type(model).__name__, height, width))  # a real 512x512 forward takes seconds on CPU
        return 1.5

    monkeypatch.setattr(profile, "measure_gflops", fake_gflops)
    (row,) = profile.model_table(["unet"], num_classes=3)
    params = pytest.approx(31.03, abs=0.05)  # millions: the paper's 64-channel U-Net
    assert row == {"name": "unet", "paper": model_paper("unet"), "params": params, "gflops_512": 1.5}
    assert "2015" in row["paper"]
    assert measured == [("UNet", 512, 512)]
