"""Loss primitives, schedules and the baseline methods' losses against their definitions."""
import math

import pytest
import torch

from semiseg.losses import dice_loss_foreground, dice_loss_multiclass, supervised_loss
from semiseg.schedules import consistency_weight, ema_decay, learning_rate, sigmoid_rampup


def test_multiclass_dice_hand_computed():
    # two pixels, two classes: p = [[0.8, 0.2], [0.4, 0.6]] (pixel-major), labels [0, 1]
    probs = torch.tensor([[0.8, 0.4], [0.2, 0.6]]).reshape(1, 2, 2, 1)
    label = torch.tensor([0, 1]).reshape(1, 2, 1)
    c0 = 1 - (2 * 0.8 + 1e-5) / (0.8 ** 2 + 0.4 ** 2 + 1 + 1e-5)
    c1 = 1 - (2 * 0.6 + 1e-5) / (0.2 ** 2 + 0.6 ** 2 + 1 + 1e-5)
    assert dice_loss_multiclass(probs, label).item() == pytest.approx((c0 + c1) / 2, abs=1e-7)


def test_foreground_dice_is_binary_dice_on_class_one():
    probs = torch.tensor([[0.8, 0.4, 0.1], [0.2, 0.6, 0.9]]).reshape(1, 2, 3, 1, 1)
    label = torch.tensor([0, 1, 1]).reshape(1, 3, 1, 1)
    inter = 0.6 + 0.9
    expected = 1 - (2 * inter + 1e-5) / (0.2 ** 2 + 0.6 ** 2 + 0.9 ** 2 + 2 + 1e-5)
    assert dice_loss_foreground(probs, label).item() == pytest.approx(expected, abs=1e-7)


def test_supervised_loss_conventions():
    torch.manual_seed(0)
    logits, label = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    ce = torch.nn.functional.cross_entropy(logits, label)
    dice = dice_loss_multiclass(torch.softmax(logits, 1), label)
    assert supervised_loss(logits, label, "half_ce_dice").item() == pytest.approx(0.5 * (ce + dice).item(), abs=1e-6)
    assert supervised_loss(logits, label, "dice").item() == pytest.approx(dice.item(), abs=1e-6)
    assert supervised_loss(logits, label, "ce_plus_dice").item() == pytest.approx((ce + dice).item(), abs=1e-6)


def test_rampup_and_schedules():
    assert sigmoid_rampup(0, 200) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(100, 200) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(500, 200) == 1.0 and sigmoid_rampup(3, 0) == 1.0
    # iter // 150 convention: constant inside a 150-iteration block, full weight at 150·R
    assert consistency_weight(149, 0.1, 30000) == consistency_weight(0, 0.1, 30000) == pytest.approx(0.1 * math.exp(-5))
    assert consistency_weight(15000, 0.1, 30000) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    assert consistency_weight(30000, 0.1, 30000) == pytest.approx(0.1)
    assert learning_rate(0, 0.01, "poly", 100) == 0.01
    assert learning_rate(50, 0.01, "poly", 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert learning_rate(2499, 0.01, "step", 15000) == 0.01
    assert learning_rate(5000, 0.01, "step", 15000) == pytest.approx(0.0001)
    assert learning_rate(7000, 0.01, "constant", 15000) == 0.01
    assert ema_decay(0, 0.99) == 0.0 and ema_decay(9, 0.99) == pytest.approx(0.9) and ema_decay(1000, 0.99) == 0.99
