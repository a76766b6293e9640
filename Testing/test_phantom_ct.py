"""The synthetic abdominal CT phantom (semiseg.data.phantom_ct) and its ``phantom_ct[:N]`` dataset."""

import numpy as np
import pytest
from scipy import ndimage

from semiseg.data.datasets import load_dataset
from semiseg.data.phantom_ct import (CT_HU, CT_PHANTOM_CLASSES, DEFAULT_CT_DIRECTION, NOISE_HU,
                                     make_ct_phantom_case, make_ct_phantom_dataset)

LIVER, KIDNEY, LESION = 1, 2, 3


@pytest.fixture(scope="module")
def cases():
    return make_ct_phantom_dataset(8)


def lps_centroid(volume, mask):
    """Centroid of a mask in LPS millimetres, through the volume's voxel-to-LPS matrix."""
    ijk = np.argwhere(mask).mean(axis=0)
    return (volume.geometry.ijk_to_lps() @ np.append(ijk, 1.0))[:3]


def interior(mask, voxels=1):
    return ndimage.binary_erosion(mask, iterations=voxels)


def test_classes():
    assert [(c.value, c.name) for c in CT_PHANTOM_CLASSES] == [(1, "liver"), (2, "kidney"), (3, "liver lesion")]
    assert len({tuple(c.color) for c in CT_PHANTOM_CLASSES}) == 3
    assert all(0.0 <= x <= 1.0 for c in CT_PHANTOM_CLASSES for x in c.color)


def test_same_index_same_case_other_index_or_seed_other_case():
    img_a, lab_a = make_ct_phantom_case(3)
    img_b, lab_b = make_ct_phantom_case(3)
    np.testing.assert_array_equal(img_a.array, img_b.array)
    np.testing.assert_array_equal(lab_a.array, lab_b.array)
    assert img_a.geometry == img_b.geometry
    img_c, lab_c = make_ct_phantom_case(4)
    assert img_c.shape != img_a.shape or not np.array_equal(lab_a.array, lab_c.array)
    img_d, lab_d = make_ct_phantom_case(3, seed=1)
    assert img_d.geometry != img_a.geometry or not np.array_equal(lab_a.array, lab_d.array)


def test_geometry_isotropic_oriented_and_varied(cases):
    spacings, shapes = set(), set()
    for img, lab in cases:
        sp = img.geometry.spacing
        assert sp[0] == sp[1] == sp[2] and 1.4 <= sp[0] <= 1.8
        assert img.geometry.direction == DEFAULT_CT_DIRECTION
        assert not np.allclose(np.reshape(img.geometry.direction, (3, 3)), np.eye(3))
        assert np.linalg.norm(img.geometry.origin) > 50.0
        assert 64 <= img.shape[0] <= 80 and 64 <= img.shape[1] <= 80 and 56 <= img.shape[2] <= 72
        assert lab.geometry.matches(img.geometry) and lab.shape == img.shape
        assert img.array.dtype == np.float32 and lab.array.dtype == np.uint8
        spacings.add(sp[0])
        shapes.add(img.shape)
    assert len(spacings) >= len(cases) - 2 and len(shapes) > len(cases) // 2  # varies per case


def test_overrides():
    img, lab = make_ct_phantom_case(0, shape=(64, 72, 56), spacing=1.5, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert img.shape == lab.shape == (64, 72, 56)
    assert img.geometry.spacing == (1.5, 1.5, 1.5)
    assert img.geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="orthonormal"):
        make_ct_phantom_case(0, direction=(2, 0, 0, 0, 1, 0, 0, 0, 1))


def test_labels_cover_every_class_with_clearly_different_sizes(cases):
    for _, lab in cases:
        l = lab.array
        assert set(np.unique(l)) == {0, 1, 2, 3}
        n_liver, n_kidney, n_lesion = ((l == c).sum() for c in (LIVER, KIDNEY, LESION))
        assert n_liver > 3 * n_kidney and n_kidney > 8 * n_lesion and n_lesion >= 20
        assert n_lesion < 0.005 * l.size  # the small structure: under half a percent of the volume
        # the lesion lies inside the liver: every lesion voxel has liver or lesion all around it
        grown = ndimage.binary_dilation(l == LESION)
        assert set(np.unique(l[grown])) <= {LIVER, LESION}
        # two kidneys
        assert ndimage.label(l == KIDNEY)[1] == 2


def test_intensities_are_hounsfield_units(cases):
    for img, lab in cases:
        a, l = img.array, lab.array
        assert np.array_equal(a, np.round(a)) and a.min() >= -1024 and a.max() <= 3071
        # air outside the body: the grid's corner columns
        corners = np.concatenate([a[i, j, :] for i in (0, -1) for j in (0, -1)])
        assert abs(np.median(corners) + 1000) <= 8 and corners.std() < 3 * NOISE_HU[1]
        liver = a[interior(l == LIVER, 2)]
        assert CT_HU["liver"][0] - 8 <= np.median(liver) <= CT_HU["liver"][1] + 8
        assert NOISE_HU[0] * 0.5 < liver.std() < 3 * NOISE_HU[1]  # noisy, not flat
        kidney = a[l == KIDNEY]
        assert CT_HU["kidney_medulla"][0] - 10 <= np.median(kidney) <= CT_HU["kidney_cortex"][1] + 10
        assert np.percentile(kidney, 90) >= CT_HU["kidney_cortex"][0] - 15  # bright cortex
        lesion = a[interior(l == LESION, 1)] if interior(l == LESION, 1).sum() >= 5 else a[l == LESION]
        assert np.median(lesion) < np.median(liver) - 25  # hypodense
        # fat and bone are present: a fat peak and a few bone voxels
        fat = ((a > CT_HU["fat"][0] - 30) & (a < CT_HU["fat"][1] + 30)).mean()
        assert fat > 0.02
        assert CT_HU["bone_cancellous"][0] <= np.percentile(a, 99.9) and a.max() <= CT_HU["bone_cortical"][1] + 100
        assert (a > CT_HU["bone_cancellous"][0]).sum() > 100


def test_anatomy_is_placed_in_patient_coordinates(cases):
    """Liver on the patient's right (LPS x smaller), kidneys posterior (LPS y larger) of the body centre:
    holds only if the voxels were laid out through the direction matrix."""
    for img, lab in cases:
        body = lps_centroid(img, img.array > -500)
        liver = lps_centroid(img, lab.array == LIVER)
        kidney = lps_centroid(img, lab.array == KIDNEY)
        assert liver[0] < body[0] - 10.0
        assert kidney[1] > body[1] + 5.0
        assert abs(kidney[0] - body[0]) < 12.0  # one kidney each side


def test_other_direction_stores_the_same_anatomy_in_another_array_order():
    """Swapping the in-plane axes in the direction matrix (square grid, same centre) gives the same
    labels transposed, voxel for voxel, and the same image up to noise and texture."""
    swapped = (0.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # i -> anterior, j -> patient right
    for index in (0, 1):
        img1, lab1 = make_ct_phantom_case(index, shape=(66, 66, 58))
        img2, lab2 = make_ct_phantom_case(index, shape=(66, 66, 58), direction=swapped)
        np.testing.assert_array_equal(lab2.array, lab1.array.transpose(1, 0, 2))
        assert np.allclose(img1.geometry.origin, img2.geometry.origin)
        a1, a2 = img1.array.transpose(1, 0, 2), img2.array
        assert np.corrcoef(a2.ravel(), a1.ravel())[0, 1] > 0.98  # untransposed: about 0.6-0.75
        for c in (LIVER, KIDNEY, LESION):
            mask = lab2.array == c
            assert abs(np.median(a2[mask]) - np.median(a1[mask])) <= 5.0


def test_phantom_ct_dataset_spec():
    d = load_dataset("phantom_ct:6", labeled=2)
    assert (d.kind, d.dim, d.normalization) == ("phantom_ct", 3, "zscore")
    assert [c.name for c in d.classes] == ["liver", "kidney", "liver lesion"]
    assert (len(d.labeled), len(d.unlabeled), len(d.val), len(d.test)) == (2, 4, 4, 4)
    assert all(r.has_label for r in d.labeled + d.val + d.test) and not any(r.has_label for r in d.unlabeled)
    img, _ = make_ct_phantom_case(1)
    np.testing.assert_array_equal(d.labeled[1].image().array, img.array)
    np.testing.assert_array_equal(d.unlabeled[0].image().array, make_ct_phantom_case(2)[0].array)
    val_img, val_lab = make_ct_phantom_case(1000)
    np.testing.assert_array_equal(d.val[0].label().array, val_lab.array)
    assert d.labeled[0].name == "phantom_ct_000" and d.val[0].name == "phantom_ct_1000"
    assert len(load_dataset("phantom_ct").labeled) == 4
    with pytest.raises(Exception, match="between 1 and the 6"):
        load_dataset("phantom_ct:6", labeled=7)
