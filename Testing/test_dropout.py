"""The UNet's CPU dropout (16-bit lanes of 64-bit draws) against the definition of inverted dropout, and the
dense gradient handed to the UNet's upsampling."""
import math

import pytest
import torch
from torch import nn

from semiseg.networks import dropout as fast
from semiseg.networks.unet2d import UNet2D


def test_kept_fraction_is_the_rate_rounded_to_a_16_bit_lane():
    assert fast.kept_fraction(0.05) == 1 - 3277 / 65536     # 0.05 * 65536 = 3276.8
    assert fast.kept_fraction(0.3) == 1 - 19661 / 65536     # 19660.8
    assert fast.kept_fraction(0.5) == 0.5
    assert abs(fast.kept_fraction(0.1) - 0.9) < 1 / 65536


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_each_element_is_kept_independently_with_the_kept_fraction(p):
    """Over 4.2 M elements: the kept share within 5 standard deviations of ``kept_fraction(p)``; two elements
    from the same 64-bit draw (lanes 0 and 1) and from neighbouring draws are both kept with probability q^2;
    kept elements are scaled by exactly 1 / q."""
    torch.manual_seed(0)
    x = torch.ones(16, 16, 128, 128)
    kept = fast.dropout(x, p) != 0
    q, n = fast.kept_fraction(p), kept.numel()
    assert abs(kept.float().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / n)
    lanes = kept.flatten().view(-1, 4)
    for a, b in ((lanes[:, 0], lanes[:, 1]), (lanes[:-1, 3], lanes[1:, 0])):
        both = (a & b).float().mean().item()
        assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / a.numel())
    y = fast.dropout(x, p)
    assert torch.equal(y.unique(), torch.tensor([0.0, 1 / q], dtype=torch.float32))


def test_output_and_gradient_are_the_scaled_mask():
    """y = x * keep / q and dx = dy * keep / q, with the mask ``keep_mask`` draws from the same seed."""
    x = torch.randn(3, 8, 20, 20, requires_grad=True)
    p, q = 0.3, fast.kept_fraction(0.3)
    torch.manual_seed(5)
    keep = fast.keep_mask(x, p)
    torch.manual_seed(5)
    y = fast.dropout(x, p)
    assert torch.equal(y, torch.where(keep, x * (1 / q), 0))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(keep, g * (1 / q), 0))


def test_mask_follows_the_layout_the_seed_and_the_mode():
    x = torch.randn(2, 16, 24, 24).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(1)
    a = fast.dropout(x, 0.2)
    torch.manual_seed(1)
    b = fast.dropout(x, 0.2)
    assert torch.equal(a, b) and not torch.equal(a, fast.dropout(x, 0.2))   # seeded; fresh each call
    assert a.dtype == torch.bfloat16 and a.is_contiguous(memory_format=torch.channels_last)
    sliced = x[:, ::2]                                      # not dense: the mask is laid out by shape
    assert fast.dropout(sliced, 0.2).shape == sliced.shape
    module = fast.Dropout(0.2)
    assert isinstance(module, nn.Dropout) and module.state_dict() == {}
    assert module.eval()(x) is x and fast.dropout(x, 0.0) is x


def _upsampling_gradient_layouts(dense: bool, monkeypatch) -> list[bool]:
    """Whether each upsampling's output gradient is dense channels-last, and the parameter gradients."""
    from semiseg.networks import unet2d
    if not dense:
        monkeypatch.setattr(unet2d._DenseGradient, "apply", lambda t: t)
    torch.manual_seed(0)
    net = UNet2D(1, 4).to(memory_format=torch.channels_last)
    layouts = []
    for m in net.modules():
        if isinstance(m, nn.Upsample):
            m.register_full_backward_hook(lambda mod, gin, gout: layouts.append(
                gout[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(1)
    net(x).square().mean().backward()
    monkeypatch.undo()
    return layouts, [p.grad for p in net.parameters()]


def test_upsampling_backward_gets_a_dense_gradient_with_the_same_values(monkeypatch):
    """Through ``torch.cat`` the upsampling's output gradient is a channel slice (not dense); the UNet hands it
    on dense, and every parameter gradient is bit-identical to the network without that step."""
    plain_layouts, plain_grads = _upsampling_gradient_layouts(False, monkeypatch)
    dense_layouts, dense_grads = _upsampling_gradient_layouts(True, monkeypatch)
    assert plain_layouts == [False] * 4
    assert dense_layouts == [True] * 4
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, dense_grads))
