"""Tests of semiseg.metrics: equality with medpy, hand-computed cases, empty-mask conventions."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

try:
    import semiseg  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SemiSegLib"))

from semiseg.metrics import (HD95_PENALTY, binary_metrics, dice_per_class_fast,
                             mean_over_classes, multiclass_metrics)

TOL = 1e-9


@pytest.fixture(scope="module")
def medpy_binary():
    return pytest.importorskip("medpy.metric.binary",
                               reason="medpy is the reference implementation for these checks")


def blobs(shape: tuple[int, ...], seed: int, sigma: float = 2.0, level: float = 0.6) -> np.ndarray:
    """Random blobs: thresholded smoothed noise (often touching the array edge)."""
    noise = gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    return noise > level * noise.std()


def assert_matches_medpy(mb, pred: np.ndarray, ref: np.ndarray, spacing) -> None:
    got = binary_metrics(pred, ref, spacing=spacing)
    want = {"dice": mb.dc(pred, ref), "jaccard": mb.jc(pred, ref),
            "hd95": mb.hd95(pred, ref, voxelspacing=spacing),
            "asd": mb.asd(pred, ref, voxelspacing=spacing)}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=TOL, rel=0), k
        assert isinstance(got[k], float)


# ---------------------------------------------------------------- equality with medpy

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("spacing", [None, (0.7, 1.9)])
def test_random_2d_matches_medpy(medpy_binary, seed, spacing):
    pred, ref = blobs((64, 48), seed), blobs((64, 48), seed + 100)
    assert pred.any() and ref.any()
    assert_matches_medpy(medpy_binary, pred, ref, spacing)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spacing", [None, (0.625, 0.625, 2.5)])
def test_random_3d_matches_medpy(medpy_binary, seed, spacing):
    shape = (40, 36, 24)
    pred, ref = blobs(shape, seed), blobs(shape, seed + 100)
    # a perturbed copy of the reference as a realistic prediction
    near = ref ^ (blobs(shape, seed + 200, sigma=1.0, level=1.5) & ~blobs(shape, seed + 300))
    assert_matches_medpy(medpy_binary, pred, ref, spacing)
    assert_matches_medpy(medpy_binary, near, ref, spacing)


@pytest.mark.parametrize("spacing", [None, (1.3, 0.4, 3.0)])
def test_small_objects_and_array_edges_match_medpy(medpy_binary, spacing):
    shape = (30, 25, 20)
    # objects flush with the array edge on every side, and small interior ones (crop is tiny)
    pred = np.zeros(shape, bool)
    ref = np.zeros(shape, bool)
    pred[0:6, 3:9, 0:4] = True                  # touches axis-0 and axis-2 low edges
    pred[25:30, 20:25, 15:20] = True            # touches all three high edges
    ref[0:5, 4:10, 0:3] = True
    ref[22:29, 18:25, 14:20] = True
    assert_matches_medpy(medpy_binary, pred, ref, spacing)
    small_p = np.zeros(shape, bool)
    small_r = np.zeros(shape, bool)
    small_p[10, 10, 10] = True
    small_r[12:14, 9:12, 10:12] = True
    assert_matches_medpy(medpy_binary, small_p, small_r, spacing)
    # whole-array reference: its border is the array's outer shell
    assert_matches_medpy(medpy_binary, blobs(shape, 7), np.ones(shape, bool), spacing)


def test_random_edge_blobs_match_medpy(medpy_binary):
    # large smooth blobs that cover most of the array and cross its edges
    for seed in range(3):
        pred = blobs((50, 50), seed, sigma=6.0, level=-0.5)
        ref = blobs((50, 50), seed + 1, sigma=6.0, level=-0.5)
        assert pred[0].any() or pred[-1].any() or pred[:, 0].any() or pred[:, -1].any()
        assert_matches_medpy(medpy_binary, pred, ref, None)
        assert_matches_medpy(medpy_binary, pred, ref, (2.0, 0.5))


# ---------------------------------------------------------------- hand-computed cases

def test_strips_shifted_by_two():
    # one-voxel-thick strips erode to nothing, so each strip is its own border
    pred = np.zeros((7, 12), bool)
    ref = np.zeros((7, 12), bool)
    pred[5, 2:7] = True   # columns 2..6
    ref[5, 4:9] = True    # columns 4..8
    m = binary_metrics(pred, ref)
    # pred->ref distances 2,1,0,0,0 ; ref->pred 0,0,0,1,2 ; pooled sorted: six 0, 1, 1, 2, 2
    assert m["dice"] == pytest.approx(2 * 3 / 10)
    assert m["jaccard"] == pytest.approx(3 / 7)
    assert m["hd95"] == pytest.approx(2.0)     # between sorted[8]=2 and sorted[9]=2
    assert m["asd"] == pytest.approx(0.6)      # (2+1)/5
    ms = binary_metrics(pred, ref, spacing=(3.0, 0.5))  # only the column spacing matters
    assert ms["hd95"] == pytest.approx(1.0)
    assert ms["asd"] == pytest.approx(0.3)
    assert ms["dice"] == m["dice"]


def test_percentile_interpolation_and_edge_touching_strip():
    pred = np.zeros((4, 25), bool)
    ref = np.zeros((4, 25), bool)
    pred[0, 0:20] = True   # on the array edge
    ref[0, 0:17] = True
    m = binary_metrics(pred, ref)
    # pred->ref: 17 zeros, 1, 2, 3 ; ref->pred: 17 zeros ; 37 values, 95% index 34.2 -> 1.2
    assert m["hd95"] == pytest.approx(1.2)
    assert m["asd"] == pytest.approx(6 / 20)
    assert m["dice"] == pytest.approx(2 * 17 / 37)
    assert m["jaccard"] == pytest.approx(17 / 20)


def test_asd_is_one_directional():
    pred = np.zeros((10, 10), bool)
    ref = np.zeros((10, 10), bool)
    pred[2, 2] = True
    ref[2, 2:7] = True     # ref->pred would be (0+1+2+3+4)/5 = 2, pred->ref is 0
    assert binary_metrics(pred, ref)["asd"] == 0.0
    assert binary_metrics(ref, pred)["asd"] == pytest.approx(2.0)


def test_parallel_strips_and_anisotropic_spacing():
    pred = np.zeros((6, 10), bool)
    ref = np.zeros((6, 10), bool)
    pred[0, :] = True
    ref[3, :] = True
    m = binary_metrics(pred, ref, spacing=(2.0, 1.0))
    assert m == {"dice": 0.0, "jaccard": 0.0, "hd95": pytest.approx(6.0), "asd": pytest.approx(6.0)}


def test_shifted_squares_and_identical_cube():
    pred = np.zeros((8, 8), bool)
    ref = np.zeros((8, 8), bool)
    pred[2:5, 2:5] = True
    ref[3:6, 2:5] = True
    # rings of 8 border voxels; 4 of each ring lie on the other ring, the rest are 1 away
    m = binary_metrics(pred, ref)
    assert m["dice"] == pytest.approx(2 * 6 / 18)
    assert m["jaccard"] == pytest.approx(6 / 12)
    assert m["asd"] == pytest.approx(0.5)
    assert m["hd95"] == pytest.approx(1.0)
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    assert binary_metrics(cube, cube) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


def test_crop_invariance_under_padding():
    # padding with background must not change anything (objects away from the edge)
    pred = blobs((30, 30, 20), 3)
    ref = blobs((30, 30, 20), 4)
    pred[[0, -1]] = pred[:, [0, -1]] = pred[:, :, [0, -1]] = False
    ref[[0, -1]] = ref[:, [0, -1]] = ref[:, :, [0, -1]] = False
    a = binary_metrics(pred, ref, spacing=(1.0, 0.8, 2.0))
    b = binary_metrics(np.pad(pred, 7), np.pad(ref, 7), spacing=(1.0, 0.8, 2.0))
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=TOL, rel=0)


def test_non_boolean_inputs_and_bad_arguments():
    pred = np.zeros((5, 5), np.uint8)
    pred[1:3, 1:3] = 7
    m = binary_metrics(pred, pred.astype(float))
    assert m["dice"] == 1.0 and m["hd95"] == 0.0
    with pytest.raises(ValueError):
        binary_metrics(pred, np.zeros((5, 6)))
    with pytest.raises(ValueError):
        binary_metrics(pred, pred, spacing=(1.0, 1.0, 1.0))


# ---------------------------------------------------------------- empty conventions

def _masks():
    full = np.zeros((6, 6), bool)
    full[1:4, 2:5] = True
    return np.zeros((6, 6), bool), full


def test_zero_convention():
    empty, full = _masks()
    zeros = {"dice": 0.0, "jaccard": 0.0, "hd95": 0.0, "asd": 0.0}
    assert binary_metrics(empty, full, empty="zero") == zeros     # empty prediction
    assert binary_metrics(empty, empty, empty="zero") == zeros    # both empty
    assert binary_metrics(full, empty, empty="zero") == zeros     # empty reference
    assert binary_metrics(full, empty) == zeros                   # "zero" is the default


def test_penalty_convention():
    empty, full = _masks()
    assert binary_metrics(empty, empty, empty="penalty") == {
        "dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    missed = {"dice": 0.0, "jaccard": 0.0, "hd95": 373.128664, "asd": 373.128664}
    assert HD95_PENALTY == 373.128664
    assert binary_metrics(empty, full, empty="penalty") == missed
    assert binary_metrics(full, empty, empty="penalty") == missed
    # non-empty on both sides: the convention does not matter
    assert binary_metrics(full, full, empty="penalty") == binary_metrics(full, full, empty="zero")


def test_unknown_convention_raises():
    empty, full = _masks()
    with pytest.raises(ValueError, match="zero.*penalty"):
        binary_metrics(full, full, empty="nan")
    with pytest.raises(ValueError, match="zero.*penalty"):
        multiclass_metrics(full, full, [1], empty="ignore")


# ---------------------------------------------------------------- multi-class

def _labelmaps():
    rng_shape = (32, 28, 16)
    ref = np.zeros(rng_shape, np.int16)
    ref[blobs(rng_shape, 10)] = 1
    ref[blobs(rng_shape, 11, level=1.0)] = 2
    pred = np.zeros(rng_shape, np.int16)
    pred[blobs(rng_shape, 12)] = 1
    pred[blobs(rng_shape, 13, level=1.0)] = 2
    return pred, ref


@pytest.mark.parametrize("empty", ["zero", "penalty"])
def test_multiclass_matches_binary_and_mean(empty):
    pred, ref = _labelmaps()
    spacing = (0.8, 0.8, 1.5)
    classes = [1, 2, 3]  # class 3 is absent from both
    per_class = multiclass_metrics(pred, ref, classes, spacing=spacing, empty=empty)
    assert list(per_class) == classes
    for v in classes:
        assert per_class[v] == binary_metrics(pred == v, ref == v, spacing=spacing, empty=empty)
    assert per_class[1]["dice"] > 0 and per_class[2]["hd95"] > 0
    mean = mean_over_classes(per_class)
    for k in ("dice", "jaccard", "hd95", "asd"):
        assert mean[k] == pytest.approx(sum(per_class[v][k] for v in classes) / 3)
    with pytest.raises(ValueError):
        mean_over_classes({})


def test_dice_per_class_fast():
    pred, ref = _labelmaps()
    pred[pred == 2] = 0                    # class 2: empty prediction
    ref[0:4] = 5                           # class 5 only in the reference, 6 only in the prediction
    pred[-3:] = 6
    classes = [0, 1, 2, 5, 6, 9]
    fast = dice_per_class_fast(pred, ref, classes)
    full = multiclass_metrics(pred, ref, classes)
    for v in classes:
        assert fast[v] == pytest.approx(full[v]["dice"], abs=TOL, rel=0)
    assert fast[2] == 0.0 and fast[5] == 0.0 and fast[6] == 0.0 and fast[9] == 0.0
    assert 0.0 < fast[1] < 1.0
