"""Test-time augmentation (``tta``): its views are the training augmentation's orientations, each mapped back,
and the prediction is the argmax of the softmax averaged over them, in 2D and 3D, as trained or overridden."""
import numpy as np
import pytest
import torch

from semiseg.errors import SemiSegError
from semiseg.inference import network_probs, predict_2d, predict_3d, predict_volume, tta_views


def test_reflections_are_the_orientations_the_rot_flip_augmentation_produces():
    x = torch.arange(2 * 3 * 36, dtype=torch.float32).reshape(2, 3, 6, 6)
    views = tta_views("reflections", square=True)
    # the augmentation (data.transforms.random_generator_2d, SSL4MIS RandomGenerator): rot90 by k, then a flip
    augmented = [torch.flip(torch.rot90(x, k, (2, 3)), (2 + a,)) for k in range(4) for a in range(2)]
    distinct = []
    for t in augmented:
        if not any(torch.equal(t, d) for d in distinct):
            distinct.append(t)
    shown = [view(x) for view, _ in views]
    assert len(views) == 5 and torch.equal(shown[0], x)
    assert len(distinct) == 4 and all(any(torch.equal(s, d) for s in shown[1:]) for d in distinct)
    # no pure rotation: the network never sees one in training
    for k in (1, 2, 3):
        assert not any(torch.equal(s, torch.rot90(x, k, (2, 3))) for s in shown)
    for view, inverse in views:
        assert torch.equal(inverse(view(x)), x)


def test_views_on_a_rectangular_plane_and_unknown_modes():
    x = torch.rand(1, 2, 6, 4, 3)  # a 3D patch with x != y: transposes would change its shape
    views = tta_views("reflections", square=False)
    assert len(views) == 3 and len(tta_views("flips", square=True)) == 3 and len(tta_views("none", True)) == 1
    for view, inverse in views:
        assert view(x).shape == x.shape and torch.equal(inverse(view(x)), x)
    with pytest.raises(ValueError, match="unknown test-time augmentation 'mirror'"):
        tta_views("mirror", True)


class PositionNet(torch.nn.Module):
    """A network that is not equivariant to any flip: logits = w_c * x + ramp_c(position), so each view
    gives a different answer and the average can be computed by hand."""
    def __init__(self, n=8):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.0, 1.0, -1.0]))
        r = torch.linspace(-2, 2, n)
        self.register_buffer("ramp", torch.stack([torch.zeros(n, n), r[:, None] * torch.ones(n),
                                                  torch.ones(n, n) * r[None, :] * 0.5]))

    def forward(self, x):
        return self.w[None, :, None, None] * x + self.ramp[None]


def _by_hand(net, slices, views):
    """(Z, C, X, Y) softmax averaged over ``views``, each computed separately and mapped back."""
    with torch.no_grad():
        return sum(inv(torch.softmax(net(view(slices)), 1)) for view, inv in views) / len(views)


@pytest.mark.parametrize("mode", ["flips", "reflections"])
def test_predict_2d_averages_the_softmax_over_the_views(mode):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(8, 8, 3)).astype(np.float32)  # (X, Y, Z), already at the training size
    net = PositionNet().eval()
    slices = torch.from_numpy(image).permute(2, 0, 1)[:, None]
    expected = _by_hand(net, slices, tta_views(mode, True))
    labels, probs = predict_2d(net, image, (8, 8), "bilinear", half=False, return_probs=True, tta=mode)
    assert np.allclose(probs, expected.permute(1, 2, 3, 0).numpy(), atol=1e-5)
    assert np.array_equal(labels, expected.argmax(1).permute(1, 2, 0).numpy())
    plain = predict_2d(net, image, (8, 8), "bilinear", half=False)
    assert not np.array_equal(plain, labels)  # the views disagree, so the average changes labels
    # nearest resize (SSL4MIS's zoom back) takes the same averaged prediction
    assert np.array_equal(predict_2d(net, image, (8, 8), "nearest", half=False, tta=mode), labels)


def test_an_equivariant_network_predicts_the_same_with_and_without_views():
    image = np.random.default_rng(1).random((12, 10, 4)).astype(np.float32) * 2

    class Threshold(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.cat([torch.zeros_like(x), 4 * (x - 0.5), 4 * (2 * x - 3)], 1)

    truth = predict_2d(Threshold(), image, (16, 16), "bilinear", half=False)
    assert np.array_equal(predict_2d(Threshold(), image, (16, 16), "bilinear", half=False, tta="reflections"), truth)
    vol = np.random.default_rng(2).random((20, 18, 10)).astype(np.float32) * 4
    truth3 = (vol > 0.5).astype(np.uint8) + (vol > 2.5)  # class 2 wins where 2x - 3 > max(0, x - 0.5)
    for mode in ("none", "reflections"):
        assert np.array_equal(predict_3d(Threshold(), vol, (8, 8, 8), (4, 4, 4), half=False, tta=mode), truth3)


def test_predict_3d_averages_each_window_over_the_views():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1)).eval()
    vol = np.random.default_rng(3).random((8, 8, 6)).astype(np.float32)
    x = torch.from_numpy(vol)[None, None]
    # one window covering the volume: the result is the views' average on it
    expected = _by_hand(net, x, tta_views("reflections", True))[0]
    labels, probs = predict_3d(net, vol, (8, 8, 6), (4, 4, 4), half=False, return_probs=True, tta="reflections")
    assert np.allclose(probs, expected.numpy(), atol=1e-5)
    assert np.array_equal(labels, expected.argmax(0).numpy())
    assert not np.allclose(probs, predict_3d(net, vol, (8, 8, 6), (4, 4, 4), half=False, return_probs=True)[1])


def test_the_checkpoint_setting_applies_and_an_explicit_one_wins():
    net = PositionNet().eval()
    image = np.random.default_rng(4).normal(size=(8, 8, 2)).astype(np.float32)
    meta = {"dim": 2, "patch_size": [8, 8], "normalization": "none", "resize": "bilinear",
            "classes": [{"value": 1}, {"value": 2}]}
    plain = predict_2d(net, image, (8, 8), "bilinear", half=False)
    views = predict_2d(net, image, (8, 8), "bilinear", half=False, tta="reflections")
    assert np.array_equal(predict_volume(net, image, meta, half=False), plain)  # a model from before: none
    assert np.array_equal(predict_volume(net, image, {**meta, "tta": "reflections"}, half=False), views)
    assert np.array_equal(predict_volume(net, image, {**meta, "tta": "reflections"}, half=False, tta="none"), plain)


def test_segmenter_override_is_checked_in_one_line(tmp_path):
    from semiseg.inference import check_tta
    assert check_tta("flips") == "flips"
    with pytest.raises(SemiSegError, match="unknown test-time augmentation 'd8' \\(one of: none, flips, reflections\\)"):
        check_tta("d8")


def test_network_probs_sum_to_one():
    x = torch.randn(2, 1, 8, 8)
    p = network_probs(PositionNet().eval(), x, "reflections")
    assert p.shape == (2, 3, 8, 8) and torch.allclose(p.sum(1), torch.ones(2, 8, 8), atol=1e-6)
