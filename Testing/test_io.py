"""Reading and writing images, labelmaps (semiseg.data.io) and Slicer segmentations (semiseg.data.segfile)."""
import os

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from semiseg.data import io
from semiseg.data.classes import read_label
from semiseg.data.io import check_same_grid, read_volume, write_labelmap, write_volume
from semiseg.data.segfile import write_segmentation
from semiseg.data.volume import ClassInfo, Geometry, Volume
from semiseg.errors import SemiSegError


def rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


OBLIQUE = Geometry(spacing=(0.73, 1.21, 3.3), origin=(-12.5, 33.25, 101.7),
                   direction=tuple(rotation((1, 2, 3), 0.6).ravel()))
SHAPE = (7, 5, 4)  # x != y != z on purpose


def random_volume(seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return Volume((rng.random(shape) * 1000).astype(np.float32), OBLIQUE)


def labelmap(shape=(12, 9, 6)):
    lm = np.zeros(shape, np.uint8)
    lm[2:6, 1:4, 1:3] = 1
    lm[7:10, 4:8, 2:5] = 3
    lm[0, 0, 0] = 3
    return lm


def assert_geometry(actual: Geometry, expected: Geometry, tol=1e-5):
    np.testing.assert_allclose(actual.spacing, expected.spacing, atol=tol)
    np.testing.assert_allclose(actual.origin, expected.origin, atol=tol * 10)
    np.testing.assert_allclose(actual.direction, expected.direction, atol=tol)


# ---------------------------------------------------------------------------------------------- images

@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_volume_round_trip(tmp_path, suffix):
    vol = random_volume()
    path = tmp_path / f"image{suffix}"
    write_volume(path, vol)
    back = read_volume(path)
    assert back.array.dtype == np.float32
    assert back.shape == SHAPE
    np.testing.assert_array_equal(back.array, vol.array)
    assert_geometry(back.geometry, vol.geometry)
    assert back.geometry.matches(vol.geometry)
    assert back.name == "image"


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_array_order_is_itk_index_order(tmp_path, suffix):
    vol = random_volume(1)
    path = str(tmp_path / f"order{suffix}")
    write_volume(path, vol)
    img = sitk.ReadImage(path)
    assert img.GetSize() == SHAPE
    for idx in [(0, 0, 0), (6, 0, 0), (0, 4, 0), (0, 0, 3), (5, 3, 2)]:
        assert img.GetPixel(*idx) == pytest.approx(float(vol.array[idx]))
    # and the physical position of a voxel is where our geometry says
    idx = (5, 3, 2)
    expected = OBLIQUE.ijk_to_lps() @ np.array([*idx, 1.0])
    np.testing.assert_allclose(img.TransformIndexToPhysicalPoint(idx), expected[:3], atol=1e-4)


def test_array_order_of_labelmap_and_segmentation(tmp_path):
    lm = labelmap()
    write_labelmap(tmp_path / "l.nrrd", lm, OBLIQUE)
    write_segmentation(tmp_path / "l.seg.nrrd", lm, OBLIQUE, [ClassInfo(1, "a"), ClassInfo(3, "b")])
    for name in ("l.nrrd", "l.seg.nrrd"):
        img = sitk.ReadImage(str(tmp_path / name))
        assert img.GetSize() == lm.shape
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), lm)


@pytest.mark.parametrize("suffix", [".mha", ".png"])
def test_2d_image_becomes_single_slice_volume(tmp_path, suffix):
    arr = (np.arange(6 * 4).reshape(4, 6) * 10).astype(np.uint8)  # numpy (y, x)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.25))
    img.SetOrigin((3.0, -2.0))
    path = str(tmp_path / f"slice{suffix}")
    sitk.WriteImage(img, path)
    vol = read_volume(path)
    assert vol.shape == (6, 4, 1)
    np.testing.assert_array_equal(vol.array[:, :, 0], arr.T)
    assert len(vol.geometry.spacing) == 3 and len(vol.geometry.origin) == 3
    np.testing.assert_allclose(np.reshape(vol.geometry.direction, (3, 3))[2], [0, 0, 1])
    if suffix == ".mha":  # PNG keeps no origin
        assert vol.geometry.spacing == pytest.approx((0.5, 0.25, 1.0))
        assert vol.geometry.origin == pytest.approx((3.0, -2.0, 0.0))


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("reader", [read_volume, read_label])
@pytest.mark.parametrize("name", ["garbage.nrrd", "garbage.nii.gz", "garbage.seg.nrrd", "garbage.mha"])
def test_unreadable_file_names_the_file(tmp_path, reader, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x17 this is not an image \xff" * 20)
    with pytest.raises(SemiSegError) as err:
        reader(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg


def test_truncated_nrrd_names_the_file(tmp_path):
    path = tmp_path / "broken.nrrd"
    write_volume(path, random_volume())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SemiSegError, match="broken.nrrd"):
        read_volume(path)


@pytest.mark.parametrize("reader", [read_volume, read_label])
def test_missing_file_names_the_file(tmp_path, reader):
    path = tmp_path / "nowhere" / "missing.nrrd"
    with pytest.raises(SemiSegError) as err:
        reader(path)
    assert str(path) in str(err.value) and "not found" in str(err.value)


# ---------------------------------------------------------------------------------------------- labelmaps

@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_labelmap_round_trip(tmp_path, suffix):
    lm = labelmap()
    path = tmp_path / f"label{suffix}"
    write_labelmap(path, lm, OBLIQUE)
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkUInt8
    vol, classes = read_label(path)
    assert vol.array.dtype == np.uint8
    np.testing.assert_array_equal(vol.array, lm)
    assert_geometry(vol.geometry, OBLIQUE)
    assert [(c.value, c.name) for c in classes] == [(1, "class_1"), (3, "class_3")]
    assert classes[0].color != classes[1].color


def test_labelmap_with_large_values(tmp_path):
    lm = labelmap().astype(np.int32)
    lm[lm == 3] = 300
    path = tmp_path / "big.nrrd"
    write_labelmap(path, lm, OBLIQUE)
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkUInt16
    vol, classes = read_label(path)
    np.testing.assert_array_equal(vol.array, lm)
    assert [c.value for c in classes] == [1, 300]


def test_labelmap_with_given_classes(tmp_path):
    path = tmp_path / "label.nrrd"
    write_labelmap(path, labelmap(), OBLIQUE)
    given = [ClassInfo(1, "liver", (1, 0, 0)), ClassInfo(2, "spleen"), ClassInfo(3, "kidney", (0, 0, 1))]
    _, classes = read_label(path, given)
    assert [(c.value, c.name) for c in classes] == [(1, "liver"), (2, "spleen"), (3, "kidney")]
    with pytest.raises(SemiSegError, match="label.nrrd.*3"):
        read_label(path, given[:2])


def test_float_labelmap_with_integer_values_is_accepted(tmp_path):
    lm = labelmap()
    img = sitk.GetImageFromArray(lm.transpose(2, 1, 0).astype(np.float32))
    sitk.WriteImage(img, str(tmp_path / "f.nii.gz"))
    vol, _ = read_label(tmp_path / "f.nii.gz")
    assert vol.array.dtype == np.uint8
    np.testing.assert_array_equal(vol.array, lm)
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 4, 5), 0.5, np.float32)), str(tmp_path / "g.nii.gz"))
    with pytest.raises(SemiSegError, match="g.nii.gz"):
        read_label(tmp_path / "g.nii.gz")


# ---------------------------------------------------------------------------------------------- segmentations

CLASSES = [ClassInfo(1, "liver", (0.8, 0.2, 0.1)), ClassInfo(2, "tumour", (0.1, 0.9, 0.3)),
           ClassInfo(3, "vessel", (0.2, 0.3, 1.0))]


def test_segmentation_round_trip(tmp_path):
    lm = labelmap()  # class 2 is absent: an empty segment
    path = tmp_path / "case.seg.nrrd"
    write_segmentation(path, lm, OBLIQUE, CLASSES)
    vol, classes = read_label(path)
    np.testing.assert_array_equal(vol.array, lm)
    assert vol.array.dtype == np.uint8
    assert_geometry(vol.geometry, OBLIQUE)
    assert [(c.value, c.name) for c in classes] == [(1, "liver"), (2, "tumour"), (3, "vessel")]
    for got, want in zip(classes, CLASSES):
        np.testing.assert_allclose(got.color, want.color, atol=1e-6)
    # what Slicer sees: one segment per class, ids Segment_<value>, layer 0, label value = class value
    seg = slicerio.read_segmentation(str(path))
    assert [s["id"] for s in seg["segments"]] == ["Segment_1", "Segment_2", "Segment_3"]
    assert [s["labelValue"] for s in seg["segments"]] == [1, 2, 3]
    assert {s["layer"] for s in seg["segments"]} == {0}
    assert not slicerio.segment_mask(seg, "tumour").any()
    np.testing.assert_array_equal(slicerio.segment_mask(seg, "vessel"), lm == 3)


def test_segmentation_maps_segments_to_given_classes_by_name(tmp_path):
    path = tmp_path / "case.seg.nrrd"
    write_segmentation(path, labelmap(), OBLIQUE, CLASSES)
    given = [ClassInfo(5, "Vessel"), ClassInfo(7, "liver"), ClassInfo(9, "tumour")]
    vol, classes = read_label(path, given)
    expected = np.zeros_like(labelmap())
    expected[labelmap() == 1] = 7
    expected[labelmap() == 3] = 5
    np.testing.assert_array_equal(vol.array, expected)
    assert [c.name for c in classes] == ["Vessel", "liver", "tumour"]
    with pytest.raises(SemiSegError, match="case.seg.nrrd.*vessel"):
        read_label(path, given[1:])


def test_segmentation_rejects_unknown_label_values(tmp_path):
    with pytest.raises(SemiSegError, match="3"):
        write_segmentation(tmp_path / "x.seg.nrrd", labelmap(), OBLIQUE, CLASSES[:2])
    assert not (tmp_path / "x.seg.nrrd").exists()


def full_and_cropped(tmp_path, with_reference_geometry=True):
    """A segmentation stored Slicer-style with a cropped extent; returns (path, full labelmap, full geometry)."""
    full_shape = (20, 16, 10)
    full = np.zeros(full_shape, np.uint8)
    full[4:9, 5:9, 3:6] = 1
    full[9:12, 6:10, 4:7] = 2
    lo, hi = np.array([3, 4, 2]), np.array([12, 10, 7])  # stored block [lo, hi)
    geom = OBLIQUE
    m = geom.ijk_to_lps()
    stored_m = m.copy()
    stored_m[:3, 3] = m[:3, :3] @ lo + m[:3, 3]  # the file's origin is that of its first stored voxel
    seg = slicerio.create_segmentation(tuple(hi - lo), stored_m)
    seg["voxels"] = full[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy()
    seg["referenceImageExtentOffset"] = [int(v) for v in lo]
    if with_reference_geometry:
        ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ m
        value = ";".join(f"{v:.17g}" for v in ras.ravel()) + ";" + \
            ";".join(str(v) for n in full_shape for v in (0, n - 1)) + ";"
        seg["conversionParameters"] = [{"name": "Reference image geometry", "value": value, "description": "d"}]
    for value, name in ((1, "first"), (2, "second")):
        idx = np.argwhere(full == value)
        extent = [int(v) for a in range(3) for v in (idx[:, a].min(), idx[:, a].max())]
        seg["segments"].append({"id": f"Segment_{value}", "name": name, "labelValue": value, "layer": 0,
                                "color": [0.1 * value, 0.5, 0.5], "extent": extent})
    path = tmp_path / "cropped.seg.nrrd"
    slicerio.write_segmentation(str(path), seg)
    return path, full, geom, lo


def test_segmentation_with_cropped_extent_is_placed_in_reference_grid(tmp_path):
    path, full, geom, _ = full_and_cropped(tmp_path)
    vol, classes = read_label(path)
    assert vol.shape == full.shape
    np.testing.assert_array_equal(vol.array, full)
    assert_geometry(vol.geometry, geom)
    assert [c.name for c in classes] == ["first", "second"]
    check_same_grid(Volume(np.zeros(full.shape, np.float32), geom), vol, "img.nrrd", path)


def test_segmentation_with_cropped_extent_without_reference_geometry(tmp_path):
    path, full, geom, lo = full_and_cropped(tmp_path, with_reference_geometry=False)
    vol, _ = read_label(path)
    # the stored block on its own (still correctly placed in space) grid
    np.testing.assert_array_equal(vol.array, full[lo[0]:12, lo[1]:10, lo[2]:7])
    expected_origin = geom.ijk_to_lps() @ np.array([*lo, 1.0])
    np.testing.assert_allclose(vol.geometry.origin, expected_origin[:3], atol=1e-5)
    with pytest.raises(SemiSegError, match="does not share the grid"):
        check_same_grid(Volume(np.zeros(full.shape, np.float32), geom), vol, "img.nrrd", path)


def test_empty_segmentation_stored_as_one_voxel_gets_reference_grid(tmp_path):
    """Slicer stores a segmentation without any labelled voxel as a single zero voxel."""
    path, full, geom, _ = full_and_cropped(tmp_path)
    seg = slicerio.read_segmentation(str(path))
    seg["voxels"] = np.zeros((1, 1, 1), np.uint8)
    seg["referenceImageExtentOffset"] = [0, 0, 0]
    for s in seg["segments"]:
        s["extent"] = [0, -1, 0, -1, 0, -1]
    slicerio.write_segmentation(str(tmp_path / "empty.seg.nrrd"), seg)
    vol, classes = read_label(tmp_path / "empty.seg.nrrd")
    assert vol.shape == full.shape and not vol.array.any()
    assert_geometry(vol.geometry, geom)
    assert [c.name for c in classes] == ["first", "second"]


def layered_segmentation(tmp_path, overlap: bool):
    shape = (8, 6, 5)
    layers = np.zeros((2, *shape), np.uint8)
    layers[0, 1:4, 1:4, 1:3] = 1   # "a": layer 0 value 1
    layers[0, 5:7, 1:3, 1:4] = 2   # "b": layer 0 value 2
    if overlap:
        layers[1, 2:5, 2:5, 2:4] = 1  # "c": layer 1 value 1, overlaps "a"
    else:
        layers[1, 1:3, 4:6, 3:5] = 1  # "c": layer 1 value 1, disjoint
    seg = slicerio.create_segmentation(shape, OBLIQUE.ijk_to_lps())
    seg["voxels"] = layers
    seg["segments"] = [
        {"id": "a", "name": "a", "labelValue": 1, "layer": 0, "color": [1, 0, 0]},
        {"id": "b", "name": "b", "labelValue": 2, "layer": 0, "color": [0, 1, 0]},
        {"id": "c", "name": "c", "labelValue": 1, "layer": 1, "color": [0, 0, 1]},
    ]
    path = tmp_path / ("overlap.seg.nrrd" if overlap else "layers.seg.nrrd")
    slicerio.write_segmentation(str(path), seg)
    return path, layers


def test_multi_layer_segmentation_is_combined_and_renumbered(tmp_path):
    path, layers = layered_segmentation(tmp_path, overlap=False)
    vol, classes = read_label(path)
    # values collide across layers (a and c are both 1): segments are renumbered in file order
    assert [(c.value, c.name) for c in classes] == [(1, "a"), (2, "b"), (3, "c")]
    expected = np.zeros(layers.shape[1:], np.uint8)
    expected[layers[0] == 1] = 1
    expected[layers[0] == 2] = 2
    expected[layers[1] == 1] = 3
    np.testing.assert_array_equal(vol.array, expected)
    assert_geometry(vol.geometry, OBLIQUE)


def test_overlapping_segments_are_rejected(tmp_path):
    path, _ = layered_segmentation(tmp_path, overlap=True)
    with pytest.raises(SemiSegError) as err:
        read_label(path)
    assert str(path) in str(err.value) and "overlap" in str(err.value)


def test_legacy_segmentation_with_one_component_per_segment(tmp_path):
    """Slicer < 4.11 stored each segment as a binary component, without layer and label value fields."""
    import nrrd
    shape = (6, 5, 4)
    comps = np.zeros((2, *shape), np.uint8)
    comps[0, 1:3, 1:3, 1:3] = 1
    comps[1, 3:6, 0:2, 2:4] = 1
    m = OBLIQUE.ijk_to_lps()
    header = {"kinds": ["list", "domain", "domain", "domain"], "space": "left-posterior-superior",
              "space directions": np.vstack([[np.nan] * 3, m[:3, :3].T]), "space origin": m[:3, 3],
              "Segment0_ID": "s0", "Segment0_Name": "first", "Segment0_Color": "1 0 0",
              "Segment1_ID": "s1", "Segment1_Name": "second", "Segment1_Color": "0 1 0"}
    nrrd.write(str(tmp_path / "old.seg.nrrd"), comps, header)
    vol, classes = read_label(tmp_path / "old.seg.nrrd")
    assert [(c.value, c.name) for c in classes] == [(1, "first"), (2, "second")]
    np.testing.assert_array_equal(vol.array, comps[0] + 2 * comps[1])
    assert_geometry(vol.geometry, OBLIQUE)


def test_segmentation_added_with_slicerio_keeps_label_values(tmp_path):
    seg = slicerio.create_segmentation((6, 5, 4), OBLIQUE.ijk_to_lps())
    m1 = np.zeros((6, 5, 4), bool)
    m1[1:3, 1:3, 1:3] = True
    m2 = np.zeros_like(m1)
    m2[4:6, 2:5, 0:2] = True
    slicerio.add_segment(seg, m1, {"id": "x", "name": "x", "color": [1, 1, 0]})
    slicerio.add_segment(seg, m2, {"id": "y", "name": "y", "color": [0, 1, 1]})
    slicerio.write_segmentation(str(tmp_path / "s.seg.nrrd"), seg)
    vol, classes = read_label(tmp_path / "s.seg.nrrd")
    assert [(c.value, c.name) for c in classes] == [(1, "x"), (2, "y")]
    np.testing.assert_array_equal(vol.array, m1 * 1 + m2 * 2)


# ---------------------------------------------------------------------------------------------- grids

@pytest.mark.parametrize("change", ["spacing", "origin", "direction", "shape"])
def test_check_same_grid_rejects_different_grids(change):
    image = random_volume()
    geom = Geometry(OBLIQUE.spacing, OBLIQUE.origin, OBLIQUE.direction)
    shape = SHAPE
    if change == "spacing":
        geom.spacing = (0.73, 1.21, 3.4)
    elif change == "origin":
        geom.origin = (-12.5, 33.25, 102.7)
    elif change == "direction":
        geom.direction = tuple(rotation((1, 2, 3), 0.7).ravel())
    else:
        shape = (7, 5, 5)
    label = Volume(np.zeros(shape, np.uint8), geom)
    with pytest.raises(SemiSegError) as err:
        check_same_grid(image, label, "/data/img_01.nrrd", "/data/img_01.seg.nrrd")
    msg = str(err.value)
    assert "\n" not in msg
    assert "label /data/img_01.seg.nrrd does not share the grid of image /data/img_01.nrrd" in msg
    assert image.geometry.describe(SHAPE) in msg and label.geometry.describe(shape) in msg


def test_check_same_grid_passes_on_same_grid(tmp_path):
    image = random_volume()
    write_labelmap(tmp_path / "l.nii.gz", labelmap(SHAPE), OBLIQUE)
    label, _ = read_label(tmp_path / "l.nii.gz")  # float precision of NIfTI headers is tolerated
    check_same_grid(image, label, "img.nrrd", "l.nii.gz")


# ---------------------------------------------------------------------------------------------- atomic writes

def test_writes_leave_no_temporary_files(tmp_path):
    write_volume(tmp_path / "a.nrrd", random_volume())
    write_volume(tmp_path / "b.nii.gz", random_volume())
    write_labelmap(tmp_path / "c.nrrd", labelmap(), OBLIQUE)
    write_segmentation(tmp_path / "d.seg.nrrd", labelmap(), OBLIQUE, CLASSES)
    assert sorted(os.listdir(tmp_path)) == ["a.nrrd", "b.nii.gz", "c.nrrd", "d.seg.nrrd"]


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "a.nrrd"
    first = random_volume(0)
    write_volume(path, first)

    def broken_write(image, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"NRRD0004\nhalf")
        raise RuntimeError("sitk::ERROR: disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises(SemiSegError, match="a.nrrd.*disk full"):
        write_volume(path, random_volume(1))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["a.nrrd"]
    np.testing.assert_array_equal(read_volume(path).array, first.array)


def test_write_creates_folder_and_rejects_two_file_formats(tmp_path):
    write_volume(tmp_path / "new" / "x.mha", random_volume())
    assert (tmp_path / "new" / "x.mha").exists()
    with pytest.raises(SemiSegError, match="x.mhd"):
        write_volume(tmp_path / "x.mhd", random_volume())


def test_default_palette_colours_are_distinct():
    colours = [io.default_color(v) for v in range(1, len(io.DEFAULT_PALETTE) + 1)]
    assert len(set(colours)) == len(colours)


# ---------------------------------------------------------------------------------------- headers
@pytest.mark.parametrize("name,dim,components", [("a.nrrd", 3, 1), ("b.nii.gz", 3, 1), ("c.mha", 2, 1),
                                                 ("d.mha", 2, 3)])
def test_header_read_gives_the_grid_of_the_full_read(tmp_path, name, dim, components):
    from semiseg.data.io import read_volume_header
    size = (7, 5, 4)[:dim]
    arr = np.random.default_rng(0).random(size[::-1] + ((components,) if components > 1 else ()))
    img = sitk.GetImageFromArray(arr.astype(np.float32), isVector=components > 1)
    img.SetSpacing((0.7, 1.3, 2.9)[:dim])
    img.SetOrigin((10.0, -4.5, 3.25)[:dim])
    c, s = np.cos(0.4), np.sin(0.4)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]])[:dim, :dim]
    img.SetDirection(tuple(rot.ravel()))
    sitk.WriteImage(img, str(tmp_path / name))
    full = read_volume(tmp_path / name)
    shape, geometry = read_volume_header(tmp_path / name)
    assert shape == full.array.shape and geometry == full.geometry


def test_fingerprint_reads_only_the_header_of_unlabeled_files(tmp_path):
    from semiseg.data.datasets import CaseRef
    from semiseg.planning.fingerprint import fingerprint_cases
    vol = Volume(np.zeros((6, 5, 4), np.float32), Geometry((0.5, 0.6, 3.0), (1.0, 2.0, 3.0),
                                                           (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)), "u")
    write_volume(tmp_path / "u.nrrd", vol)

    def never():
        raise AssertionError("the unlabeled image's voxels were read")
    lab = CaseRef("l", lambda: vol, lambda: Volume(np.ones((6, 5, 4), np.uint8), vol.geometry, "l"))
    fp = fingerprint_cases([lab], [CaseRef("u", never, None, (str(tmp_path / "u.nrrd"),))])
    u = fp.cases[1]
    full = read_volume(tmp_path / "u.nrrd")
    assert (u.shape, u.spacing, u.direction, u.labeled) == (full.array.shape, full.geometry.spacing,
                                                            full.geometry.direction, False)
