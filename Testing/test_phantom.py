"""The synthetic cardiac MRI phantom (semiseg.data.phantom)."""

import numpy as np
import pytest
from scipy import ndimage

from semiseg.data.classes import read_label
from semiseg.data.io import check_same_grid, read_volume
from semiseg.data.phantom import PHANTOM_CLASSES, make_phantom_case, make_phantom_dataset, write_phantom_dataset
from semiseg.data.phantom_ct import (CT_PHANTOM_CLASSES, DEFAULT_CT_DIRECTION, make_ct_phantom_case,
                                    write_ct_phantom_dataset)

RV, MYO, LV = 1, 2, 3


@pytest.fixture(scope="module")
def cases():
    return make_phantom_dataset(12)


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_classes_follow_acdc():
    assert [(c.value, c.name) for c in PHANTOM_CLASSES] == [
        (1, "right ventricle"), (2, "myocardium"), (3, "left ventricle")]
    assert len({tuple(c.color) for c in PHANTOM_CLASSES}) == 3


def test_same_index_same_case_other_index_other_case():
    img_a, lab_a = make_phantom_case(3)
    img_b, lab_b = make_phantom_case(3)
    np.testing.assert_array_equal(img_a.array, img_b.array)
    np.testing.assert_array_equal(lab_a.array, lab_b.array)
    assert img_a.geometry == img_b.geometry
    img_c, lab_c = make_phantom_case(4)
    assert not np.array_equal(lab_a.array, lab_c.array)
    assert np.abs(img_a.array - img_c.array).mean() > 10
    img_d, lab_d = make_phantom_case(3, seed=1)
    assert not np.array_equal(lab_a.array, lab_d.array)


def test_shapes_types_and_geometry():
    img, lab = make_phantom_case(0, shape=(64, 80, 10), spacing=(1.25, 1.25, 10.0))
    assert img.shape == lab.shape == (64, 80, 10)
    assert img.array.dtype == np.float32 and lab.array.dtype == np.uint8
    assert img.geometry.spacing == (1.25, 1.25, 10.0)
    assert img.geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert any(abs(o) > 1 for o in img.geometry.origin)
    assert lab.geometry.matches(img.geometry)
    assert set(np.unique(lab.array)) <= {0, 1, 2, 3}
    assert img.name == lab.name == "case_000"


def test_intensities_are_mri_like(cases):
    for img, lab in cases:
        a, l = img.array, lab.array
        assert a.min() >= 0 and 700 < a.max() < 1300 and np.isfinite(a).all()
        assert np.median(a[l == LV]) > 1.5 * np.median(a[l == MYO])  # bright blood, dark muscle
        assert np.median(a[l == RV]) > 1.5 * np.median(a[l == MYO])
        assert a[l == LV].std() > 10  # noisy, not flat


def test_all_classes_present_in_most_cases(cases):
    present = [all((lab.array == c).any() for c in (RV, MYO, LV)) for _, lab in cases]
    assert sum(present) >= 0.9 * len(cases)


def test_anatomy_is_arranged_like_a_heart(cases):
    ring = np.zeros((3, 3), bool)
    ring[1, :] = ring[:, 1] = True
    rv_absent_at_apex = 0
    for _, lab in cases:
        l = lab.array
        nz = l.shape[2]
        for k in range(nz // 4, nz // 2 + 1):  # mid slices
            lv, myo, rv = l[..., k] == LV, l[..., k] == MYO, l[..., k] == RV
            assert lv.sum() > 30
            grown = ndimage.binary_dilation(lv, ring) & ~lv
            # the LV is enclosed by myocardium: its 1-voxel rim lies (almost) all in the myocardium
            assert myo[grown].mean() > 0.95
            # the RV touches the myocardium but not the LV cavity
            rv_rim = ndimage.binary_dilation(rv, ring) & ~rv
            assert myo[rv_rim].any() and lv[rv_rim].mean() < 0.02
            # and it lies beside the LV, not around it: it covers only part of the LV's surroundings
            around = ndimage.binary_dilation(lv | myo, ring, iterations=2) & ~(lv | myo)
            assert 0.05 < rv[around].mean() < 0.8
        # the ventricles shrink towards the apex; the RV ends before it
        areas = [(l[..., k] == LV).sum() for k in range(nz)]
        assert areas[0] > 2 * max(areas[-1], 1) and areas[1] >= areas[-2]
        rv_absent_at_apex += not (l[..., -1] == RV).any() and (l[..., -1] == MYO).any()
    assert rv_absent_at_apex >= 0.8 * len(cases)


def test_pose_varies_between_cases(cases):
    centres = np.array([np.argwhere(lab.array[..., 2] == LV).mean(axis=0) for _, lab in cases])
    assert centres.std(axis=0).min() > 1.0
    areas = np.array([(lab.array[..., 2] > 0).sum() for _, lab in cases])
    assert areas.max() > 1.2 * areas.min()


def best_window_dice(image, mask, n_bins=64):
    """Dice of the best intensity window [lo, hi) (edges at quantiles) for predicting ``mask``."""
    edges = np.unique(np.quantile(image, np.linspace(0, 1, n_bins + 1)))
    bins = np.clip(np.searchsorted(edges, image, side="right") - 1, 0, len(edges) - 2)
    total = np.concatenate([[0], np.cumsum(np.bincount(bins.ravel(), minlength=len(edges) - 1))])
    inside = np.concatenate([[0], np.cumsum(np.bincount(bins[mask], minlength=len(edges) - 1))])
    i, j = np.triu_indices(len(total), k=1)  # window = bins i..j-1
    return float(np.max(2.0 * (inside[j] - inside[i]) / (total[j] - total[i] + mask.sum())))


def test_best_window_dice_finds_a_separable_class():
    rng = np.random.default_rng(0)
    mask = rng.random((30, 30, 5)) < 0.2
    image = np.where(mask, 500.0, rng.choice([100.0, 900.0], size=mask.shape)) + rng.normal(0, 5, mask.shape)
    assert best_window_dice(image, mask) > 0.95


def test_threshold_cannot_segment_myocardium(cases):
    """The best intensity window for the myocardium (chosen with the ground truth) stays poor."""
    for img, lab in cases:
        a, myo = img.array, lab.array == MYO
        assert best_window_dice(a, myo) < 0.6
        # even when restricted to the bounding box of the heart
        idx = np.argwhere(lab.array > 0)
        box = tuple(slice(lo, hi + 1) for lo, hi in zip(idx.min(axis=0), idx.max(axis=0)))
        assert best_window_dice(a[box], myo[box]) < 0.65


IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("write,make,classes,prefix,direction,n,seed", [
    (write_phantom_dataset, make_phantom_case, PHANTOM_CLASSES, "case", IDENTITY, 3, 2),
    (write_ct_phantom_dataset, make_ct_phantom_case, CT_PHANTOM_CLASSES, "ct", DEFAULT_CT_DIRECTION, 2, 5)])
def test_written_phantom_reads_back_voxel_for_voxel(tmp_path, write, make, classes, prefix, direction, n, seed):
    """Both phantoms' writers (one shared write_generated_cases): NRRD + .seg.nrrd read back exactly."""
    pairs = write(tmp_path / prefix, n, seed=seed)
    assert [(p.rsplit("/", 1)[1], q.rsplit("/", 1)[1]) for p, q in pairs] == [
        (f"{prefix}_{i:03d}.nrrd", f"{prefix}_{i:03d}.seg.nrrd") for i in range(n)]
    for i, (image_path, label_path) in enumerate(pairs):
        img, lab = make(i, seed=seed)
        image = read_volume(image_path)
        label, read_classes = read_label(label_path)
        np.testing.assert_array_equal(image.array, img.array)
        np.testing.assert_array_equal(label.array, lab.array)
        assert image.geometry.matches(img.geometry) and label.geometry.matches(img.geometry)
        assert np.allclose(image.geometry.direction, direction)
        check_same_grid(image, label, image_path, label_path)
        assert [(c.value, c.name) for c in read_classes] == [(c.value, c.name) for c in classes]
        np.testing.assert_allclose([c.color for c in read_classes], [c.color for c in classes])
