"""The Slicer module's data logic on real MRML, outside Slicer (the ``slicer-core`` wheel).

Scene → job folder: volumes in different geometries (anisotropic spacing, oblique and flipped
directions, non-zero origins, LPS/RAS), segmentations whose segments are ordered and spelled
differently, an empty segment, a cropped segmentation labelmap, nodes under linear transforms;
the written files must match the MRML voxels exactly (read back with the engine's own reader, the
one the trainer uses) and every case must use one class table. Engine predictions → segmentation
nodes with the classes' names, colours, terminology, the volume's geometry and the same voxels.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from unittest.mock import ANY

pytest.importorskip("slicer_core", reason="real MRML needs the slicer-core wheel "
                                          "(pip install slicer-core==5.12.4.0, Slicer 5.12 stable)")
slicer = pytest.importorskip("slicer", reason="slicer-core's 'slicer' package is not importable")
vtk = pytest.importorskip("vtk", reason="slicer-core needs vtk")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SemiSegExtension"))

from SemiSegSlicerLib import mrml_export as ex  # noqa: E402
from SemiSegSlicerLib import segment_classes as sc  # noqa: E402
from SemiSegSlicerLib import mrml_import as im  # noqa: E402
from semiseg.data.classes import read_label  # noqa: E402
from semiseg.data.io import check_same_grid, read_volume  # noqa: E402
from semiseg.data.segfile import write_segmentation  # noqa: E402
from semiseg.data.volume import ClassInfo  # noqa: E402
from semiseg_trainer import protocol  # noqa: E402

LIVER_TERM = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
              "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ------------------------------------------------------------------------------------------ helpers
def matrix(spacing, origin, direction=np.eye(3)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, float) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def rot_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def to_vtk(a: np.ndarray):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def add_volume(scene, name, array_kji, ijk_to_ras):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(to_vtk(ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array_kji))
    return node


def add_segmentation(scene, name, volume, segments, labelmap_grid=None):
    """``segments``: [(name, mask (k, j, i) on ``labelmap_grid`` or None for an empty segment, colour)] in
    the wanted order. The labelmap is imported on ``labelmap_grid`` = (ijk_to_ras, shape) or the volume's."""
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    filled = [(n, m, c) for n, m, c in segments if m is not None]
    if filled:
        if labelmap_grid is None:
            m = vtk.vtkMatrix4x4()
            volume.GetIJKToRASMatrix(m)
            labelmap_grid = (slicer.util.arrayFromVTKMatrix(m), filled[0][1].shape)
        lab = np.zeros(labelmap_grid[1], np.uint8)
        for v, (_, mask, _) in enumerate(filled, start=1):
            lab[mask] = v
        lm = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name + "_lm")
        lm.SetIJKToRASMatrix(to_vtk(labelmap_grid[0]))
        slicer.util.updateVolumeFromArray(lm, lab)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lm, seg)
        scene.RemoveNode(lm)
    s = seg.GetSegmentation()
    ids = [s.GetNthSegmentID(i) for i in range(s.GetNumberOfSegments())]
    assert len(ids) == len(filled)
    for sid, (n, _, c) in zip(ids, filled):
        s.GetSegment(sid).SetName(n)
        s.GetSegment(sid).SetColor(*c)
    for index, (n, m, c) in enumerate(segments):  # empty segments, then the wanted order
        sid = s.AddEmptySegment("", n, list(c)) if m is None else ids[[f[0] for f in filled].index(n)]
        s.SetSegmentIndex(sid, index)
    return seg


def ras_array(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def engine_ijk_to_ras(volume) -> np.ndarray:
    """The engine's geometry (LPS) as a RAS matrix, to compare with MRML."""
    return RAS_TO_LPS @ volume.geometry.ijk_to_lps()


def mrml_labels(scene, seg_node, volume):
    out = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    s = seg_node.GetSegmentation()
    ids = [s.GetNthSegmentID(i) for i in range(s.GetNumberOfSegments())]
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        seg_node, ids, out, volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    a = np.array(slicer.util.arrayFromVolume(out))
    scene.RemoveNode(out)
    return a, ids


@pytest.fixture
def scene():
    im.ensure_converter_rules()
    return slicer.vtkMRMLScene()


def blobs(shape, seed):
    """Three disjoint non-empty masks (k, j, i) on ``shape``."""
    rng = np.random.default_rng(seed)
    k, j, i = shape
    a = np.zeros(shape, bool)
    a[1:k - 1, 1:j // 2, 1:i // 2] = True
    b = np.zeros(shape, bool)
    b[: k // 2, j // 2 + 1:, i // 2:] = True
    c = (rng.random(shape) > 0.85) & ~a & ~b
    return a, b, c


# Three geometries. A: oblique (30° about z) with a flipped second axis, anisotropic spacing, non-zero
# origin. B: axis-aligned but LPS-oriented in RAS (i points to −R, j to −A), as DICOM/ITK data loads.
# C: identity direction, under a linear transform (rotation + translation).
GEOM_A = matrix((0.8, 0.6, 2.5), (12.5, -30.0, 7.0), rot_z(30) @ np.diag([1, -1, 1]))
GEOM_B = matrix((1.1, 1.1, 3.0), (100.0, 80.0, -40.0), np.diag([-1.0, -1.0, 1.0]))
GEOM_C = matrix((1.0, 1.0, 1.5), (0.0, 0.0, 0.0))
RED, GREEN, BLUE = (0.9, 0.1, 0.1), (0.1, 0.8, 0.2), (0.2, 0.3, 0.9)


def build_scene(scene):
    rng = np.random.default_rng(0)
    shape_a, shape_b, shape_c = (6, 10, 12), (5, 9, 11), (4, 8, 8)
    vol_a = add_volume(scene, "Patient A", rng.normal(100, 20, shape_a).astype(np.int16), GEOM_A)
    vol_b = add_volume(scene, "Patient B", rng.random(shape_b).astype(np.float32), GEOM_B)
    vol_c = add_volume(scene, "Patient C", rng.integers(0, 255, shape_c).astype(np.uint8), GEOM_C)
    vol_u = add_volume(scene, "Unlabeled/scan #4", rng.normal(0, 1, (3, 7, 9)).astype(np.float32),
                       matrix((0.5, 0.5, 4.0), (-5, 5, 20), rot_z(-45)))
    la, sa, _ = blobs(shape_a, 1)
    seg_a = add_segmentation(scene, "A seg", vol_a, [("liver", la, RED), ("spleen", sa, GREEN), ("kidney", None, BLUE)])
    seg_a.GetSegmentation().GetSegment(seg_a.GetSegmentation().GetNthSegmentID(0)).SetTag(
        slicer.vtkSegment.GetTerminologyEntryTagName(), LIVER_TERM)
    lb, sb, kb = blobs(shape_b, 2)
    # B: other order and spellings; its labelmap is a cropped block starting at voxel (k, j, i) = (1, 2, 3)
    crop = (slice(1, 5), slice(2, 9), slice(3, 11))
    grid_b = GEOM_B.copy()
    grid_b[:3, 3] = GEOM_B[:3, :3] @ np.array([3, 2, 1]) + GEOM_B[:3, 3]
    seg_b = add_segmentation(scene, "B seg", vol_b,
                             [("Kidney", kb[crop], (0, 0, 1)), ("LIVER", lb[crop], (1, 1, 0)), ("spleen ", sb[crop], (0, 1, 1))],
                             labelmap_grid=(grid_b, lb[crop].shape))
    lc, sc, kc = blobs(shape_c, 3)
    seg_c = add_segmentation(scene, "C seg", vol_c, [("spleen", sc, GREEN), ("kidney", kc, BLUE), ("liver", lc, RED)])
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    t.SetMatrixTransformToParent(to_vtk(matrix((1, 1, 1), (4.0, -7.0, 2.5), rot_z(90))))
    vol_c.SetAndObserveTransformNodeID(t.GetID())
    seg_c.SetAndObserveTransformNodeID(t.GetID())
    full_b = np.zeros(shape_b, np.uint8)
    for v, m in ((1, lb), (2, sb), (3, kb)):
        full_b[crop][m[crop]] = v
    truth = {  # expected labelmaps (k, j, i) in the shared class values liver 1, spleen 2, kidney 3
        "Patient_A": la * 1 + sa * 2,
        "Patient_B": full_b,
        "Patient_C": lc * 1 + sc * 2 + kc * 3,
    }
    return dict(vols=(vol_a, vol_b, vol_c, vol_u), segs=(seg_a, seg_b, seg_c), truth=truth, transform=t)


# ------------------------------------------------------------------------------------------ export
def test_export_matches_voxels_geometry_and_one_class_table(scene, tmp_path):
    s = build_scene(scene)
    vol_a, vol_b, vol_c, vol_u = s["vols"]
    pairs = ex.pair_cases(s["segs"])  # every source volume found through the reference-geometry link
    assert [v.GetID() for _, v in pairs] == [vol_a.GetID(), vol_b.GetID(), vol_c.GetID()]
    n_nodes = scene.GetNumberOfNodes()
    export = ex.export_training_data(scene, tmp_path, pairs, [vol_u, vol_a], validation_cases=1)
    assert scene.GetNumberOfNodes() == n_nodes  # temporary nodes removed
    assert vol_c.GetParentTransformNode() is not None  # the scene is not hardened

    # one class table, names and colours of the first occurrence, terminology carried
    assert [(c.value, c.name) for c in export.classes] == [(1, "liver"), (2, "spleen"), (3, "kidney")]
    assert export.classes[0].color == pytest.approx(RED) and export.classes[0].terminology == LIVER_TERM
    assert export.classes[2].color == pytest.approx(BLUE)
    assert [(c.name, c.split, c.label is not None) for c in export.cases] == [
        ("Patient_A", "train", True), ("Patient_B", "train", True), ("Patient_C", "val", True),
        ("Unlabeled_scan_4", "train", False)]  # vol_a is not exported twice as unlabeled
    assert export.cases[0].voxels["kidney"] == 0  # the empty segment

    classes = [ClassInfo(c.value, c.name, c.color) for c in export.classes]
    for case, vol in zip(export.cases, (vol_a, vol_b, vol_c, vol_u)):
        image = read_volume(tmp_path / case.image)  # the engine's reader (x, y, z), LPS
        np.testing.assert_array_equal(image.array, slicer.util.arrayFromVolume(vol).transpose(2, 1, 0).astype(np.float32))
        world = ras_array(vol)
        if vol is vol_c:  # hardened: T @ IJKToRAS
            world = matrix((1, 1, 1), (4.0, -7.0, 2.5), rot_z(90)) @ GEOM_C
        np.testing.assert_allclose(engine_ijk_to_ras(image), world, atol=1e-5)
        if case.label:
            label, cls = read_label(tmp_path / case.label, classes)
            check_same_grid(image, label, case.image, case.label)  # what the trainer checks
            np.testing.assert_array_equal(label.array, s["truth"][case.name].transpose(2, 1, 0))
            assert [c.name for c in cls] == ["liver", "spleen", "kidney"]

    # LPS on disk, by hand for A: RAS origin (12.5, -30, 7) -> LPS (-12.5, 30, 7); first axis RAS
    # direction (cos30, sin30, 0) -> LPS (-cos30, -sin30, 0); B: RAS diag(-1,-1,1) -> LPS identity
    a = read_volume(tmp_path / "data/Patient_A.nrrd").geometry
    assert a.origin == pytest.approx((-12.5, 30.0, 7.0)) and a.spacing == pytest.approx((0.8, 0.6, 2.5))
    c30, s30 = math.cos(math.radians(30)), math.sin(math.radians(30))
    assert np.asarray(a.direction).reshape(3, 3)[:, 0] == pytest.approx([-c30, -s30, 0], abs=1e-6)
    b = read_volume(tmp_path / "data/Patient_B.nrrd").geometry
    assert b.direction == pytest.approx(tuple(np.eye(3).ravel())) and b.origin == pytest.approx((-100, -80, -40))

    # dataset.csv and job.json agree with the export
    rows = list(csv.DictReader(open(tmp_path / ex.DATASET_CSV)))
    assert [(r["image"], r["label"], r["split"]) for r in rows] == [
        (c.image, c.label or "", c.split) for c in export.cases]
    spec = ex.training_job_spec(export, {"method": "mean_teacher", "iterations": 5})
    protocol.write_job(tmp_path, spec)
    job = protocol.read_job(tmp_path)
    assert job["schema"] == protocol.SCHEMA_VERSION and job["task"] == "train"
    assert job["dataset"]["classes"][0] == {"value": 1, "name": "liver", "color": list(RED), "terminology": LIVER_TERM}
    assert job["config"]["data"] == str(tmp_path / ex.DATASET_CSV)


def test_segmentation_transform_is_followed_voxel_for_voxel(scene, tmp_path):
    """Only the segmentation moved, by exactly one voxel along i: the exported labels shift by one."""
    vol = add_volume(scene, "V", np.zeros((3, 5, 6), np.int16), GEOM_A)
    mask = np.zeros((3, 5, 6), bool)
    mask[1, 1:4, 1:3] = True
    seg = add_segmentation(scene, "S", vol, [("tumour", mask, RED)])
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = GEOM_A[:3, 0]  # one voxel step along i, in RAS
    t.SetMatrixTransformToParent(to_vtk(shift))
    seg.SetAndObserveTransformNodeID(t.GetID())
    export = ex.export_training_data(scene, tmp_path, [(seg, vol)])
    label, _ = read_label(tmp_path / export.cases[0].label, [ClassInfo(1, "tumour")])
    expected = np.zeros_like(mask)
    expected[:, :, 1:] = mask[:, :, :-1]
    np.testing.assert_array_equal(label.array, expected.transpose(2, 1, 0).astype(np.uint8))


def test_class_disagreements_overlaps_and_bad_links_are_one_line_errors(scene, tmp_path):
    vol = add_volume(scene, "V", np.zeros((3, 5, 6), np.int16), GEOM_B)
    m1 = np.zeros((3, 5, 6), bool)
    m1[1, 1:3, 1:3] = True
    m2 = np.zeros_like(m1)
    m2[2, 3:5, 2:5] = True
    a = add_segmentation(scene, "first", vol, [("liver", m1, RED), ("spleen", m2, GREEN)])
    b = add_segmentation(scene, "second", vol, [("Liver", m1, RED)])
    table = sc.collect_classes([a, b])
    assert [c.name for c in table.classes] == ["liver", "spleen"]
    assert table.problems == ["segmentation 'second' has no segment 'spleen' (found in 'first'): add it, empty if "
                              "the structure is absent, or its voxels are trained as background"]
    with pytest.raises(ex.ExportError, match="'second' has no segment 'spleen'"):
        ex.export_training_data(scene, tmp_path, [(a, vol), (b, vol)])
    # allowed explicitly: the missing class becomes background, said as a warning
    export = ex.export_training_data(scene, tmp_path, [(a, vol), (b, vol)], allow_missing_classes=True)
    assert any("no segment 'spleen'" in w for w in export.warnings)

    # two segments with one name
    c = add_segmentation(scene, "dup", vol, [("liver", m1, RED), ("LIVER", m2, GREEN)])
    assert sc.collect_classes([c]).problems == ["segmentation 'dup' has two segments named 'LIVER'"]

    # overlapping segments (Slicer keeps them in two layers) cannot become one labelmap
    d = add_segmentation(scene, "overlap", vol, [("liver", m1, RED)])
    lm = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    lm.SetIJKToRASMatrix(to_vtk(GEOM_B))
    slicer.util.updateVolumeFromArray(lm, (m1 | m2).astype(np.uint8))
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lm, d)
    s = d.GetSegmentation()
    s.GetNthSegment(1).SetName("spleen")
    assert s.GetNumberOfLayers() == 2
    with pytest.raises(ex.ExportError, match="segments 'liver' and 'spleen' overlap in 4 voxels"):
        ex.case_labelmap(scene, d, vol, sc.collect_classes([d]).classes)

    # no source volume, a segmentation far away from its volume, a non-linear transform
    lone = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lonely")
    with pytest.raises(ex.ExportError, match="segmentation 'lonely' has no source volume"):
        ex.pair_cases([lone])
    far = add_volume(scene, "far", np.zeros((3, 5, 6), np.int16), matrix((1, 1, 1), (500, 500, 500)))
    with pytest.raises(ex.ExportError, match="'first' does not overlap its volume 'far'"):
        ex.export_training_data(scene, tmp_path, [(a, far)], allow_missing_classes=True)
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    vol.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(ex.ExportError, match="'V' is under the non-linear transform 'warp'"):
        ex.export_training_data(scene, tmp_path, [(a, vol)], allow_missing_classes=True)
    with pytest.raises(ex.ExportError, match="no labeled case"):
        ex.export_training_data(scene, tmp_path, [])


# ------------------------------------------------------------------------------------------ import
CLASSES = [sc.ClassEntry(1, "liver", RED, LIVER_TERM), sc.ClassEntry(2, "spleen", GREEN), sc.ClassEntry(3, "kidney", BLUE)]


def test_engine_prediction_imports_with_names_colours_geometry_and_voxels(scene, tmp_path):
    s = build_scene(scene)
    vol_a, vol_b, vol_c, _ = s["vols"]
    inputs = ex.export_segment_inputs(tmp_path, [vol_a, vol_c])
    assert list(inputs) == ["Patient_A", "Patient_C"]
    for stem, vol in zip(inputs, (vol_a, vol_c)):
        # a prediction written by the engine's writer on the exported input's grid; class 3 stays empty
        image = read_volume(tmp_path / "inputs" / f"{stem}.nrrd")
        pred = s["truth"][stem].transpose(2, 1, 0).astype(np.uint8).copy()
        pred[pred == 3] = 0
        write_segmentation(tmp_path / f"{stem}.seg.nrrd", pred, image.geometry,
                           [ClassInfo(c.value, f"class_{c.value}", (0.5, 0.5, 0.5)) for c in CLASSES])
        node = im.import_segmentation(scene, tmp_path / f"{stem}.seg.nrrd", vol, classes=CLASSES)
        assert node.GetName() == f"{vol.GetName()} SemiSeg"
        segs = sc.segments_of(node)
        assert [(sid, g.GetName()) for sid, g in segs] == [("Segment_1", "liver"), ("Segment_2", "spleen"),
                                                           ("Segment_3", "kidney")]  # the empty class is kept
        assert [g.GetColor() for _, g in segs] == [pytest.approx(c.color) for c in CLASSES]
        assert sc.segment_terminology(segs[0][1]) == LIVER_TERM
        assert ex.source_volume(node) is vol
        # voxels on the volume's grid (C: the volume is under a transform, the prediction in world space)
        geometry = im.labelmap_geometry(node)
        np.testing.assert_allclose(geometry[:3, :3], ex.world_ijk_to_ras(vol)[:3, :3], atol=1e-6)
        if vol is vol_a:
            labels, _ = mrml_labels(scene, node, vol)
            np.testing.assert_array_equal(labels, pred.transpose(2, 1, 0))
        else:  # compare in world space: export onto a hardened copy of the volume's grid
            copy = add_volume(scene, "C world", np.zeros(pred.shape[::-1], np.uint8), ex.world_ijk_to_ras(vol))
            labels, _ = mrml_labels(scene, node, copy)
            np.testing.assert_array_equal(labels, pred.transpose(2, 1, 0))

    # a prediction on another grid is refused instead of being shown misaligned
    with pytest.raises(im.ImportError_, match="does not lie on the grid of 'Patient B'"):
        im.import_segmentation(scene, tmp_path / "Patient_A.seg.nrrd", vol_b, classes=CLASSES)


def test_real_segmenter_output_and_labelmap_path(scene, tmp_path):
    """The engine's Segmenter (random weights, deterministic) on an exported oblique volume → both
    prediction files import onto the volume with identical voxels."""
    torch = pytest.importorskip("torch")
    from semiseg.checkpoint import save_checkpoint
    from semiseg.networks import build_network
    from semiseg.predict import Segmenter
    torch.manual_seed(0)
    net = build_network("unet", in_channels=1, num_classes=4)
    meta = {"dim": 2, "patch_size": [32, 32], "stride": [32, 32], "resize": "nearest", "normalization": "zscore",
            "lcc": False, "classes": [ClassInfo(c.value, c.name, c.color).to_dict() for c in CLASSES],
            "method": "supervised", "dataset": "files"}
    save_checkpoint(tmp_path / "best.pt", {"network": dict(net.config), "model": net.state_dict(), "meta": meta,
                                           "config": {}, "iteration": 0, "metrics": {}})
    rng = np.random.default_rng(5)
    vol = add_volume(scene, "Oblique", rng.normal(0, 1, (3, 20, 24)).astype(np.float32), GEOM_A)
    inputs = ex.export_segment_inputs(tmp_path / "job", [vol])
    result = Segmenter(tmp_path / "best.pt").segment_file(tmp_path / "job/inputs/Oblique.nrrd", tmp_path / "pred")
    pred, _ = read_label(result["labelmap"])
    assert len(np.unique(pred.array)) > 1  # a real, non-trivial prediction
    node = im.import_segmentation(scene, result["segmentation"], vol, classes=CLASSES)
    labels, _ = mrml_labels(scene, node, vol)
    np.testing.assert_array_equal(labels, pred.array.transpose(2, 1, 0))
    node2 = im.import_labelmap(scene, result["labelmap"], CLASSES, vol, name="from labelmap")
    present = [c for c in CLASSES if (pred.array == c.value).any()]
    assert [g.GetName() for _, g in sc.segments_of(node2)] == [c.name for c in present]
    assert [g.GetColor() for _, g in sc.segments_of(node2)] == [pytest.approx(c.color) for c in present]
    labels2, ids2 = mrml_labels(scene, node2, vol)
    # label i+1 in mrml_labels is the i-th segment: map back to class values
    remap = np.array([0] + [c.value for c in present])
    np.testing.assert_array_equal(remap[labels2], pred.array.transpose(2, 1, 0))
    assert inputs == {"Oblique": vol.GetID()}


def test_import_job_predictions_uses_the_recorded_volumes(scene, tmp_path):
    vol = add_volume(scene, "Only", np.zeros((2, 4, 5), np.int16), GEOM_B)
    inputs = ex.export_segment_inputs(tmp_path, [vol])
    protocol.write_job(tmp_path, ex.segment_job_spec(inputs, "model.pt", "cpu"))
    image = read_volume(tmp_path / "inputs/Only.nrrd")
    pred = np.zeros(image.shape, np.uint8)
    pred[1:3, 1:3, 0] = 2
    write_segmentation(tmp_path / "predictions/Only.seg.nrrd", pred, image.geometry,
                       [ClassInfo(1, "liver"), ClassInfo(2, "spleen")])
    with open(tmp_path / protocol.EVENTS_FILE, "w") as f:
        f.write(protocol.encode({"event": "predicted", "index": 1, "total": 1,
                                 "segmentation": str(tmp_path / "predictions/Only.seg.nrrd")}) + "\n")
    nodes = im.import_job_predictions(scene, tmp_path, classes=CLASSES[:2])
    assert [n.GetName() for n in nodes] == ["Only SemiSeg"]
    assert ex.source_volume(nodes[0]) is vol
    labels, _ = mrml_labels(scene, nodes[0], vol)
    assert int((labels == 2).sum()) == 4 and json.loads((tmp_path / "job.json").read_text())["volume_ids"] == inputs


# ------------------------------------------------------------------------------------------ plot + logic
def test_training_plot_table_and_chart(scene):
    from SemiSegSlicerLib.plotting import TrainingPlot
    state = protocol.ProgressState()
    plot = TrainingPlot(scene, "run")
    for e in [{"event": "started", "iteration": 0, "iterations": 20},
              {"event": "iteration", "iteration": 10, "iterations": 20, "eta_s": 1.0, "lr": 0.1, "loss": 0.7, "sup": 0.6}]:
        state.update(e)
        plot.update(state)
    assert plot.values("loss") == [0.7] and "val_dice" in (plot.table.GetTable().GetColumnName(i)
                                                           for i in range(plot.table.GetNumberOfColumns()))
    for e in [{"event": "validation", "iteration": 10, "dice": 0.5, "best_dice": 0.5},
              {"event": "iteration", "iteration": 20, "iterations": 20, "eta_s": 0.0, "lr": 0.1, "loss": 0.4, "sup": 0.3}]:
        state.update(e)
        plot.update(state)
    assert plot.values("iteration") == [10, 20] and plot.values("val_dice") == [0.5, 0.5]
    assert plot.chart.GetNumberOfPlotSeriesNodes() == 2
    series = [plot.chart.GetNthPlotSeriesNode(i) for i in range(2)]
    assert sorted((s.GetXColumnName(), s.GetYColumnName()) for s in series) == [("iteration", "loss"), ("iteration", "val_dice")]
    assert all(s.GetTableNode() is plot.table for s in series)


@pytest.fixture
def standin():
    import pythonqt_standin
    pythonqt_standin.reset()
    yield pythonqt_standin
    pythonqt_standin.reset()


@pytest.fixture
def semiseg_module(scene, monkeypatch, tmp_path, standin):
    """The module file SemiSeg.py inside a stand-in of what only the Slicer application has: the
    ScriptedLoadableModule base classes, PythonQt's ``qt`` (Testing/pythonqt_standin.py: QByteArray only
    through ``data()``, signals only when events are processed, slot exceptions printed and swallowed),
    ``slicer.app`` and ``slicer.modules.plots``; the scene is the real slicer-core scene as
    ``slicer.mrmlScene``, so the Logic runs its real train/segment path (export, trainer process, import)."""
    import types
    import unittest
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class _Base:
        def __init__(self, *args, **kwargs):
            pass
    slm.ScriptedLoadableModule = slm.ScriptedLoadableModuleWidget = slm.ScriptedLoadableModuleLogic = _Base
    slm.ScriptedLoadableModuleTest = unittest.TestCase
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setitem(sys.modules, "qt", standin.qt_module())
    monkeypatch.delitem(sys.modules, "SemiSeg", raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", standin.Application(str(tmp_path)), raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(plots=standin.PlotsModule()), raising=False)
    import SemiSeg
    yield SemiSeg
    sys.modules.pop("SemiSeg", None)


def disk_volume(scene, name, shift):
    rng = np.random.default_rng(shift)
    a = rng.normal(0, 0.2, (3, 32, 32)).astype(np.float32)
    _, j, i = np.mgrid[:3, :32, :32]
    disk = (j - 16 - shift) ** 2 + (i - 14 + shift) ** 2 < 49
    a[disk] += 1.0
    return add_volume(scene, name, a, GEOM_A), disk


def tiny_scene_and_logic(scene, tmp_path, module):
    """A labeled disk case and two unlabeled volumes on the real scene, and the module's Logic."""
    pytest.importorskip("torch")
    logic = module.SemiSegLogic()
    logic.setWorkspace(tmp_path)
    labeled, disk = disk_volume(scene, "labeled", 0)
    unlabeled = [disk_volume(scene, f"unlabeled {s}", s)[0] for s in (1, 2)]
    return logic, add_segmentation(scene, "labels", labeled, [("disk", disk, RED)]), unlabeled


def test_logic_trains_and_segments_a_real_scene(scene, tmp_path, semiseg_module, standin):
    """The scripting path (``waitForCompletion=True``, what SemiSegTest does inside Slicer) on real MRML
    with a real trainer process, under PythonQt's rules; the application processes events while it waits."""
    logic, seg, unlabeled = tiny_scene_and_logic(scene, tmp_path, semiseg_module)
    kinds: list[str] = []
    result = logic.train([seg], unlabeled=unlabeled, method="mean_teacher", dim=2, iterations=10, labeledBatch=2,
                         unlabeledBatch=2, device="cpu", patchSize=(32, 32), extraConfig={"threads": 1, "log_every": 5},
                         progressCallback=lambda p, e: kinds.append(e["event"]), timeout=240)
    assert result.status == "completed" and kinds[0] == "started" and kinds[-1] == "finished"
    assert kinds[1] == "plan"  # the panel's scans are planned like any user dataset (semiseg.planning)
    assert standin.LOOP.processed > 0 and not standin.LOOP.swallowed
    plan = json.loads((Path(logic.jobDir) / "run" / "plan.json").read_text())
    assert plan["dim"] == 2 and plan["patch_size"] == [32, 32]  # the panel's explicit choices win over the plan
    assert logic.plot.values("iteration") == [5, 10]
    (cls,) = logic.model["classes"]  # with the segment's terminology (Slicer's default "Tissue" here)
    assert (cls["value"], cls["name"], cls["color"]) == (1, "disk", list(RED))
    assert cls["terminology"] == sc.segment_terminology(sc.segments_of(seg)[0][1])
    assert not logic.isRunning and not logic.canResume()

    nodes = logic.segment([unlabeled[0]], device="cpu", show3D=True)
    assert [n.GetName() for n in nodes] == ["unlabeled 1 SemiSeg"]
    (sid, segment), = sc.segments_of(nodes[0])
    assert (sid, segment.GetName()) == ("Segment_1", "disk") and segment.GetColor() == pytest.approx(RED)
    assert ex.source_volume(nodes[0]) is unlabeled[0] and sc.segment_terminology(segment) == cls["terminology"]
    assert nodes[0].GetSegmentation().ContainsRepresentation("Closed surface")
    label_file = next((Path(logic.jobDir) / "predictions").glob("*.label.nrrd"))
    pred, _ = read_label(label_file)
    labels, _ = mrml_labels(scene, nodes[0], unlabeled[0])
    np.testing.assert_array_equal(labels, pred.array.transpose(2, 1, 0))

    saved = logic.saveModel()
    assert saved == tmp_path / "models" / logic.lastTrainingJob.name
    assert logic.loadModel(saved)["classes"][0]["name"] == "disk"
    assert "disk" in logic.modelDescription()


def test_panel_path_delivers_on_the_main_thread_only_when_events_are_processed(scene, tmp_path, semiseg_module,
                                                                                standin):
    """What the panel does (``waitForCompletion=False``): train and segment return at once; progress, log
    and the result arrive only while Slicer processes events, on the main thread; an observer that raises
    does not stall the job; the live plot can be shown as soon as training starts."""
    import threading
    import time
    logic, seg, unlabeled = tiny_scene_and_logic(scene, tmp_path, semiseg_module)
    events, finished, threads = [], [], set()

    def on_progress(progress, event):
        threads.add(threading.current_thread())
        events.append(event["event"])
        if len(events) == 1:
            raise RuntimeError("a faulty observer")  # PythonQt would print and swallow it

    assert logic.train([seg], unlabeled=unlabeled, method="mean_teacher", dim=2, iterations=10, labeledBatch=2,
                       unlabeledBatch=2, device="cpu", patchSize=(32, 32), extraConfig={"threads": 1, "log_every": 5},
                       waitForCompletion=False, progressCallback=on_progress, finishedCallback=finished.append) is None
    assert logic.isRunning and logic.task == "train"
    logic.showPlot()  # the panel shows the plot right after starting: its chart exists already
    assert slicer.modules.plots.shown == [logic.plot.chart] and logic.plot.chart is not None
    time.sleep(1.0)
    assert events == [] and finished == []  # nothing is delivered while no event is processed
    assert standin.pump_until(lambda: finished, timeout=300)
    assert finished[0].status == "completed" and not logic.isRunning and not logic.poller.active
    assert events[0] == "started" and events[-1] == "finished" and threads == {threading.main_thread()}
    assert logic.plot.values("iteration") == [5, 10]
    assert logic.panelState().last_training_job == str(logic.lastTrainingJob)
    assert logic.panelState().model == str(logic.lastTrainingJob)
    assert semiseg_module.SemiSegLogic().model == {**logic.model, "created": ANY}  # what a reopened panel loads

    finished.clear()
    assert logic.segment([unlabeled[0]], device="cpu", waitForCompletion=False, finishedCallback=finished.append) is None
    assert logic.isRunning and logic.task == "segment"
    assert standin.pump_until(lambda: finished, timeout=300)
    (result,) = finished
    assert result.status == "completed" and [n.GetName() for n in result.nodes] == ["unlabeled 1 SemiSeg"]


def test_closing_the_scene_keeps_training_and_cancels_segmentation(scene, tmp_path, semiseg_module, standin):
    pytest.importorskip("torch")
    logic = semiseg_module.SemiSegLogic()
    logic.setWorkspace(tmp_path)
    labeled, disk = disk_volume(scene, "labeled", 0)
    seg = add_segmentation(scene, "labels", labeled, [("disk", disk, RED)])
    finished = []
    logic.train([seg], method="supervised", dim=2, iterations=100000, labeledBatch=2, device="cpu",
                patchSize=(32, 32), extraConfig={"threads": 1, "log_every": 5}, waitForCompletion=False,
                finishedCallback=finished.append)
    assert standin.pump_until(lambda: logic.runner.progress.iteration >= 5, timeout=300)
    message = logic.sceneAboutToClose()
    assert "training goes on" in message and logic.isRunning and not logic.cancelRequested
    iteration = logic.runner.progress.iteration
    assert standin.pump_until(lambda: logic.runner.progress.iteration > iteration, timeout=120)  # still training
    logic.cancel()
    assert standin.pump_until(lambda: finished, timeout=120) and finished[0].status == "cancelled"

    # a segmentation job puts its results into the scene: closing the scene cancels it
    logic.model = {"checkpoint": str(tmp_path / "never-read.pt"), "classes": []}
    finished.clear()
    logic.segment([labeled], device="cpu", waitForCompletion=False, finishedCallback=finished.append)
    assert "segmentation job is cancelled" in logic.sceneAboutToClose() and logic.cancelRequested
    assert standin.pump_until(lambda: finished, timeout=120)
    assert finished[0].status in ("cancelled", "failed") and finished[0].nodes == []


def test_panel_state_and_last_job_are_saved_with_the_scene(scene, tmp_path, semiseg_module):
    """Save the scene, open it in a new scene: the panel's inputs and choices come back, Resume works for the
    last training job and the loaded model is loaded again."""
    from SemiSegSlicerLib import parameters
    logic = semiseg_module.SemiSegLogic()
    logic.setWorkspace(tmp_path / "ws")
    labeled, disk = disk_volume(scene, "labeled", 0)
    other = disk_volume(scene, "other", 1)[0]
    seg = add_segmentation(scene, "labels", labeled, [("disk", disk, RED)])
    job = tmp_path / "ws" / "jobs" / "train-20260101-000000"
    (job / "run").mkdir(parents=True)
    (job / "run" / "last.pt").write_bytes(b"checkpoint")  # cancelled: last.pt, no metrics.json
    model = tmp_path / "ws" / "models" / "m1"
    model.mkdir(parents=True)
    (model / "model.pt").write_bytes(b"weights")
    (model / "model.json").write_text(json.dumps({"format": "semiseg-model", "name": "m1", "method": "ua_mt",
                                                  "classes": [{"value": 1, "name": "disk", "color": list(RED)}]}))
    state = parameters.PanelState(labeled=[seg.GetID()], unlabeled=[other.GetID()], to_segment=[other.GetID()],
                                  source_overrides={seg.GetID(): labeled.GetID()}, method="ua_mt", dim=2,
                                  preset="acdc", iterations=123, time_budget_minutes=30, device="cpu",
                                  method_options={"consistency": 0.3}, training_options={"lr": 0.02},
                                  workspace=str(tmp_path / "ws"), last_training_job=str(job), model=str(model),
                                  keep_jobs=3)
    logic.savePanelState(state)
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()

    reopened = slicer.vtkMRMLScene()
    reopened.SetURL(str(tmp_path / "scene.mrml"))
    assert reopened.Import()
    slicer.mrmlScene = reopened  # the application's scene is now the reopened one (restored by monkeypatch)
    restored = semiseg_module.SemiSegLogic()
    assert restored.panelState() == state
    assert restored.lastTrainingJob == job and restored.canResume() and restored.workspace == tmp_path / "ws"
    assert restored.model["method"] == "ua_mt" and restored.modelDescription().startswith("m1: ua_mt")
    assert reopened.GetNodeByID(state.labeled[0]).GetName() == "labels"


def test_opening_the_panel_never_imports_torch(tmp_path):
    """Slicer's own process stays light: the module file, its Logic on a scene that remembers a trained model,
    the dependency check and the class table import no torch (a fresh interpreter, the PythonQt stand-in)."""
    job = tmp_path / "ws" / "jobs" / "train-20260101-000000"
    (job / "run").mkdir(parents=True)
    (job / "run" / "best.pt").write_bytes(b"weights")
    (job / "run" / "config.json").write_text(json.dumps({"method": "mean_teacher"}))
    (job / "job.json").write_text(json.dumps({"task": "train", "dataset": {
        "classes": [{"value": 1, "name": "disk", "color": list(RED)}]}}))
    script = f"""
import sys, types, unittest
sys.path[:0] = [{str(ROOT / "SemiSegExtension")!r}, {str(Path(__file__).parent)!r}]
import pythonqt_standin, slicer
slm = types.ModuleType("slicer.ScriptedLoadableModule")
class Base:
    def __init__(self, *a, **k): pass
slm.ScriptedLoadableModule = slm.ScriptedLoadableModuleWidget = slm.ScriptedLoadableModuleLogic = Base
slm.ScriptedLoadableModuleTest = unittest.TestCase
sys.modules["slicer.ScriptedLoadableModule"] = slm
sys.modules["qt"] = pythonqt_standin.qt_module()
slicer.mrmlScene = slicer.vtkMRMLScene()
slicer.app = pythonqt_standin.Application({str(tmp_path)!r})
from SemiSegSlicerLib import parameters
parameters.save(parameters.parameter_node(slicer.mrmlScene),
                parameters.PanelState(workspace={str(tmp_path / "ws")!r}, last_training_job={str(job)!r},
                                      model={str(job)!r}))
import SemiSeg
logic = SemiSeg.SemiSegLogic()
assert logic.model["method"] == "mean_teacher" and logic.lastTrainingJob is not None
assert logic.dependencyStatus()[0]
logic.classTable([])
print("torch imported:", "torch" in sys.modules)
"""
    import subprocess
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "torch imported: False"
