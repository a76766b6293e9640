"""Resizing, augmentation and inference against their reference definitions."""
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from semiseg.data.transforms import random_crop_3d, random_generator_2d, zoom_nearest
from semiseg.inference import importance_map, largest_component, predict_2d, predict_3d, window_starts


@pytest.mark.parametrize("shape,out", [((224, 154), (256, 256)), ((256, 256), (224, 154)), ((7, 3), (16, 16)),
                                       ((512, 511), (256, 256)), ((150, 512), (256, 256))])
def test_zoom_nearest_equals_scipy_order0(shape, out):
    a = np.random.default_rng(0).random(shape).astype(np.float32)
    ref = ndi.zoom(a, (out[0] / shape[0], out[1] / shape[1]), order=0)
    assert np.array_equal(zoom_nearest(torch.from_numpy(a), out).numpy(), ref)


def test_augmentation_moves_image_and_label_together():
    g = torch.Generator().manual_seed(0)
    img = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16).repeat(32, 1, 1, 1)
    lab = torch.arange(16 * 16).reshape(1, 16, 16).repeat(32, 1, 1) % 251
    oi, ol = random_generator_2d(img, lab, g)
    # every output pixel keeps its (image, label) pair, or both are zero-filled by the rotation
    assert torch.equal(oi[:, 0].long() % 251, ol.long())
    changed = [(not torch.equal(oi[i], img[i])) for i in range(32)]
    assert 10 < sum(changed) < 32  # p(unchanged) = 0.25


def test_random_crop_pads_small_volumes_like_ua_mt():
    g = torch.Generator().manual_seed(0)
    img = torch.ones(100, 130, 70)
    out, _ = random_crop_3d(img, None, (112, 112, 80), g)
    assert out.shape == (112, 112, 80)
    # padding (112-100)//2+3 = 9 on x, 3 on y ((112-130)//2+3 = -6 -> 0 ... max(.,0)), 8 on z
    # so the padded volume is 118 x 130(+0) x 86 and the crop must contain zeros on x or z sides sometimes
    zeros = [float((random_crop_3d(img, None, (112, 112, 80), g)[0] == 0).float().mean()) for _ in range(20)]
    assert max(zeros) > 0


def test_window_starts_literature_rule():
    assert window_starts(183, 112, 18) == [0, 18, 36, 54, 71]
    assert window_starts(88, 80, 4) == [0, 4, 8]
    assert window_starts(112, 112, 18) == [0]


class ThresholdNet(torch.nn.Module):
    """Stand-in 'network' with known output: class = (x > 0.5) + (x > 1.5) as one-hot logits."""
    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        cls = (x > 0.5).long() + (x > 1.5).long()
        return torch.nn.functional.one_hot(cls[:, 0], 3).movedim(-1, 1).float() * 10


def test_predict_2d_and_3d_reproduce_a_known_segmenter():
    rng = np.random.default_rng(0)
    img = np.zeros((40, 36, 5), np.float32)
    img[10:30, 5:20] = 1.0
    img[12:16, 6:9, 2] = 2.0
    truth = (img > 0.5).astype(np.uint8) + (img > 1.5)
    net = ThresholdNet()
    assert np.array_equal(predict_2d(net, img, (40, 36)), truth)
    vol = rng.random((50, 40, 20)).astype(np.float32) * 2
    lab = (vol > 0.5).astype(np.uint8) + (vol > 1.5)
    assert np.array_equal(predict_3d(net, vol, (32, 32, 16), (9, 9, 3)), lab)
    # smaller than the patch: zero padding then crop back
    small = vol[:20, :10, :7]
    assert np.array_equal(predict_3d(net, small, (32, 32, 16), (8, 8, 4)), lab[:20, :10, :7])


def test_largest_component_per_class():
    a = np.zeros((10, 10, 3), np.uint8)
    a[0:2, 0:2] = 1
    a[5:9, 5:9] = 1
    a[0, 9] = 2
    out = largest_component(a, [1, 2])
    assert out[0:2, 0:2].sum() == 0 and (out[5:9, 5:9] == 1).all() and out[0, 9, 0] == 2
    diag = np.zeros((3, 3, 3), np.uint8)
    diag[0, 0, 0] = diag[1, 1, 1] = 1  # 26-connected: one component
    assert largest_component(diag, [1]).sum() == 2


class ConstantNet(torch.nn.Module):
    """Same logits at every voxel, whatever the input."""
    def __init__(self, logits=(0.3, 1.2, -0.5)):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits.view(1, -1, 1, 1, 1).expand(x.shape[0], -1, *x.shape[2:])


def _conv_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(4, 3, 3, padding=1)).eval()


def test_gaussian_weighting_equals_uniform_where_windows_agree():
    vol = np.random.default_rng(1).random((30, 26, 20)).astype(np.float32) * 2
    lu, pu = predict_3d(ConstantNet(), vol, (16, 16, 8), (5, 7, 3), return_probs=True)
    lg, pg = predict_3d(ConstantNet(), vol, (16, 16, 8), (5, 7, 3), return_probs=True, weighting="gaussian")
    assert np.array_equal(lu, lg) and (lu == 1).all()
    expected = torch.softmax(torch.tensor([0.3, 1.2, -0.5]), 0).numpy()
    assert np.allclose(pg, expected[:, None, None, None], atol=1e-6) and np.allclose(pu, pg, atol=1e-6)
    # a voxel-wise segmenter: every window predicts the same for a voxel, so any weighting is exact
    truth = (vol > 0.5).astype(np.uint8) + (vol > 1.5)
    assert np.array_equal(predict_3d(ThresholdNet(), vol, (16, 16, 8), (5, 7, 3), weighting="gaussian"), truth)


def test_gaussian_weighting_changes_a_context_dependent_result_and_map_shape():
    vol = np.random.default_rng(2).random((28, 24, 20)).astype(np.float32)
    pu = predict_3d(_conv_net(), vol, (16, 16, 16), (4, 4, 4), return_probs=True, half=False)[1]
    pg = predict_3d(_conv_net(), vol, (16, 16, 16), (4, 4, 4), return_probs=True, half=False, weighting="gaussian")[1]
    assert not np.allclose(pu, pg, atol=1e-7) and np.allclose(pg.sum(0), 1, atol=1e-5)
    # the checkpoint's window_weighting (TrainConfig field) reaches the sliding window of segment/evaluate
    from semiseg.inference import predict_volume
    meta = {"dim": 3, "patch_size": [16, 16, 16], "stride": [4, 4, 4], "normalization": "none", "classes":
            [{"value": 1}, {"value": 2}], "window_weighting": "gaussian"}
    lg = predict_3d(_conv_net(), vol, (16, 16, 16), (4, 4, 4), half=False, weighting="gaussian")
    assert np.array_equal(predict_volume(_conv_net(), vol, meta, half=False), lg)
    assert np.array_equal(predict_volume(_conv_net(), vol, {**meta, "window_weighting": "uniform"}, half=False), pu.argmax(0))
    g = importance_map((32, 32, 16))
    assert g.max() == 1 and g[16, 16, 8] == 1 and g.min() > 0
    # sigma = 32/8 = 4 voxels: one sigma from the centre along x the weight is about exp(-1/2)
    assert abs(g[20, 16, 8] - np.exp(-0.5)) < 0.01 and abs(g[16, 16, 10] - np.exp(-0.5 * (2 / 2) ** 2)) < 0.01


def test_single_window_returns_the_models_argmax_and_batch_size_is_irrelevant():
    net = _conv_net(3)
    vol = np.random.default_rng(3).normal(size=(16, 16, 8)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(vol)[None, None]).argmax(1)[0].numpy()
    assert np.array_equal(predict_3d(net, vol, (16, 16, 8), (4, 4, 4), half=False), ref)
    big = np.random.default_rng(4).normal(size=(30, 27, 19)).astype(np.float32)
    outs = [predict_3d(net, big, (16, 16, 8), (6, 5, 4), batch=b, half=False, return_probs=True) for b in (1, 3, 64)]
    for lab, prob in outs[1:]:
        assert np.array_equal(lab, outs[0][0]) and np.allclose(prob, outs[0][1], atol=1e-6)


@pytest.mark.parametrize("name,kw,meta", [
    ("vnet", {"num_classes": 2, "n_filters": 4}, {"dim": 3, "patch_size": [32, 32, 16], "stride": [16, 16, 8]}),
    ("unet", {"num_classes": 3, "channels": [4, 8, 16, 32, 64]}, {"dim": 2, "patch_size": [32, 32]})],
    ids=["3d-vnet", "2d-unet"])
def test_checkpoint_network_is_channels_last_with_the_same_predictions(name, kw, meta):
    """network_from_checkpoint puts a trained network in the channels-last layout on the CPU (NDHWC for the
    V-Net, NHWC for the UNet); predict_volume gives the same labels as the contiguous network and softmax
    values within fp32 rounding."""
    from semiseg.checkpoint import network_from_checkpoint
    from semiseg.inference import predict_volume
    from semiseg.networks import build_network, channels_last_format
    torch.manual_seed(0)
    ref = build_network(name, **kw).eval()
    for m in ref.modules():  # non-trivial batch-norm statistics, as after training
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    net = network_from_checkpoint({"network": {"name": name, **kw}, "model": ref.state_dict()}, "cpu")
    layout = torch.channels_last_3d if meta["dim"] == 3 else torch.channels_last
    def convs(model):  # whose weights have one layout only (more than one input channel, a kernel over 1 voxel)
        return [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))
                and m.in_channels > 1 and max(m.kernel_size) > 1]
    assert convs(net) and all(c.weight.is_contiguous(memory_format=layout) for c in convs(net))
    assert not any(c.weight.is_contiguous(memory_format=layout) for c in convs(ref))
    meta = {**meta, "normalization": "none", "classes": [{"value": v} for v in range(1, kw["num_classes"])]}
    image = np.random.default_rng(1).normal(size=(40, 36, 20)).astype(np.float32)
    ref_labels, ref_probs = predict_volume(ref, image, meta, half=False, return_probs=True)
    labels, probs = predict_volume(net, image, meta, half=False, return_probs=True)
    assert np.abs(probs - ref_probs).max() < 1e-4
    close = np.sort(ref_probs, 0)[-1] - np.sort(ref_probs, 0)[-2] < 1e-4  # near-ties may flip
    assert np.array_equal(labels[~close], ref_labels[~close]) and close.mean() < 0.01
    assert channels_last_format(3, "mps") is None and channels_last_format(2, "mps") is torch.channels_last
